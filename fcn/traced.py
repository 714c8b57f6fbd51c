"""The training step traced and lowered once, kept in fcn's cache folder (jax.export), for warm starts.

JAX's persistent compilation cache saves compiling the step, but not tracing
and lowering it, which each start still paid: 1.3-1.7 s of a 6 s warm start of
`make train` on 2 cores, in one Python thread. `TracedStep` keeps the step as
a serialized `jax.export.Exported` (StableHLO; 135 KB for configs/camvid_cpu.py) in
`<cache root>/traced/`, and a later process deserializes it (10 ms) and lowers
only the call to it (0.5 s); the compiled program is then the one the
compilation cache already holds. Measured: docs/benchmarks.md.

The key covers everything the traced program depends on: the whole config and
the step's other arguments, the shapes and types of every input and the state's
structure, the source of every fcn module, the versions of jax, jaxlib, flax,
optax and numpy, every jax configuration value, the backend and its devices,
whether oneDNN's convolutions are in use and, if so, which build of them and
which implementations oneDNN picks on this CPU, and the FCN_, JAX_ and XLA_
environment variables. Change any one and the entry is not found, so a stale
program is never run; and a process whose fcn source files changed after it
imported fcn neither keeps nor reads entries (its code is no longer what the
files say). An entry that cannot be read, or whose checksum (a CRC-32, kept with every entry of
the cache folder: fcn/data/cache.py) does not match its contents, is logged, deleted and traced
afresh; entries are written to a temporary file and renamed into place; the folder is trimmed to
its 256 MiB, least recently used first (an entry larger than that is not kept). Only for one
process on one device (the program is exported for one); a step that
`jax.export` refuses runs as a plain jit, with a warning. `FCN_TRACE_CACHE=0`
turns it off.

`kept_state` does the same for the initial state (train.py's `fcn.state.create(...,
keep=True)`): creating it still took 1.3-1.4 s of a warm start (tracing the
hundred initialisers, lowering them, loading the compiled program), and its
values depend only on the config, the class count and the fingerprint. They are
kept in `<cache root>/initial/` (23 MB for configs/camvid_cpu.py: parameters
and Adam's moments; a JSON header and raw arrays, nothing pickled) and read back
as fresh arrays, bit for bit the same, into the structure that `jax.eval_shape`
gives without computing anything (0.1-0.3 s), once their checksum matches (a state with a flipped
byte was read back as it was, and trained from); trimmed to 1 GiB (a larger state is not kept).
"""

from __future__ import annotations

import functools
import hashlib
import json
import logging
import os
from pathlib import Path

import jax
import numpy as np

from fcn import onednn, sources
from fcn.data import cache

logger = logging.getLogger(__name__)

_SUFFIX = ".jaxexport"
_LIMIT_BYTES = 256 * 2**20


def folder() -> Path:
    return cache.cache_root() / "traced"


def enabled() -> bool:
    """One process, one device, fcn's source files as this process imported them, and not turned off
    with FCN_TRACE_CACHE=0."""
    if os.environ.get("FCN_TRACE_CACHE", "1") == "0" or jax.process_count() != 1 or jax.device_count() != 1:
        return False
    return _source_as_imported()


def _source_as_imported() -> bool:
    """Whether fcn's source files are as they were when this process imported fcn. Keys name the
    files' contents; a program traced from the code in memory, older than the files, was kept under
    the newer files' key, and every later process with the newer code ran the older program."""
    global _warned_source_changed
    if sources.unchanged():
        return True
    if not _warned_source_changed:
        _warned_source_changed = True
        logger.warning(
            "fcn's source files changed since this process imported fcn: the training step and initial state "
            "are neither kept in nor read from %s by this process (a new process keeps them again)",
            cache.cache_root(),
        )
    return False


_warned_source_changed = False  # logged once per process


def enable_compilation_cache() -> str:
    """Persist XLA compilations in fcn's cache folder (or FCN_JAX_CACHE), so that a second run of a
    command (train.py, fcn.evaluate, fcn.predict) starts without recompiling; returns the folder."""
    cache_dir = os.environ.get("FCN_JAX_CACHE") or str(cache.cache_root() / "jax")
    jax.config.update("jax_compilation_cache_dir", cache_dir)
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.0)
    jax.config.update("jax_persistent_cache_min_entry_size_bytes", 0)
    return cache_dir


@functools.cache
def _source_digest() -> str:
    h = hashlib.sha256()
    for p in sources.files():
        h.update(str(p.relative_to(sources.PACKAGE)).encode() + b"\0" + p.read_bytes())
    return h.hexdigest()


