"""The training step kept traced, and the initial state kept, in fcn's cache folder (fcn/traced.py):
same results, never stale."""

import logging
import os
import shutil
import subprocess
import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from configs import tiny
from fcn import onednn, state as state_lib, traced


@pytest.fixture(autouse=True)
def _folders(tmp_path, monkeypatch):
    monkeypatch.setenv("FCN_CACHE_DIR", str(tmp_path / "cache"))  # a traced folder of its own per test


def _setup(**overrides):
    config = tiny.get_config()
    for k, v in overrides.items():
        node, *path = k.split(".")
        target = config[node]
        for p in path[:-1]:
            target = target[p]
        target[path[-1]] = v
    graphs, state, tx = state_lib.create(config, 4)
    rng = np.random.default_rng(0)
    batch = (
        rng.integers(0, 256, (2, 32, 32, 3), dtype=np.uint8),
        rng.integers(0, 4, (2, 32, 32), dtype=np.uint8),
        np.full((2, 2), 32, np.int32),
    )
    return config, graphs, state, tx, batch


def _copy(state):
    """A copy on the device, as the step's own outputs are: the step donates its state, and host arrays
    for the first call would make the second call (device arrays) another program to compile."""
    return jax.device_put(jax.tree.map(np.array, state), jax.devices()[0])


def _run(keep_traced, config, graphs, state, tx, batch, steps=2):
    step = state_lib.jit_train_step(config, graphs, tx, 4, 255, keep_traced=keep_traced)
    state = _copy(state)
    for _ in range(steps):
        state, out = step(state, *batch)
    return jax.tree.leaves(state), out


def _entries():
    return sorted(traced.folder().glob("*.jaxexport"))


def _same(a, b):
    for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)):
        np.testing.assert_array_equal(np.asarray(x), np.asarray(y))


def test_kept_step_equals_the_plain_one_and_is_read_back_without_tracing(monkeypatch):
    setup = _setup()
    plain = _run(False, *setup)
    assert not _entries()
    first = _run(True, *setup)  # traced, exported, kept
    assert len(_entries()) == 1
    _same(first, plain)
    with monkeypatch.context() as m:  # a later start: read back, nothing traced
        m.setattr(jax.export, "export", lambda *a, **k: pytest.fail("traced although kept"))
        m.setattr(state_lib.losses, "cross_entropy", lambda *a, **k: pytest.fail("traced although kept"))
        again = _run(True, *setup)
    _same(again, plain)


def test_another_config_or_batch_shape_is_another_program():
    config, graphs, state, tx, batch = _setup()
    step = state_lib.jit_train_step(config, graphs, tx, 4, 255, keep_traced=True)
    state = _copy(state)
    state, _ = step(state, *batch)
    smaller = tuple(b[:1] for b in batch)
    state, out = step(state, *smaller)  # another shape: the plain step, still right
    assert np.isfinite(float(out["loss"])) and int(state["step"]) == 2
    assert len(_entries()) == 1
    _run(True, *_setup(**{"optimizer.learning_rate": 0.5}), steps=1)
    assert len(_entries()) == 2


def test_unreadable_entry_is_traced_again_and_replaced(caplog):
    setup = _setup()
    _truncated_entry_is_replaced(_entries, lambda: _run(True, *setup), _run(False, *setup), "tracing it again", caplog)


def test_an_entry_changed_inside_its_program_is_traced_again_and_replaced(caplog):
    """Bytes changed in the middle (the StableHLO), the length kept: jax.export deserializes it without
    complaint, and the step failed at its first call ("Failed to deserialize StableHLO")."""
    setup = _setup()
    expected = _run(False, *setup)
    _run(True, *setup)
    (entry,) = _entries()
    data = bytearray(entry.read_bytes())
    middle = len(data) // 2
    data[middle : middle + 64] = bytes(b ^ 0xFF for b in data[middle : middle + 64])
    entry.write_bytes(bytes(data))
    _same(_run(True, *setup), expected)
    assert "unreadable (its checksum does not match its contents); tracing it again" in caplog.text
    (entry,) = _entries()
    _same(_run(True, *setup), expected)  # the entry written anew is read back


