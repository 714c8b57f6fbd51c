"""`python -m fcn.export`: artifacts that reload without the model code and agree with the JAX model."""

import json
import re
import subprocess
import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from PIL import Image
from test_inference import train_tiny

from fcn.export import load_exported, main, pad_to_multiple
from fcn.inference import load

# 37 x 29: a size never used in training (24 x 32) and not a multiple of the model's 4.
SHAPE = (2, 37, 29, 3)


@pytest.fixture(scope="session")
def workdir(tmp_path_factory):
    return train_tiny(tmp_path_factory)


def model_logits(workdir, x_BHWC):
    graphdef, state = nnx.split(load(workdir).model)
    return np.asarray(jax.jit(lambda s, x: nnx.merge(graphdef, s)(x))(state, x_BHWC))


@pytest.mark.parametrize("mode", ["reflect", "symmetric", "edge", "wrap", "constant"])
def test_symbolic_padding_equals_jnp_pad(mode):
    for n in range(1, 9):
        x = jnp.arange(n * 2, dtype=jnp.float32).reshape(1, n, 2, 1) + 1
        expected = jnp.pad(x, ((0, 0), (0, -n % 4), (0, 2), (0, 0)), mode=mode)
        np.testing.assert_array_equal(pad_to_multiple(x, 4, mode), expected)


def test_stablehlo_reloads_without_the_model_code(workdir, tmp_path):
    out = tmp_path / "exported"
    assert main(["--workdir", workdir, "--out", str(out), "--no_saved_model"]) == 0
    x = np.random.default_rng(0).random(SHAPE, np.float32)
    np.save(tmp_path / "x.npy", x)
    # A fresh interpreter with jax and numpy only: no fcn on the path, nothing of the model imported.
    script = (
        "import sys, numpy as np\n"
        "from jax import export\n"
        "exp = export.deserialize(bytearray(open('exported/model.jax', 'rb').read()))\n"
        "np.save('y.npy', np.asarray(exp.call(np.load('x.npy'))))\n"
        "assert not any(m == 'fcn' or m.startswith('fcn.') or m.startswith('flax') for m in sys.modules)\n"
    )
    subprocess.run([sys.executable, "-c", script], cwd=tmp_path, check=True, env={"JAX_PLATFORMS": "cpu"})
    expected = model_logits(workdir, x)
    np.testing.assert_allclose(np.load(tmp_path / "y.npy"), expected, atol=1e-5)

    exported = load_exported(out)
    assert [str(d) for d in exported.exported.in_avals[0].shape] == ["b", "h", "w", "3"]
    assert exported.class_names == ("background", "circle", "square", "triangle")
    image = (x[0] * 255).astype(np.uint8)
    np.testing.assert_array_equal(exported.predict(image), load(workdir).predict(image))
    meta = json.loads((out / "model.json").read_text())
    assert meta["palette"] == load(workdir).palette.tolist()


@pytest.mark.filterwarnings("ignore:.*tf.lite.Interpreter is deprecated:UserWarning")
def test_tf_saved_model_and_tflite_match_the_jax_model(workdir, tmp_path):
    tf = pytest.importorskip("tensorflow", reason="tensorflow is not installed: no SavedModel to test")
    out = tmp_path / "exported"
    assert main(["--workdir", workdir, "--out", str(out), "--tflite_size", "20,30"]) == 0
    x = np.random.default_rng(1).random(SHAPE, np.float32)
    serve = tf.saved_model.load(str(out / "saved_model")).signatures["serving_default"]
    logits = serve(images=tf.constant(x))["logits"].numpy()
    np.testing.assert_allclose(logits, model_logits(workdir, x), atol=1e-5)

    interpreter = tf.lite.Interpreter(model_path=str(out / "model.tflite"))
    interpreter.allocate_tensors()
    x1 = np.random.default_rng(2).random((1, 20, 30, 3), np.float32)
    interpreter.set_tensor(interpreter.get_input_details()[0]["index"], x1)
    interpreter.invoke()
    tflite = interpreter.get_tensor(interpreter.get_output_details()[0]["index"])
    np.testing.assert_allclose(tflite, model_logits(workdir, x1), atol=1e-4)


