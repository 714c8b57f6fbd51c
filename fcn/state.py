"""The training state: model graph, parameters, optimizer, and the pure steps over them.

NNX modules are split once into a static graph definition and array state;
the steps below are plain functions of arrays, jitted once with the state
donated (the pattern of Flax's performance guide), so nothing Python-side runs
per step.
"""

from __future__ import annotations

import dataclasses
import math
import os
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

from fcn import head_loss, losses, metrics, ops
from fcn.data import pipeline
from fcn.model import UNet, from_config, run_once_compiler_options

State = dict[str, Any]  # {"step", "params", "rest", "opt_state", "ema"}


@dataclasses.dataclass(frozen=True)
class Graphs:
    """Static graph definitions of the model in training and in evaluation mode."""

    train: Any
    eval: Any


def learning_rate_schedule(config) -> optax.Schedule:
    """Linear warmup to the peak rate, then cosine decay to 0 at `num_steps` (or constant)."""
    opt = config.optimizer
    if opt.schedule == "cosine" and not opt.warmup_steps:  # the peak at step 0, as the constant schedule's
        return optax.cosine_decay_schedule(opt.learning_rate, config.num_steps)
    if opt.schedule == "cosine":
        return optax.warmup_cosine_decay_schedule(
            0.0, opt.learning_rate, opt.warmup_steps, max(config.num_steps, opt.warmup_steps + 1)
        )
    if opt.schedule == "constant":
        return optax.join_schedules(
            [
                optax.linear_schedule(0.0, opt.learning_rate, max(opt.warmup_steps, 1)),
                optax.constant_schedule(opt.learning_rate),
            ],
            [opt.warmup_steps],
        )
    raise ValueError(f"optimizer.schedule={opt.schedule!r}: expected 'cosine' or 'constant'")


def make_optimizer(config) -> optax.GradientTransformation:
    """AdamW (or SGD with momentum) on the schedule, with optional global-norm clipping.

    Weight decay skips biases and norm scales (1-D parameters).
    """
    opt = config.optimizer
    lr = learning_rate_schedule(config)
    decay_mask = lambda params: jax.tree.map(lambda p: p.ndim > 1, params)  # noqa: E731
    if opt.name == "adamw":
        tx = optax.adamw(lr, weight_decay=opt.weight_decay, mask=decay_mask)
    elif opt.name == "sgd":
        tx = optax.chain(optax.add_decayed_weights(opt.weight_decay, decay_mask), optax.sgd(lr, momentum=opt.momentum))
    else:
        raise ValueError(f"optimizer.name={opt.name!r}: expected 'adamw' or 'sgd'")
    if opt.grad_clip > 0:
        tx = optax.chain(optax.clip_by_global_norm(opt.grad_clip), tx)
    return tx


def _initialiser(config, num_classes: int):
    """(init, tx, graphs): init() -> State builds the model and optimizer state; graphs() after it ran."""
    tx = make_optimizer(config)
    graphs = []

    def init() -> State:
        model = from_config(config.model, num_classes, rngs=nnx.Rngs(config.seed))
        graph_train, params, rest = nnx.split(model, nnx.Param, ...)
        model.eval()
        graph_eval, _, _ = nnx.split(model, nnx.Param, ...)
        graphs.append(Graphs(graph_train, graph_eval))
        return {
            "step": jnp.zeros((), jnp.int32),
            "params": params,
            "rest": rest,
            "opt_state": tx.init(params),
            "ema": params if config.optimizer.ema_decay > 0 else None,
        }

    return init, tx, lambda: graphs[-1]