def _truncated_entry_is_replaced(entries, run, expected, message, caplog):
    """run() keeps one entry; truncated, the next run() logs `message`, gives `expected` and keeps it anew."""
    run()
    (entry,) = entries()
    entry.write_bytes(entry.read_bytes()[:200])
    _same(run(), expected)
    assert "unreadable" in caplog.text and message in caplog.text
    (entry,) = entries()
    assert entry.stat().st_size > 200


def test_a_cache_folder_that_cannot_be_written_still_trains_and_says_so(tmp_path, monkeypatch, caplog):
    (tmp_path / "file").write_text("")  # a file where the folder would be: nothing can be made under it
    monkeypatch.setenv("FCN_CACHE_DIR", str(tmp_path / "file" / "cache"))
    caplog.set_level(logging.INFO, logger="fcn")
    setup = _setup()
    _same(_run(True, *setup), _run(False, *setup))
    assert "could not keep the traced step" in caplog.text
    assert "traced and kept" not in caplog.text  # it was not


def test_turned_off_keeps_nothing(monkeypatch):
    monkeypatch.setenv("FCN_TRACE_CACHE", "0")
    setup = _setup()
    _same(_run(True, *setup), _run(False, *setup))
    assert not traced.folder().exists()


def test_the_key_follows_fcn_source_and_jax_settings(monkeypatch):
    base = traced.fingerprint(False)
    with monkeypatch.context() as m:
        m.setattr(traced, "_source_digest", lambda: "edited")
        assert traced.fingerprint(False) != base
    with jax.default_matmul_precision("highest"):
        assert traced.fingerprint(False) != base
    monkeypatch.setenv("XLA_FLAGS", "--xla_cpu_enable_fast_math=true")
    assert traced.fingerprint(False) != base


_PROBE = """
import sys
import jax, jax.numpy as jnp
import fcn.probe  # the code in memory from here on
from fcn import traced
if sys.argv[1] == "edit":  # then the file changes: the process still runs the old code
    with open(fcn.probe.__file__, "a") as f:
        f.write("\\ndef f(x):\\n    return x + 2\\n")
fn = lambda s, x: (s, {"y": fcn.probe.f(x)})
step = traced.TracedStep(fn, jax.jit(fn), "probe", uses_onednn=False)
_, out = step({"n": jnp.zeros(())}, jnp.ones(()))
print(float(out["y"]), len(list(traced.folder().glob("*.jaxexport"))))
"""


def test_a_process_whose_fcn_source_changed_after_import_keeps_no_step(tmp_path):
    """A notebook kept open while fcn's files change (an edit, a git pull): its step, traced from the
    old code in memory, was kept under the new files' key, and a new process with the new code ran the
    old program, silently."""
    root = Path(traced.__file__).resolve().parents[1]
    shutil.copytree(root / "fcn", tmp_path / "fcn", ignore=shutil.ignore_patterns("__pycache__", "*.so", "*.o"))
    (tmp_path / "fcn" / "probe.py").write_text("def f(x):\n    return x + 1\n")
    env = {**os.environ, "JAX_PLATFORMS": "cpu", "PYTHONPATH": str(tmp_path), "FCN_CACHE_DIR": str(tmp_path / "c")}

    def run(how):
        done = subprocess.run(
            [sys.executable, "-c", _PROBE, how], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=120
        )
        assert done.returncode == 0, done.stderr[-3000:]
        return done.stdout.split(), done.stderr

    out, err = run("edit")
    assert out == ["2.0", "0"]  # the old code ran, and nothing was kept from it
    assert "fcn's source files changed since this process imported fcn" in err
    assert run("fresh")[0] == ["3.0", "1"]  # the new code, traced and kept
    assert run("fresh")[0] == ["3.0", "1"]  # and read back


