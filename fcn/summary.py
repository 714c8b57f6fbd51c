"""`summary(model, input_shape)`: per-layer output shape, parameters and FLOPs as a table.

FLOPs are XLA's cost analysis of each layer's forward call (as `nnx.tabulate`
computes them), for the given input shape, with XLA's own convolutions whatever
the model's conv_impl, and the model in training mode whatever its mode; the total
row is the whole forward pass, including padding, pooling and concatenation. Every conv and
norm has a row, so the rows' parameters add up to the total; a batch norm's FLOPs include the
ReLU it is fused with in training mode (fcn.norm.batch_norm_train). A summary that fails (a shape
the model refuses) raises the model's error and leaves every model working (`_tabulate`).
"""

from __future__ import annotations

import inspect

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from fcn import ops
from fcn.norm import Norm

_LEAVES = (nnx.Conv, nnx.ConvTranspose, nnx.BatchNorm, nnx.GroupNorm)


def _count(module) -> int:
    return sum(int(np.prod(p.shape)) for p in jax.tree.leaves(nnx.state(module, nnx.Param)))


def _human(n: float) -> str:
    for unit, scale in (("G", 1e9), ("M", 1e6), ("K", 1e3)):
        if abs(n) >= scale:
            return f"{n / scale:.2f}{unit}"
    return f"{n:.0f}"


def _with_values(model: nnx.Module) -> nnx.Module:
    """`model` itself, or for an abstract one (`nnx.eval_shape(lambda: UNet(...))`) a copy holding zeros.

    Shapes are all a summary needs; an abstract model skips the initialisers,
    which on CPU cost about a second of compilation each.
    """
    graphdef, state = nnx.split(model)
    if not any(isinstance(x, jax.ShapeDtypeStruct) for x in jax.tree.leaves(state)):
        return model

    def zeros(x):
        if not isinstance(x, jax.ShapeDtypeStruct):
            return x
        if jax.dtypes.issubdtype(x.dtype, jax.dtypes.prng_key):
            return jax.random.wrap_key_data(np.zeros((*x.shape, 2), np.uint32))
        return np.zeros(x.shape, x.dtype)

    return nnx.merge(graphdef, jax.tree.map(zeros, state))


def _xla_convs(model: nnx.Module) -> nnx.Module:
    """A copy of `model` in training mode whose convolutions are XLA's own. oneDNN's (conv_impl
    "auto" or "onednn" on a CPU, fcn/ops.py) are custom calls, whose FLOPs XLA's cost analysis does
    not count: a network of 4.2 GFLOPs came out at 0.01. In inference mode batch norm is folded
    into the conv before it (fcn.norm.conv_bias_relu), which calls no conv module: the table kept
    only the transposed convs and the head."""
    model = nnx.merge(*nnx.split(model))
    model.train()
    for _, module in nnx.iter_graph(model):
        if isinstance(module, nnx.Conv | ops.ConvTranspose):
            module.conv_general_dilated = jax.lax.conv_general_dilated
    return model


def _tabulate(model: nnx.Module, *args, **kwargs):
    """nnx.tabulate, with the methods of the model's classes put back whatever happens.

    nnx.tabulate replaces them, on the classes, with wrappers that record each call, and puts them
    back only when the model's call returns: after one that raised (`summary(model, (360, 480, 3))`,
    no batch axis) every later UNet(...), and every call of a model, failed with "'List' object has
    no attribute '_nnx_tabulate_id'" until the Python process (a notebook's kernel) restarted.
    """
    saved = {}
    for _, node in nnx.iter_graph(model):
        if isinstance(node, nnx.Pytree) and type(node) not in saved:
            cls = type(node)
            saved[cls] = {name: vars(cls).get(name) for name, _ in inspect.getmembers(cls, inspect.isfunction)}
    try:
        return nnx.tabulate(model, *args, **kwargs)
    finally:
        for cls, methods in saved.items():
            for name, method in methods.items():
                if method is not None:
                    setattr(cls, name, method)
                elif name in vars(cls):  # inherited before; tabulate set it on the class itself
                    delattr(cls, name)


def layer_rows(model: nnx.Module, input_shape) -> tuple[list[dict], dict]:
    """(rows for each conv/norm layer, totals) for a forward pass on `input_shape`.

    `model` may be abstract (from `nnx.eval_shape`): the figures depend on shapes only. They are
    the same whatever its conv_impl (each convolution is counted as XLA's own) and its mode (a
    training-mode copy is summarised; `model` is left as it is).
    """
    model = _xla_convs(_with_values(model))
    calls = []

    def record(row) -> bool:
        calls.append(row)
        return False  # we format our own table

    # rngs: for dropout, when the model is in training mode (as it is when built).
    _tabulate(model, jnp.zeros(input_shape, jnp.float32), rngs=nnx.Rngs(0), compute_flops=True, row_filter=record)
    modules = dict(nnx.iter_modules(model))
    leaves = {tuple(c.path) for c in calls if isinstance(modules.get(tuple(c.path)), _LEAVES)}
    rows, total = [], {"flops": 0, "params": _count(model)}

    def add(path, module, call):
        rows.append(
            {
                "name": "/".join(map(str, path)),
                "type": type(module).__name__,
                "output": tuple(jax.tree.leaves(call.outputs)[0].shape),
                "params": _count(module),
                "flops": call.flops or 0,
            }
        )

    for call in calls:
        path = tuple(call.path)
        module = modules.get(path)
        if not path:
            total["flops"] = call.flops or 0
            total["output"] = tuple(jax.tree.leaves(call.outputs)[0].shape)
        elif isinstance(module, Norm) and module.norm is not None and (*path, "norm") not in leaves:
            # Batch norm in training mode runs fused with its ReLU (fcn.norm.batch_norm_train), never
            # through nnx.BatchNorm's own call: its row is the Norm's call, ReLU included.
            add((*path, "norm"), module.norm, call)
        elif isinstance(module, _LEAVES):
            add(path, module, call)
    return rows, total


def summary(model: nnx.Module, input_shape=None) -> str:
    """A table of each layer's output shape, parameters and FLOPs, with totals, for images of
    `input_shape` [B, H, W, C] (default: one 360 x 480 image of the model's in_channels)."""
    if input_shape is None:
        input_shape = (1, 360, 480, getattr(model, "in_channels", 3))
    rows, total = layer_rows(model, tuple(input_shape))
    width = max(len(r["name"]) for r in rows) if rows else 10
    head = f"{'layer':<{width}}  {'type':<13} {'output':<22} {'params':>9} {'FLOPs':>9}"
    lines = [head, "-" * len(head)]
    for r in rows:
        lines.append(
            f"{r['name']:<{width}}  {r['type']:<13} {str(r['output']):<22} {r['params']:>9,} {_human(r['flops']):>9}"
        )
    lines += [
        "-" * len(head),
        f"{'total':<{width}}  {'UNet':<13} {str(total.get('output')):<22} "
        f"{total['params']:>9,} {_human(total['flops']):>9}",
    ]
    return "\n".join(lines)