def test_a_model_that_resizes_its_input_exports_for_one_size(tmp_path):
    """input_scale < 1 (configs/camvid_cpu.py): the resize needs concrete sizes, so the export asks for
    --size; exported for one size (any batch), it gives the model's own logits and refuses other sizes."""
    from fcn.export import export_model
    from fcn.model import UNet

    model = UNet(num_classes=3, features=4, depth=2, input_scale=0.5, rngs=nnx.Rngs(0))
    model.eval()
    info = {"class_names": ("a", "b", "c"), "palette": [[0, 0, 0], [1, 1, 1], [2, 2, 2]]}
    with pytest.raises(ValueError, match=r"--size H,W"):
        export_model(model, tmp_path / "any", info, saved_model=False)
    assert not (tmp_path / "any" / "model.jax").exists()

    export_model(model, tmp_path / "fixed", info, saved_model=False, size=(20, 30))
    exported = load_exported(tmp_path / "fixed")
    assert exported.size == (20, 30)
    assert [str(d) for d in exported.exported.in_avals[0].shape] == ["b", "20", "30", "3"]
    graphdef, state = nnx.split(model)
    for batch in (1, 3):  # the batch stays symbolic
        x = np.random.default_rng(batch).random((batch, 20, 30, 3), np.float32)
        expected = np.asarray(jax.jit(lambda s, x: nnx.merge(graphdef, s)(x))(state, x))
        np.testing.assert_allclose(exported.logits(x), expected, atol=1e-5)
    with pytest.raises(ValueError, match=r"exported for 20x30 images only .*--size 20,30"):
        exported.predict(np.zeros((21, 30, 3), np.uint8))


def test_size_flag(workdir, tmp_path, capsys):
    out = tmp_path / "exported"
    assert main(["--workdir", workdir, "--out", str(out), "--no_saved_model", "--size", "24,32"]) == 0
    exported = load_exported(out)
    assert exported.size == (24, 32)
    x = np.random.default_rng(3).random((2, 24, 32, 3), np.float32)
    np.testing.assert_allclose(exported.logits(x), model_logits(workdir, x), atol=1e-5)
    with pytest.raises(SystemExit):
        main(["--workdir", workdir, "--out", str(out), "--size", "24"])
    assert "--size='24': expected H,W" in capsys.readouterr().err


def test_tf_saved_model_for_one_size(tmp_path):
    tf = pytest.importorskip("tensorflow", reason="tensorflow is not installed: no SavedModel to test")
    from fcn.export import export_model
    from fcn.model import UNet

    model = UNet(num_classes=3, features=4, depth=2, input_scale=0.5, rngs=nnx.Rngs(0))
    model.eval()
    export_model(model, tmp_path, {"class_names": ("a", "b", "c")}, size=(20, 30))
    serve = tf.saved_model.load(str(tmp_path / "saved_model")).signatures["serving_default"]
    x = np.random.default_rng(4).random((2, 20, 30, 3), np.float32)
    graphdef, state = nnx.split(model)
    expected = np.asarray(jax.jit(lambda s, x: nnx.merge(graphdef, s)(x))(state, x))
    np.testing.assert_allclose(serve(images=tf.constant(x))["logits"].numpy(), expected, atol=1e-5)


def test_the_command_runs_without_python_warning_about_its_module():
    # fcn/__init__ once imported fcn.export eagerly: `python -m fcn.export` then warned on every run.
    done = subprocess.run([sys.executable, "-m", "fcn.export", "--help"], capture_output=True, text=True, check=True)
    assert "usage: python -m fcn.export" in done.stdout
    assert "RuntimeWarning" not in done.stderr, done.stderr