@pytest.mark.skipif(not onednn.available(), reason="oneDNN's handlers are not available here")
def test_the_key_follows_the_onednn_build_and_what_it_runs_on_this_cpu(monkeypatch):
    """A kept step has bn_relu's workspace size in it, which oneDNN's instruction set decides: a step
    traced on another CPU (a shared cache folder), under $ONEDNN_MAX_CPU_ISA, or with another oneDNN
    failed with 'the workspace has the wrong size'."""
    base = traced.fingerprint(True)
    with monkeypatch.context() as m:
        m.setattr(onednn, "impls", lambda dtype: "isa:sse41 bn_fwd:nspc_bnorm:any")
        assert traced.fingerprint(True) != base
    monkeypatch.setattr(onednn, "_library", "onednn_conv-another.so")
    assert traced.fingerprint(True) != base


def test_a_step_jax_export_refuses_runs_plain(monkeypatch, caplog):
    setup = _setup()
    plain = _run(False, *setup)

    def refuse(*a, **k):
        raise ValueError("custom call not allowed")

    monkeypatch.setattr(jax.export, "export", refuse)
    _same(_run(True, *setup), plain)
    assert "cannot be kept traced" in caplog.text and "custom call not allowed" in caplog.text
    assert not _entries()


def test_without_flatbuffers_the_step_trains_and_is_not_kept(monkeypatch, caplog):
    """jax.export serializes with the flatbuffers package, which jax does not require: a machine
    without it (a GPU image with jax but no TensorFlow) ended `python train.py` at its first step
    with jax's ImportError ('Please install flatbuffers')."""
    setup = _setup()
    plain = _run(False, *setup)
    monkeypatch.setitem(sys.modules, "flatbuffers", None)  # import flatbuffers -> ImportError
    monkeypatch.delitem(sys.modules, "jax._src.export.serialization", raising=False)  # imported afresh
    _same(_run(True, *setup), plain)
    assert "could not keep the traced step" in caplog.text and "flatbuffers" in caplog.text
    assert not _entries()


def _states():
    return sorted(traced.state_folder().glob("*.state"))


def test_kept_state_equals_a_fresh_one_bit_for_bit_and_is_read_back_without_computing(monkeypatch):
    config = tiny.get_config()
    graphs, fresh, _ = state_lib.create(config, 4)
    assert not _states()
    kept_graphs, first, _ = state_lib.create(config, 4, keep=True)  # computed, kept
    assert len(_states()) == 1
    with monkeypatch.context() as m:  # a later start: read back, nothing compiled or run (only traced abstractly)
        m.setattr(state_lib, "run_once_compiler_options", lambda *a, **k: pytest.fail("built although kept"))
        read_graphs, again, _ = state_lib.create(config, 4, keep=True)
    assert read_graphs == graphs == kept_graphs
    assert jax.tree.structure(again) == jax.tree.structure(fresh)
    _same(first, fresh)
    _same(again, fresh)
    # What is read back trains like what was computed (the step donates it: fresh buffers, not the file).
    setup = _setup()
    _same(_run(False, config, read_graphs, again, *setup[3:]), _run(False, *setup))
    state_lib.create(config, 5, keep=True)  # another class count: another entry
    assert len(_states()) == 2


def test_kept_state_round_trips_keys_bfloat16_and_scalars():
    tree = {
        "key": jax.random.key(3),
        "keys": jax.random.split(jax.random.key(4, impl="rbg"), 2),
        "half": jnp.arange(6, dtype=jnp.bfloat16).reshape(2, 3),
        "step": jnp.int32(7),
        "empty": jnp.zeros((0, 4)),
        "none": None,
    }
    abstract = lambda: ("graphs", jax.eval_shape(lambda: tree))  # noqa: E731
    static, out = traced.kept_state(lambda: ("graphs", tree), abstract, {"test": 1})
    static, out = traced.kept_state(lambda: pytest.fail("built although kept"), abstract, {"test": 1})
    assert static == "graphs" and jax.tree.structure(out) == jax.tree.structure(tree)
    for name in ("key", "keys"):
        assert jax.random.key_impl(out[name]) == jax.random.key_impl(tree[name])
        np.testing.assert_array_equal(jax.random.key_data(out[name]), jax.random.key_data(tree[name]))
    for name in ("half", "step", "empty"):
        assert out[name].dtype == tree[name].dtype and out[name].shape == tree[name].shape
        np.testing.assert_array_equal(np.asarray(out[name]), np.asarray(tree[name]))