def fingerprint(uses_onednn: bool) -> dict:
    """What a traced program depends on beyond its own arguments (see the module docstring)."""
    import flax
    import jaxlib
    import optax

    return {
        "versions": [jax.__version__, jaxlib.__version__, flax.__version__, optax.__version__, np.__version__],
        "fcn": _source_digest(),
        "jax_config": sorted((k, repr(v)) for k, v in jax.config.values.items()),
        "backend": [jax.default_backend(), [d.device_kind for d in jax.devices()]],
        # Loading oneDNN registers its handlers, which the deserialized program calls; which library and
        # implementations (the CPU's instructions) decide sizes traced into it (bn_relu's workspace).
        "onednn": onednn.identity() if uses_onednn and jax.default_backend() == "cpu" else None,
        # Whether bfloat16 convolutions went to oneDNN when traced (the CPU's instructions decide).
        "onednn_bf16": uses_onednn and jax.default_backend() == "cpu" and onednn.supports(jax.numpy.bfloat16),
        "env": sorted((k, v) for k, v in os.environ.items() if k.startswith(("FCN_", "JAX_", "XLA_"))),
    }


def _path(key: str) -> Path:
    return folder() / f"{key}{_SUFFIX}"


def load(key: str):
    """The Exported stored under `key`, or None (not there; unreadable: then deleted)."""
    return cache.read_entry(_path(key), _read_exported, "traced step", "tracing it again")


def _read_exported(path: Path):
    """The program in an entry whose checksum `cache.read_entry` has checked: jax.export checks the
    outer structure only, and a byte changed inside the StableHLO was deserialized without
    complaint; the first step then failed ("Failed to deserialize StableHLO") or ran the changed
    program."""
    from jax import export

    return export.deserialize(bytearray(path.read_bytes()[: cache.payload_bytes(path)]))


def save(key: str, exported) -> bool:
    """Stores `exported` under `key` atomically; False where the disk refused (logged), which costs
    the next start its tracing. Also False where jax cannot serialize (the flatbuffers package,
    which jax does not require, missing): the step still runs, traced at every start."""
    try:
        data = exported.serialize()
    except ImportError as e:
        logger.warning("could not keep the traced step (%s); tracing it at every start", e)
        return False
    return cache.write_entry(
        _path(key), lambda f: f.write(data), _LIMIT_BYTES, "could not keep the traced step", size=len(data)
    )


class TracedStep:
    """fn(state, *batch) -> (new state, outputs) under jax.jit, traced once per key and machine.

    fn must return a state of the same structure as it is given, and outputs
    that are plain dicts, lists or tuples of arrays. `plain` is the same step
    under jax.jit, used where the cache is off or does not apply (another
    batch shape, several devices). `key`: JSON-able, everything fn depends on
    beyond the fingerprint; jit_kwargs and donation are those of `plain`.
    """

    def __init__(self, fn, plain, key, *, uses_onednn: bool, **jit_kwargs):
        self._fn, self._plain, self._key, self._uses_onednn = fn, plain, key, uses_onednn
        self._jit_kwargs = jit_kwargs
        self._built = None  # (batch signature, jitted call of the exported step)

    def __call__(self, state, *batch):
        signature = [(tuple(np.shape(b)), str(getattr(b, "dtype", type(b)))) for b in batch]
        if self._built is None:
            self._built = (signature, self._build(state, batch) if enabled() else self._plain)
        return (self._built[1] if self._built[0] == signature else self._plain)(state, *batch)

    def _build(self, state, batch):
        from jax import export

        leaves, treedef = jax.tree.flatten(state)
        specs = [jax.ShapeDtypeStruct(np.shape(x), x.dtype) for x in [*leaves, *batch]]
        key = _digest(
            {
                "key": self._key,
                "inputs": [(s.shape, str(s.dtype)) for s in specs],
                "state": str(treedef),
                "jit": repr(sorted(self._jit_kwargs.items())),
                "fingerprint": fingerprint(self._uses_onednn),
            }
        )
        exported = load(key)
        if exported is None:

            def flat(state_leaves, *batch):
                new_state, outputs = self._fn(jax.tree.unflatten(treedef, state_leaves), *batch)
                new_leaves, new_treedef = jax.tree.flatten(new_state)
                if new_treedef != treedef:
                    raise ValueError("the step returns a state of another structure")
                return new_leaves, outputs

            checks = export_checks()
            try:
                exported = export.export(jax.jit(flat), disabled_checks=checks)(
                    specs[: len(leaves)], *specs[len(leaves) :]
                )
            except Exception as e:  # what jax.export refuses still trains: the plain step (whose errors are the step's)
                logger.warning("the training step cannot be kept traced (%s); tracing it at every start", e)
                return self._plain
            if save(key, exported):
                logger.info("training step traced and kept in %s", folder())

        def step(state, *batch):
            new_leaves, outputs = exported.call(jax.tree.leaves(state), *batch)
            return jax.tree.unflatten(treedef, new_leaves), outputs

        return jax.jit(step, donate_argnums=0, **self._jit_kwargs)