def test_exported_model_reads_arrays_as_the_predictor_does(workdir, tmp_path):
    """uint8, other integers in 0..255, or floats in [0, 1]: a float or int64 image in 0..255 was read
    as it stood (floats) or not divided by 255 (integers), and predicted wrongly without a word."""
    out = tmp_path / "exported"
    assert main(["--workdir", workdir, "--out", str(out), "--no_saved_model"]) == 0
    exported = load_exported(out)
    image = np.random.default_rng(5).integers(0, 256, (13, 17, 3), dtype=np.uint8)
    expected = exported.logits(image)
    np.testing.assert_array_equal(exported.logits(image.astype(np.int64)), expected)
    np.testing.assert_allclose(exported.logits(image / 255.0), expected, atol=1e-5)
    Image.fromarray(image).save(tmp_path / "image.png")
    np.testing.assert_array_equal(exported.logits(tmp_path / "image.png"), expected)  # a path, as fcn.load's
    np.testing.assert_array_equal(exported.logits([image, image])[1], expected)  # a list is a batch
    for bad, words in [
        (image.astype(np.float32), "float values in [0, 255]"),
        (image.astype(np.int16) + 256, "int16 values in 256..511"),
        (image > 0, "dtype bool"),
        ([image, image[:5]], "images of sizes 13x17, 5x17: one call takes images of one size"),
    ]:
        with pytest.raises(ValueError, match=re.escape(words)):
            exported.predict(bad)


def test_an_out_that_is_a_file_is_an_error(workdir, tmp_path, capsys):
    (tmp_path / "notes.txt").write_text("not a folder")
    assert main(["--workdir", workdir, "--out", str(tmp_path / "notes.txt"), "--no_saved_model"]) == 1
    assert f"--out {tmp_path / 'notes.txt'}: {tmp_path / 'notes.txt'} is a file" in capsys.readouterr().err
    assert (tmp_path / "notes.txt").read_text() == "not a folder"


def test_an_empty_out_is_refused_not_taken_for_the_current_folder(workdir, tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)  # --out="$OUT" with OUT unset: Path("") is "."
    assert main(["--workdir", workdir, "--out", "", "--no_saved_model"]) == 1
    assert "error: --out is an empty path; name a folder for the outputs" in capsys.readouterr().err
    assert list(tmp_path.iterdir()) == []


def test_constant_padding_exports_the_model_own_logits(tmp_path):
    """The export pads images before the model as the model pads them: zeros are black, not the mean."""
    from fcn.export import export_model
    from fcn.model import UNet

    model = UNet(num_classes=3, features=4, depth=2, pad_mode="constant", rngs=nnx.Rngs(0))
    model.eval()
    export_model(model, tmp_path, {"class_names": ("a", "b", "c")}, saved_model=False)
    x = np.random.default_rng(6).random((2, 9, 11, 3), np.float32)
    graphdef, state = nnx.split(model)
    expected = np.asarray(jax.jit(lambda s, x: nnx.merge(graphdef, s)(x))(state, x))
    np.testing.assert_allclose(load_exported(tmp_path).logits(x), expected, atol=1e-5)


def test_a_new_export_replaces_every_artifact_of_the_previous_one(workdir, tmp_path):
    """A SavedModel or TFLite model left from an earlier export, beside the new model.jax, was a stale
    model a user could load without a word: they go; other files stay."""
    out = tmp_path / "exported"
    (out / "saved_model").mkdir(parents=True)
    (out / "saved_model" / "saved_model.pb").write_bytes(b"old")
    (out / "model.tflite").write_bytes(b"old")
    (out / "model.json").write_text("{}")  # theirs: an earlier export's (without it: not_ours, test_export_out.py)
    (out / "notes.txt").write_text("mine")
    assert main(["--workdir", workdir, "--out", str(out), "--no_saved_model"]) == 0
    assert sorted(p.name for p in out.iterdir()) == ["model.jax", "model.json", "notes.txt"]


def test_a_failed_export_leaves_the_previous_one_whole(workdir, tmp_path, monkeypatch, capsys):
    import fcn.export

    out = tmp_path / "exported"
    assert main(["--workdir", workdir, "--out", str(out), "--no_saved_model"]) == 0
    before = {p.name: p.read_bytes() for p in out.iterdir()}

    def disk_full(fn, out, *args):
        (out / "saved_model").mkdir()
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(fcn.export, "_export_tf", disk_full)
    monkeypatch.setattr(fcn.export, "tensorflow_available", lambda: True)  # with tensorflow or without
    assert main(["--workdir", workdir, "--out", str(out), "--size", "24,32"]) == 1
    assert "No space left on device" in capsys.readouterr().err
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before  # no new model.jax, no staging folder left
    assert load_exported(out).size is None
    (out / "model.json").unlink()  # as an interrupted swap leaves it: refused, not half-loaded
    with pytest.raises(FileNotFoundError, match=r"model\.json not found: .* did that export finish"):
        load_exported(out)


