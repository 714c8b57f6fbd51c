"""Shared pieces of the benchmarks: flags, fcn's real training and inference steps, a timer."""

from __future__ import annotations

import argparse
import contextlib
import ctypes
import ctypes.util
import functools
import inspect
import os
import platform
import time

import numpy as np


def add_model_flags(p: argparse.ArgumentParser) -> None:
    """Flags for the problem size; the architecture defaults are configs/default.py's."""
    p.add_argument("--batch", type=int, default=4, help="images per training step")
    p.add_argument("--size", type=int, nargs=2, default=(256, 256), metavar=("H", "W"), help="image size")
    p.add_argument("--features", type=int, default=32, help="width of the first level (config.model.features)")
    p.add_argument("--depth", type=int, default=4, help="number of 2x2 poolings (config.model.depth)")
    p.add_argument("--classes", type=int, default=11, help="number of classes (CamVid: 11)")
    p.add_argument("--conv_impl", default="auto", help="fcn: config.model.conv_impl (fcn/ops.py)")
    p.add_argument("--dtype", default="float32", choices=("float32", "bfloat16"), help="fcn: compute dtype")
    p.add_argument(
        "--retain_memory",
        type=int,
        default=1,
        help="1: fcn.host_memory.retain_freed_memory() in every benchmark process (fcn and PyTorch alike)",
    )


def trees(args) -> dict[str, str]:
    """--trees as {name: absolute path}, each checked to hold an fcn package."""
    out = {}
    for item in filter(None, args.trees.split(",")):
        name, sep, path = item.partition("=")
        path = os.path.abspath(os.path.expanduser(path))
        if not sep or not name or not os.path.isfile(os.path.join(path, "fcn", "__init__.py")):
            raise SystemExit(f"--trees {item!r}: expected NAME=PATH, PATH a source tree with fcn/__init__.py")
        out[name] = path
    return out


def retain_freed_memory(enabled: bool) -> bool:
    """fcn.host_memory.retain_freed_memory()'s settings for this process, before jax or torch start threads.

    The same three mallopt calls, repeated here so that PyTorch's processes do
    not import jax (fcn.host_memory does) and pay for it in their start-up time.
    """
    if not enabled or platform.system() != "Linux" or platform.libc_ver()[0] != "glibc":
        return False
    libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
    m_trim_threshold, m_mmap_max, m_arena_max = -1, -4, -8
    return all(libc.mallopt(k, v) == 1 for k, v in ((m_mmap_max, 0), (m_trim_threshold, -1), (m_arena_max, 1)))


def fcn_config(args):
    """The default config with the benchmark's sizes."""
    try:
        from fcn.config import default_config
    except ImportError:  # older layout: configs/default.py
        from configs.default import get_config as default_config

    c = default_config()
    c.model.features, c.model.depth = args.features, args.depth
    c.model.conv_impl, c.model.dtype = args.conv_impl, args.dtype
    c.augment.crop_size = tuple(args.size)
    c.batch_size = args.batch
    c.num_steps = 1000
    if getattr(args, "fused_head", None):  # benchmarks/fused_model.py's ':head'
        c.loss.fused_head = args.fused_head
    return c


def config_file(path: str):
    """get_config() of a config file (configs/*.py), as train.py's --config reads it."""
    import importlib.util

    spec = importlib.util.spec_from_file_location("bench_config", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.get_config()


def synthetic_batch(args, seed: int = 0):
    """uint8 images [B, H, W, 3], uint8 labels [B, H, W] and sizes [B, 2], as the data pipeline gives them."""
    rng = np.random.default_rng(seed)
    h, w = args.size
    images = rng.integers(0, 256, (args.batch, h, w, 3), dtype=np.uint8)
    labels = rng.integers(0, args.classes, (args.batch, h, w), dtype=np.uint8)
    sizes = np.tile(np.array([h, w], np.int32), (args.batch, 1))
    return images, labels, sizes


def fcn_train_step(args, configure=None):
    """fcn's own jitted training step (fcn.state.make_train_step, augmentation included), state, batch.

    configure: a function that changes the benchmark's config before the step is built."""
    import jax

    from fcn import state as state_lib

    config = fcn_config(args)
    if configure is not None:
        configure(config)
    with route_upsampling(args.conv_impl):
        graphs, state, tx = state_lib.create(config, args.classes)
    step = state_lib.jit_train_step(config, graphs, tx, args.classes, 255)
    batch = tuple(jax.device_put(a) for a in synthetic_batch(args))
    return step, state, batch


def fcn_augment(args):
    """fcn's on-device augmentation of the training step alone, jitted: augment(n, images, labels, sizes)."""
    import jax

    from fcn.data import pipeline

    config = fcn_config(args)
    key = jax.random.key(config.seed)
    return jax.jit(
        lambda n, images, labels, sizes: pipeline.augment(
            jax.random.fold_in(key, n), images, labels, sizes, config.augment, 255
        )
    )


def fcn_predict(args, batch_size: int | None = None):
    """fcn's jitted inference: eval-mode model on uint8 images -> per-pixel class ids."""
    import jax
    import jax.numpy as jnp

    from fcn import state as state_lib

    config = fcn_config(args)
    with route_upsampling(args.conv_impl):
        graphs, state, _ = state_lib.create(config, args.classes)

    @jax.jit
    def predict(state, images_BHWC):
        model = state_lib.eval_model(graphs, state)
        return jnp.argmax(model(images_BHWC.astype(jnp.float32) / 255.0), axis=-1).astype(jnp.uint8)

    images = jax.device_put(synthetic_batch(args)[0][: batch_size or args.batch])
    return predict, state, images


def upsampling_wired() -> bool:
    """Whether fcn/model.py builds its transposed convs with fcn.ops.ConvTranspose (the seam)."""
    from fcn import model

    return "ops.ConvTranspose" in inspect.getsource(model)


@contextlib.contextmanager
def route_upsampling(conv_impl: str):
    """Build the model's transposed convs as fcn.ops.ConvTranspose on `conv_impl` while inside.

    A stand-in, in the benchmark process only, for the one-line change to
    fcn/model.py that routes them through the seam; a no-op once that is made.
    """
    from flax import nnx

    from fcn import model, ops

    conv = ops.conv_fn(conv_impl)
    if upsampling_wired() or conv is None or not hasattr(ops, "ConvTranspose"):
        yield
        return

    class _Nnx:
        def __getattr__(self, name):
            return getattr(nnx, name)

        ConvTranspose = functools.partial(ops.ConvTranspose, conv_general_dilated=conv)

    model.nnx = _Nnx()
    try:
        yield
    finally:
        model.nnx = nnx


def num_params(state) -> int:
    import jax

    return sum(int(np.prod(p.shape)) for p in jax.tree.leaves(state["params"]))


def timeit(fn, sync) -> float:
    """Seconds one call of fn takes, synchronised with sync(result)."""
    t = time.perf_counter()
    sync(fn())
    return time.perf_counter() - t