def export_checks() -> list:
    """jax.export's checks that a kept step turns off: for fcn's own custom calls, oneDNN's handlers
    and the fused head's Triton kernel (fcn.head_loss), whose stability the key's versions and
    source digest vouch for instead."""
    from jax import export

    from fcn import head_loss

    return [export.DisabledSafetyCheck.custom_call(t) for t in (*onednn.TARGETS, head_loss.TRITON_CALL)]


_STATE_SUFFIX = ".state"
_STATE_LIMIT_BYTES = 2**30


def state_folder() -> Path:
    return cache.cache_root() / "initial"


def kept_state(build, abstract, key, desc: str = "initial state"):
    """build() -> (static, tree of arrays), computed once per key and machine and kept in
    `<cache root>/initial/`; later processes read the arrays back instead (bit for bit the same).

    abstract() -> (static, the tree as jax.ShapeDtypeStruct): the same without computing it
    (jax.eval_shape); a kept entry must match its structure, shapes and dtypes. `key`: JSON-able,
    all that build depends on beyond `fingerprint`. Arrays come back as fresh device arrays on
    the default device, never views of the file. Used where `enabled()`; an entry that cannot be
    read, is damaged (its checksum: `cache.read_entry`) or does not match is logged, deleted and
    built afresh; the folder is trimmed to 1 GiB, and a state larger than that is not kept.
    Nothing is pickled: the file holds a JSON header and raw arrays. A tree with weakly typed
    leaves is not kept (the file would bring them back strongly typed).
    """
    if not enabled():
        return build()
    digest = _digest({"key": key, "fingerprint": fingerprint(False)})
    path = state_folder() / f"{digest}{_STATE_SUFFIX}"
    if path.exists():  # the structure is traced only to read an entry back
        static, shapes = abstract()
        tree = cache.read_entry(path, lambda p: _read_state(p, shapes), desc, "computing it again")
        if tree is not None:
            return static, tree
    static, tree = build()
    _write_state(path, tree, desc)
    return static, tree


def _digest(obj) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True, default=repr).encode()).hexdigest()[:32]


def _layout(leaf) -> list:
    """[shape, dtype name, whether a PRNG key] of an array or ShapeDtypeStruct leaf."""
    if jax.dtypes.issubdtype(leaf.dtype, jax.dtypes.prng_key):
        return [list(leaf.shape), str(leaf.dtype), True]
    return [list(leaf.shape), jax.numpy.dtype(leaf.dtype).name, False]


def _write_state(path: Path, tree, desc: str) -> None:
    leaves, treedef = jax.tree.flatten(tree)
    if any(getattr(x, "weak_type", False) for x in leaves):  # a weak type would not survive the file
        logger.info("%s not kept: it has weakly typed leaves", desc)
        return
    layout = [_layout(x) for x in leaves]
    impls = [str(jax.random.key_impl(x)) if key_type else None for x, (_, _, key_type) in zip(leaves, layout)]
    header = {"format": 2, "treedef": str(treedef), "leaves": layout, "impls": impls}
    data = [np.asarray(jax.random.key_data(x) if impl else x) for x, impl in zip(leaves, impls)]

    def write(f):
        np.save(f, np.frombuffer(json.dumps(header).encode(), np.uint8), allow_pickle=False)
        for a in data:  # as bytes: any dtype (bfloat16 too) and shape round-trips through the layout
            np.save(f, np.ascontiguousarray(a).reshape(-1).view(np.uint8), allow_pickle=False)

    size = sum(a.nbytes for a in data)
    if cache.write_entry(path, write, _STATE_LIMIT_BYTES, f"could not keep the {desc}", size=size):
        logger.info("%s kept in %s (FCN_TRACE_CACHE=0 turns this off)", desc, path.parent)


def _read_state(path: Path, shapes):
    """The tree kept in `path`, which must have the structure, shapes and dtypes of `shapes`."""
    header, *data = cache.map_arrays(path)
    header = json.loads(header.tobytes())
    expected, treedef = jax.tree.flatten(shapes)
    if header.get("treedef") != str(treedef) or header.get("leaves") != [_layout(x) for x in expected]:
        raise ValueError("another structure, shape or dtype than the state's")
    if len(data) != len(expected):
        raise ValueError(f"{len(data)} arrays for {len(expected)} leaves")
    leaves = []
    for d, x, impl in zip(data, expected, header["impls"]):
        raw = jax.eval_shape(jax.random.key_data, x) if impl else x  # a key's raw words
        a = jax.device_put(np.array(d.view(raw.dtype).reshape(raw.shape)))  # a private, writable copy:
        leaves.append(jax.random.wrap_key_data(a, impl=impl) if impl else a)  # the step donates the state
    return jax.tree.unflatten(treedef, leaves)