def test_a_damaged_export_is_refused_naming_its_file(workdir, tmp_path):
    out = tmp_path / "exported"
    assert main(["--workdir", workdir, "--out", str(out), "--no_saved_model"]) == 0
    good = (out / "model.jax").read_bytes()
    damaged = bytearray(good)
    damaged[len(good) // 2 : len(good) // 2 + 64] = bytes(64)  # the same length, changed inside
    (out / "model.jax").write_bytes(bytes(damaged))
    with pytest.raises(ValueError, match=r"model\.jax does not match the SHA-256 in model\.json: damaged"):
        load_exported(out)
    meta = json.loads((out / "model.json").read_text())
    del meta["sha256"]  # as an export from before the checksum
    (out / "model.json").write_text(json.dumps(meta))
    (out / "model.jax").write_bytes(good[:100])
    with pytest.raises(ValueError, match=r"model\.jax cannot be read by jax\.export"):
        load_exported(out)
    (out / "model.jax").write_bytes(good)
    assert load_exported(out).class_names  # an export without the checksum still loads
    (out / "model.json").write_text('{"class_names": ')
    with pytest.raises(ValueError, match=r"model\.json is damaged or not fcn's \(JSONDecodeError"):
        load_exported(out)


def with_config(workdir, tmp_path, edit) -> str:
    """A copy of the tiny workdir as if trained with `edit(config)`'s settings (the same weights)."""
    import shutil

    copy = tmp_path / "run"
    shutil.copytree(workdir, copy)
    config = json.loads((copy / "config.json").read_text())
    edit(config)
    (copy / "config.json").write_text(json.dumps(config))
    return str(copy)


def test_exported_model_shrinks_images_to_max_size_as_the_predictor_does(workdir, tmp_path, capsys):
    """ExportedModel ran images larger than data.max_size at full size, which fcn.load's predictor
    shrinks first (as training did): the two disagreed on every such image."""
    run = with_config(workdir, tmp_path, lambda c: c["data"].update(max_size=16))
    seg, out = load(run), tmp_path / "exported"
    assert main(["--workdir", run, "--out", str(out), "--no_saved_model"]) == 0
    exported = load_exported(out)
    image = np.random.default_rng(7).integers(0, 256, (37, 29, 3), dtype=np.uint8)
    np.testing.assert_array_equal(exported.predict(image), seg.predict(image))
    np.testing.assert_allclose(exported.predict_proba(image), seg.predict_proba(image), atol=1e-5)

    # For one size: the size the model runs at, which the command names when given the image's.
    assert main(["--workdir", run, "--out", str(out), "--no_saved_model", "--size", "24,32"]) == 1
    assert "--size 24,32: the model was trained with data.max_size=16" in capsys.readouterr().err
    assert main(["--workdir", run, "--out", str(out), "--no_saved_model", "--size", "12,16"]) == 0
    image = np.random.default_rng(8).integers(0, 256, (24, 32, 3), dtype=np.uint8)
    np.testing.assert_array_equal(load_exported(out).predict(image), seg.predict(image))


def test_a_run_with_eval_hflip_exports_the_predictor_own_logits(workdir, tmp_path):
    """fcn.load's predictor averages with the mirror image when the run has eval_hflip; the export did not,
    so the exported model predicted otherwise. The artifact itself averages now (model.json: "hflip")."""
    run = with_config(workdir, tmp_path, lambda c: c.update(eval_hflip=True))
    seg, out = load(run), tmp_path / "exported"
    assert seg.hflip
    assert main(["--workdir", run, "--out", str(out), "--no_saved_model"]) == 0
    exported = load_exported(out)
    image = np.random.default_rng(9).integers(0, 256, (21, 30, 3), dtype=np.uint8)
    np.testing.assert_allclose(exported.predict_proba(image), seg.predict_proba(image), atol=1e-5)
    assert json.loads((out / "model.json").read_text())["hflip"] is True
    assert main(["--workdir", workdir, "--out", str(out), "--no_saved_model", "--hflip"]) == 0  # as fcn.predict's
    np.testing.assert_allclose(load_exported(out).logits(image), exported.logits(image), atol=1e-5)


def test_an_unknown_platform_is_a_usage_error(workdir, tmp_path, capsys):
    """--platforms gpu ended in a RuntimeError's traceback, --platforms cpu,bogus in jax2tf's words under
    the workdir's name, after the model was loaded."""
    for value, words in [("gpu", "unknown 'gpu'"), ("cpu,bogus", "unknown 'bogus'")]:
        with pytest.raises(SystemExit) as exit_:
            main(["--workdir", workdir, "--out", str(tmp_path / "out"), "--platforms", value])
        assert exit_.value.code == 2
        assert (
            f"--platforms={value!r}: {words}; expected a comma-separated subset of cpu, cuda" in capsys.readouterr().err
        )
    assert not (tmp_path / "out").exists()


def test_a_bad_workdir_is_reported_without_importing_tensorflow(tmp_path):
    """The check for tensorflow imported it (seconds, and its log lines) before the workdir was read."""
    script = (
        "import sys\nfrom fcn.export import main\n"
        f"assert main(['--workdir', {str(tmp_path / 'none')!r}, '--out', {str(tmp_path / 'out')!r}]) == 1\n"
        "assert 'tensorflow' not in sys.modules\n"
    )
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    assert "config.json not found" in done.stderr


# An export that stops inside its staging folder: prints the folder, then waits to be killed.
STUCK_EXPORT = """
import sys, time
import fcn.export

def write(fn, staging, *args):
    (staging / "model.jax").write_bytes(b"half an export")
    print(staging, flush=True)
    time.sleep(300)

fcn.export._write_artifacts = write
fcn.export._export_model(None, sys.argv[1], {}, None, False, None, None)
"""


def test_the_next_export_removes_staging_folders_of_killed_exports_only(tmp_path, monkeypatch):
    """A SIGKILLed export left its .fcn-export-* folder in --out forever. The next export removes the
    folders no live process holds, and nothing else: not a live export's, not other files of the name."""
    import os
    import signal

    import fcn.export

    out = tmp_path / "exported"
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    stuck = [
        subprocess.Popen([sys.executable, "-c", STUCK_EXPORT, str(out)], stdout=subprocess.PIPE, text=True, cwd=root)
        for _ in range(2)
    ]
    try:
        killed, live = [Path(p.stdout.readline().strip()) for p in stuck]
        assert killed.is_dir() and live.is_dir() and killed.name.startswith(".fcn-export-")
        stuck[0].send_signal(signal.SIGKILL)
        stuck[0].wait()
        # Not fcn's: a file and a link of the name, and a folder of the name with a file of its own.
        (out / ".fcn-export-notes").write_text("mine")
        elsewhere = tmp_path / "elsewhere"
        elsewhere.mkdir()
        (elsewhere / "keep.txt").write_text("mine")
        (elsewhere / ".fcn-staging-owner").write_text("pid 1")
        (out / ".fcn-export-link").symlink_to(elsewhere)
        (out / ".fcn-export-mine").mkdir()
        (out / ".fcn-export-mine" / "keep.txt").write_text("mine")

        def write(fn, staging, *args):
            (staging / "model.jax").write_bytes(b"artifact")
            (staging / "model.json").write_text("{}")
            return ["model.jax", "model.json"]

        monkeypatch.setattr(fcn.export, "_write_artifacts", write)
        fcn.export._export_model(None, out, {}, None, False, None, None)
        assert not killed.exists()
        assert live.is_dir() and (live / "model.jax").read_bytes() == b"half an export"
        assert sorted(p.name for p in out.iterdir()) == sorted(
            [live.name, ".fcn-export-link", ".fcn-export-mine", ".fcn-export-notes", "model.jax", "model.json"]
        )
        assert sorted(p.name for p in elsewhere.iterdir()) == [".fcn-staging-owner", "keep.txt"]
        assert (out / ".fcn-export-mine" / "keep.txt").exists() and (out / "model.jax").read_bytes() == b"artifact"
    finally:
        for p in stuck:
            p.kill()
            p.wait()
