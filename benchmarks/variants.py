"""benchmarks/speed.py's variants, each in a spawned process of its own: fcn (a conv_impl, from this
tree or another's with --trees) or a PyTorch variant, built and warmed up, then timed round by round
on the parent's request."""

from __future__ import annotations

import argparse
import contextlib
import gc
import os
import resource
import sys
import time

from benchmarks import common, report

_keep = contextlib.ExitStack()  # what a variant's process keeps entered until it ends


def start(args, names: list, info: dict) -> dict:
    """A spawned process per variant, built and warmed up one at a time (no variant's compilation
    slows another's): {name: (process, pipe)} of those that run; `info` gets what each reported."""
    import multiprocessing

    ctx = multiprocessing.get_context("spawn")
    workers = {}
    for name in names:
        conn, child = ctx.Pipe()
        proc = ctx.Process(target=_run, args=(child, vars(args), name), daemon=True)
        proc.start()
        child.close()  # the worker holds the only other end: its death (an abort, the OOM killer) ends recv
        try:
            status, payload = conn.recv()
        except EOFError:  # the worker died before it could say why (a crash, the OOM killer)
            proc.join()
            status, payload = "error", f"the worker process exited with code {proc.exitcode}"
        if status != "ready":  # e.g. torch.compile on a machine without a toolchain
            print(f"{name}: cannot run: {payload}", file=sys.stderr)
            proc.join()
            continue
        workers[name], info[name] = (proc, conn), payload
    return workers


def _run(conn, args: dict, name: str) -> None:
    """One variant in this (spawned) process: build, warm up, report; then time rounds on request."""
    args = argparse.Namespace(**args)
    common.retain_freed_memory(args.retain_memory)  # first, before jax or torch start threads
    try:
        kind, _, variant = name.partition(" ")
        variant, _, tree = variant.partition(" @")
        if tree:  # before anything imports fcn in this (spawned) process
            sys.path.insert(0, common.trees(args)[tree])
        t = time.perf_counter()
        if kind == "fcn":
            impl, _, fused = variant.partition("+fused:")  # benchmarks/fused_model.py
            overrides = {"conv_impl": impl}
            if fused:
                from benchmarks import fused_model

                flags = _keep.enter_context(fused_model.patched(fused))  # for the process's life
                overrides["fused_head"] = "head" if "head" in flags else None
            runner, info = _fcn_variant(argparse.Namespace(**{**vars(args), **overrides}))
            import fcn

            info["fcn_from"] = os.path.dirname(os.path.dirname(os.path.abspath(fcn.__file__)))
        else:
            from benchmarks import torch_side

            runner = torch_side.Variant(args, variant)
            info = {"num_params": runner.num_params}
        for _ in range(2):
            runner.train()
            runner.predict()
        runner.sync()
        info["warmup_s"] = time.perf_counter() - t
        gc.freeze()  # as train.py: the set-up's objects are not walked by the cyclic collector again
    except Exception as e:  # noqa: BLE001 -- report why a variant cannot run
        conn.send(("error", f"{type(e).__name__}: {str(e)[:2000]}"))
        return
    conn.send(("ready", info))
    while (what := conn.recv()) is not None:
        fn = getattr(runner, what)
        faults = _page_faults()
        t = time.perf_counter()
        for _ in range(args.steps):
            fn()
        runner.sync()
        conn.send(((time.perf_counter() - t) / args.steps, [a - b for a, b in zip(_page_faults(), faults)]))


def _page_faults() -> tuple[int, int]:
    """(minor, major) page faults of this process so far."""
    r = resource.getrusage(resource.RUSAGE_SELF)
    return r.ru_minflt, r.ru_majflt


def _fcn_variant(args):
    import jax

    from fcn.traced import enable_compilation_cache

    enable_compilation_cache()
    step, state, batch = common.fcn_train_step(args)
    predict, pstate, images = common.fcn_predict(args)
    runner = _FcnRunner(step, state, batch, predict, pstate, images, common.fcn_augment(args))
    info = {"num_params": common.num_params(state), "upsampling_wired": common.upsampling_wired()}
    try:
        compiled = step.lower(state, *batch).compile()
        cost = compiled.cost_analysis()
        cost = cost[0] if isinstance(cost, list) else cost
        info["xla_flops"] = float(cost.get("flops", 0.0)) or None
        # XLA counts nothing inside a custom call: the oneDNN convolutions (and batch norms) on CPU.
        info["xla_flops_custom_calls"] = report.onednn_calls(compiled.as_text())
    except Exception:  # noqa: BLE001 -- cost analysis is not offered on every backend
        info["xla_flops"] = None
    info["device"] = str(jax.devices()[0].device_kind)
    if jax.devices()[0].platform == "gpu":
        info["bf16_matmul_flops"] = matmul_rate()
    return runner, info


class _FcnRunner:
    def __init__(self, step, state, batch, predict, pstate, images, augment):
        self.step, self.state, self.batch = step, state, batch
        self.predict_fn, self.pstate, self.images = predict, pstate, images
        self.augment_fn, self.augments = augment, 0
        self.out = None
        from fcn.host_memory import StepPacer

        self.pacer = StepPacer()  # as train.py: one step's temporaries at a time on a CPU

    def train(self):
        self.pacer.wait()
        self.state, self.out = self.step(self.state, *self.batch)
        self.pacer.started(self.out)

    def predict(self):
        self.out = self.predict_fn(self.pstate, self.images)

    def augment(self):  # what the training step does first, alone (a new key each time, as the step's)
        self.augments += 1
        self.out = self.augment_fn(self.augments, *self.batch)

    def sync(self):
        import jax

        jax.block_until_ready(self.out)


def matmul_rate(n: int = 8192, repeats: int = 5, back_to_back: int = 20) -> float:
    """bfloat16 matrix-product FLOP/s of this device through XLA (random data, median).

    Each timing is of `back_to_back` products queued before one wait: timed one
    at a time, the wait's latency took 13% off the rate on an H200 (622 against
    716 TFLOP/s; PyTorch's products, queued alike, 694).
    """
    import jax
    import jax.numpy as jnp
    import numpy as np

    ka, kb = jax.random.split(jax.random.key(0))
    a = jax.random.normal(ka, (n, n), jnp.bfloat16)
    b = jax.random.normal(kb, (n, n), jnp.bfloat16)
    mm = jax.jit(lambda a, b: a @ b)
    mm(a, b).block_until_ready()
    ts = []
    for _ in range(repeats):
        t = time.perf_counter()
        jax.block_until_ready([mm(a, b) for _ in range(back_to_back)])
        ts.append((time.perf_counter() - t) / back_to_back)
    return 2 * n**3 / float(np.median(ts))