def create(
    config, num_classes: int, *, keep: bool = False, abstract=None
) -> tuple[Graphs, State, optax.GradientTransformation]:
    """Initialise the model and optimizer state from `config.seed`.

    keep: compute it once per config and machine, and read it back from fcn's
    cache folder in later processes (fcn.traced.kept_state; what train.py does).
    abstract: `abstract_state(config, num_classes)` where the caller has it
    already (train.py, which has its size checked first): not traced again.
    A warm start of configs/camvid_cpu.py then traces its structure
    (jax.eval_shape, 0.1-0.3 s) and reads the values back (0.06 s) instead of
    tracing, lowering, loading and running the compiled initialiser (1.3-1.4 s).

    Under one jax.jit: one compilation, and one persistent-cache entry to load
    on later runs, instead of one per initialiser (about a hundred, which made
    creating the state 2-3 s of a warm start on 2 cores). On CPU that program
    is compiled without LLVM's optimisation: it runs once, and optimising its
    random-number and inverse-erf code took most of a cold start's state
    creation (configs/camvid_cpu.py on 2 cores: 7.9 s at -O2, 2.5 s at -O0).
    The values equal those of building the model eagerly (whose initialisers
    are compiled the same way, fcn.model.eager_fast) bit for bit, and differ
    from an optimised build's in rounding only (at most 4.5e-8 there).
    """
    init, tx, graphs = _initialiser(config, num_classes)

    def build():
        state = jax.jit(init, compiler_options=run_once_compiler_options())()
        return graphs(), state

    if keep:
        from fcn import traced

        key = {"init": config.to_json(), "num_classes": num_classes}
        shapes = (lambda: abstract[:2]) if abstract else (lambda: abstract_state(config, num_classes)[:2])
        built = traced.kept_state(build, shapes, key)
    else:
        built = build()
    return *built, tx


def abstract_state(config, num_classes: int, *, workdir=None) -> tuple[Graphs, State, optax.GradientTransformation]:
    """Shapes and dtypes of the state, without computing it (for restoring, and for its size).

    A ConfigError (`check_fits`) when the state alone cannot fit in the device's
    memory; workdir: the run whose checkpoint is to be restored, for the message.
    """
    init, tx, graphs = _initialiser(config, num_classes)
    state = jax.eval_shape(init)
    check_fits(config, state, workdir, num_classes)
    return graphs(), state, tx


def state_bytes(state) -> int:
    """The bytes of a state's arrays, from `abstract_state`'s shapes (or from arrays)."""
    return sum(math.prod(x.shape) * x.dtype.itemsize for x in jax.tree.leaves(state))


def memory_limit(device=None) -> tuple[int | None, str]:
    """(bytes, what they are) that one device can hold, or (None, ...) where its backend does not say.

    A GPU's or TPU's allocator limit (memory_stats' bytes_limit). On a CPU the
    host's physical memory (or its cgroup's limit where lower), not what is
    free now: this is for refusing what can never fit, and other processes'
    memory comes and goes (a state larger than the RAM would page all of
    itself in and out at every step, were it created at all).
    """
    device = device or jax.local_devices()[0]
    if device.platform != "cpu":
        try:
            return (device.memory_stats() or {}).get("bytes_limit"), f"{device.platform.upper()}'s memory"
        except Exception:  # a backend without memory statistics
            return None, ""
    limit, what = os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE"), "host's physical memory"
    try:  # cgroup v2: "max" or a number of bytes
        cgroup = int(Path("/sys/fs/cgroup/memory.max").read_text())
    except (OSError, ValueError):
        cgroup = None
    if cgroup is not None and cgroup < limit:
        limit, what = cgroup, "cgroup's memory limit (/sys/fs/cgroup/memory.max)"
    return limit, what


def check_fits(config, shapes: State, workdir=None, num_classes: int | None = None) -> None:
    """A ConfigError when the state alone (`abstract_state`'s shapes: parameters,
    optimizer state, batch-norm statistics, an EMA copy) is larger than the
    device's memory (`memory_limit`), before anything is allocated: such a
    state either ran out of memory or, on a CPU (jaxlib 0.10.2), hung forever
    once read. Activations come on top; only the state, a hard lower bound, is
    checked here. workdir: the run being loaded (fcn.evaluate, fcn.load), else
    the state is to be created for training (train.py checks it before it
    decodes data or makes the workdir), and the message names the deepest and
    the widest network whose state would fit (with `num_classes`).
    """
    from fcn.cli import format_bytes
    from fcn.config import ConfigError

    need, (limit, what) = state_bytes(shapes), memory_limit()
    if limit is None or need <= limit:
        return
    m = config.model
    if workdir is not None:
        then = f"{workdir}'s checkpoints cannot be restored on this machine"
    else:
        fits = _fitting(config, num_classes, limit) if num_classes else []
        then = "nothing was created" + (f". The state would fit with {' or '.join(fits)}" if fits else "")
    params = format_bytes(state_bytes(shapes["params"]))
    raise ConfigError(
        f"the model's state alone needs {format_bytes(need)} (parameters {params}, "
        f"with the optimizer state, batch-norm statistics and any EMA copy), more than the {what} "
        f"({format_bytes(limit)}), with config.model.features={m.features} and config.model.depth={m.depth}: {then}"
    )