def test_a_weakly_typed_state_is_not_kept():
    tree = {"w": jnp.ones(3), "lr": jnp.asarray(0.1)}  # a weak float: would come back a strong one
    assert tree["lr"].weak_type
    _, out = traced.kept_state(lambda: (None, tree), lambda: pytest.fail("read although not kept"), {"test": 3})
    assert out is tree and not _states()


def test_kept_state_of_another_structure_or_shape_is_computed_again(caplog):
    tree = {"w": jnp.ones((2, 3)), "b": jnp.zeros(3)}
    traced.kept_state(lambda: (None, tree), lambda: pytest.fail("read although not kept"), {"test": 2})
    for other in (
        {"w": jnp.ones((3, 2)), "b": jnp.zeros(3)},
        {"w": jnp.ones((2, 3))},
        {**tree, "b": jnp.zeros(3, int)},
    ):
        caplog.clear()
        build = lambda t=other: (None, t)  # noqa: E731
        _, out = traced.kept_state(build, lambda t=other: (None, jax.eval_shape(lambda: t)), {"test": 2})
        assert "unreadable" in caplog.text and "another structure" in caplog.text
        assert jax.tree.structure(out) == jax.tree.structure(other)
        _same(out, other)


def test_unreadable_kept_state_is_computed_again_and_replaced(caplog):
    config = tiny.get_config()
    fresh = state_lib.create(config, 4)[1]
    _truncated_entry_is_replaced(
        _states, lambda: state_lib.create(config, 4, keep=True)[1], fresh, "computing it again", caplog
    )


def test_kept_state_changed_inside_is_computed_again_with_one_warning(monkeypatch, caplog):
    """Bytes changed inside a kept state, its length kept: it was read back as it was (16 values
    differing from a fresh state's in the tiny config) and trained from, without a word."""
    config = tiny.get_config()
    fresh = state_lib.create(config, 4)[1]
    state_lib.create(config, 4, keep=True)
    (entry,) = _states()
    data = bytearray(entry.read_bytes())
    middle = len(data) // 2  # inside the parameters
    data[middle : middle + 64] = bytes(b ^ 0xFF for b in data[middle : middle + 64])
    entry.write_bytes(bytes(data))
    caplog.set_level(logging.WARNING)
    _same(state_lib.create(config, 4, keep=True)[1], fresh)
    warnings = [r.getMessage() for r in caplog.records if r.levelname == "WARNING"]
    assert warnings == [
        f"initial state {entry} is unreadable (its checksum does not match its contents); computing it again"
    ]
    with monkeypatch.context() as m:  # kept anew, and read back
        m.setattr(state_lib, "run_once_compiler_options", lambda *a, **k: pytest.fail("built although kept"))
        _same(state_lib.create(config, 4, keep=True)[1], fresh)


def test_kept_state_turned_off_keeps_nothing(monkeypatch):
    monkeypatch.setenv("FCN_TRACE_CACHE", "0")
    config = tiny.get_config()
    _same(state_lib.create(config, 4, keep=True)[1], state_lib.create(config, 4)[1])
    assert not traced.state_folder().exists()


def test_a_state_over_the_folders_limit_is_not_kept_and_the_others_stay(monkeypatch, caplog):
    """A state bigger than the folder's limit would be trimmed at once, with every other kept state,
    and written again at every start: it is not written, and the log says why."""
    small = {"w": jnp.ones(4)}
    traced.kept_state(lambda: (None, small), lambda: pytest.fail("read although not kept"), {"test": 4})
    kept = _states()
    monkeypatch.setattr(traced, "_STATE_LIMIT_BYTES", 1000)
    caplog.set_level(logging.INFO, logger="fcn.data.cache")  # fcn.data.cache.write_entry says it, for every cache
    big = {"w": jnp.ones(1000)}  # 4000 bytes
    _, out = traced.kept_state(lambda: (None, big), lambda: pytest.fail("read although not kept"), {"test": 5})
    assert out is big and _states() == kept
    assert "could not keep the initial state: 0 MiB is over its folder's limit (0 MiB)" in caplog.text