def _fitting(config, num_classes: int, limit: int) -> list[str]:
    """Flags for the deepest network at the config's width, and the widest (halving it) at its depth,
    whose state fits in `limit` bytes: abstract shapes only, tried from the config's own values down."""
    m, flags = config.model, []
    for field, values in (("depth", range(m.depth - 1, -1, -1)), ("features", [m.features >> i for i in range(1, 12)])):

        def fits(value, field=field):
            smaller = config.copy_and_resolve_references()
            setattr(smaller.model, field, value)
            return state_bytes(jax.eval_shape(_initialiser(smaller, num_classes)[0])) <= limit

        # The state grows with both, so the values that fit are a tail of the descending list: bisected,
        # a trace of each tried network (seconds for a deep one) 4 times rather than up to 11.
        values = [v for v in values if v >= (0 if field == "depth" else 1)]
        lo, hi = 0, len(values)
        while lo < hi:
            mid = (lo + hi) // 2
            lo, hi = (lo, mid) if fits(values[mid]) else (mid + 1, hi)
        if lo < len(values):
            flags.append(f"--config.model.{field}={values[lo]} (now {getattr(m, field)})")
    return flags


def eval_model(graphs: Graphs, state: State) -> UNet:
    """The model in evaluation mode with the weights to evaluate (the EMA when kept)."""
    params = state["ema"] if state.get("ema") is not None else state["params"]
    return nnx.merge(graphs.eval, params, state["rest"])


def make_train_step(config, graphs: Graphs, tx, num_classes: int, ignore_label: int, class_weights=None):
    """train_step(state, images, labels, sizes) -> (state, metrics); pure, to be jitted."""
    base_key = jax.random.key(config.seed)
    dice_weight, ema_decay = config.loss.dice_weight, config.optimizer.ema_decay
    weights = None if class_weights is None else jnp.asarray(class_weights, jnp.float32)

    fused_mode = head_loss.fused_head_mode(config)

    def train_step(state: State, images_BHWC, labels_BHW, sizes_B2):
        key = jax.random.fold_in(base_key, state["step"])
        k_aug, k_drop = jax.random.split(key)
        x_BHWC, y_BHW = pipeline.augment(k_aug, images_BHWC, labels_BHW, sizes_B2, config.augment, ignore_label)
        valid = y_BHW != ignore_label

        def loss_fn(params, rest):
            # Fresh Variables at this trace level: BatchNorm updates its statistics in place.
            model = nnx.merge(graphs.train, params, jax.tree.map(lambda v: v, rest))
            rngs = nnx.Rngs(dropout=k_drop)
            # Training data is stored at the network's scale already (pipeline.stack, stream.Stream).
            mode = head_loss.usable_mode(fused_mode, model, x_BHWC.shape)
            if mode:  # the network's end in one kernel (config.loss.fused_head)
                loss, correct = head_loss.fused_loss(
                    model, x_BHWC, y_BHW, mode, rngs=rngs, ignore_label=ignore_label, class_weights_K=weights
                )
            else:
                features_BHWC = model.features(x_BHWC, rngs=rngs, prescaled=True)
                logits_BHWK = model.logits(features_BHWC, x_BHWC.shape[1:3], x_BHWC.shape[1:3])
                loss = losses.cross_entropy(logits_BHWK, y_BHW, ignore_label=ignore_label, class_weights_K=weights)
                if dice_weight:
                    loss = loss + dice_weight * losses.soft_dice(logits_BHWK, y_BHW, ignore_label=ignore_label)
                correct = jnp.sum((jnp.argmax(logits_BHWK, -1) == y_BHW) & valid)
            _, _, rest = nnx.split(model, nnx.Param, ...)
            return loss, (rest, correct)

        (loss, (rest, correct)), grads = jax.value_and_grad(loss_fn, has_aux=True)(state["params"], state["rest"])
        updates, opt_state = tx.update(grads, state["opt_state"], state["params"])
        params = optax.apply_updates(state["params"], updates)
        ema = state["ema"]
        if ema is not None:
            # Bias-corrected, as Adam's moments (optax.ema's debias): at step t the weights of step k <= t weigh
            # (1 - d) d^(t - k) / (1 - d^t), the initial ones nothing; as d^t vanishes, d and 1 - d.
            t = (state["step"] + 1).astype(jnp.float32)
            seen = _one_less_power(ema_decay, t)
            keep, new = ema_decay * _one_less_power(ema_decay, t - 1) / seen, (1 - ema_decay) / seen
            ema = jax.tree.map(lambda e, p: keep * e + new * p, ema, params)
        out = {
            "loss": loss,
            "grad_norm": optax.tree.norm(grads),
            "train_accuracy": correct / jnp.maximum(jnp.sum(valid), 1),
        }
        new_state = {"step": state["step"] + 1, "params": params, "rest": rest, "opt_state": opt_state, "ema": ema}
        return new_state, out

    return train_step


def _one_less_power(d: float, n: jax.Array) -> jax.Array:
    """1 - d**n, to float32's precision however close d**n is to 1 (at n = 1, d = 0.999: 1 - d rounded once)."""
    return -jnp.expm1(n * math.log(d))


def jit_train_step(
    config,
    graphs: Graphs,
    tx,
    num_classes: int,
    ignore_label: int,
    class_weights=None,
    *,
    keep_traced=False,
    **jit_kwargs,
):
    """make_train_step's step under jax.jit: the state donated, compiled with the options of
    `config.model.conv_impl` for this backend (fcn.ops.train_compiler_options).

    keep_traced: trace and lower it once per machine, and keep it in fcn's cache
    folder for later processes (fcn.traced.TracedStep; what train.py does).
    """
    step = make_train_step(config, graphs, tx, num_classes, ignore_label, class_weights)
    jit_kwargs = {"compiler_options": ops.train_compiler_options(config.model.conv_impl), **jit_kwargs}
    plain = jax.jit(step, donate_argnums=0, **jit_kwargs)
    if not keep_traced:
        return plain
    from fcn import traced

    key = {
        "step": "train",
        "config": config.to_json(),
        "num_classes": num_classes,
        "ignore_label": ignore_label,
        "class_weights": None if class_weights is None else np.asarray(class_weights, np.float32).tolist(),
    }
    return traced.TracedStep(step, plain, key, uses_onednn=config.model.conv_impl in ("auto", "onednn"), **jit_kwargs)


def make_logits_step(graphs: Graphs, hflip: bool = False):
    """logits_step(state, images uint8) -> float32 logits [B, H, W, K]: what the eval step scores (with
    `hflip`, averaged with the mirror image's, as `fcn.load(...).predict(hflip=True)` averages)."""

    def logits_step(state, images_BHWC):
        model = eval_model(graphs, state)
        x_BHWC = images_BHWC.astype(jnp.float32) / 255.0
        logits_BHWK = model(x_BHWC)
        if hflip:  # test-time augmentation: average with the mirrored prediction
            logits_BHWK = 0.5 * (logits_BHWK + model(x_BHWC[:, :, ::-1])[:, :, ::-1])
        return logits_BHWK

    return logits_step


def make_eval_step(graphs: Graphs, num_classes: int, ignore_label: int, hflip: bool = False):
    """eval_step(state, images uint8, labels) -> (confusion [K, K] int32, predictions [B, H, W])."""
    logits_fn = make_logits_step(graphs, hflip)

    def eval_step(state: State, images_BHWC, labels_BHW):
        preds_BHW = jnp.argmax(logits_fn(state, images_BHWC), axis=-1).astype(jnp.uint8)
        return metrics.confusion_matrix(labels_BHW, preds_BHW, num_classes, ignore_label), preds_BHW

    return eval_step
