"""fcn against the same U-Net in PyTorch, side by side on one machine. Not a test.

    python benchmarks/speed.py --batch 8 --size 176 240 --features 16   # CPU: configs/camvid_cpu.py's network
    python benchmarks/speed.py                       # default: 4 x 256 x 256, features 32, float32
    bash benchmarks/run_gpu.sh                       # GPU: 16 x 360 x 480, bfloat16

Measures, in one run:
  * time to the first training step, in fresh subprocesses: fcn with an empty
    and with a warm persistent compilation cache, PyTorch eager, torch.compile
    with an empty and a warm inductor cache; each also reports its peak memory
    (CPU: peak resident set; GPU: peak device allocation) over 3 steps. This
    is the benchmark's step on synthetic batches; the start-up of `python
    train.py` itself (data, checkpoints, logging) is benchmarks/first_step.py's;
  * training and inference images per second, after warm-up, each variant in
    a process of its own: rounds of `--steps` steps of each variant in turn,
    `--warmup_rounds` untimed (a process's heap grows over its first rounds of
    alternating training and inference; each timed round's page faults are in
    the JSON), then the median over `--repeats` rounds (interleaved, so that load from other
    processes falls on all variants alike; one variant runs at a time, in an order that
    changes each round so that no variant always follows the same one). With
    `--one_at_a_time` each variant's process is started, timed and ended
    before the next, for sizes whose variants do not fit in memory together;
  * the step's FLOPs (analytic: 2 x multiply-adds of every convolution,
    forward and both backward products; and XLA's cost analysis of fcn's
    step, which counts nothing inside custom calls such as the oneDNN
    convolutions on CPU), the rate reached, and on GPU the model FLOPs utilisation against a
    bfloat16 matrix product timed in the same run.

fcn's training step is fcn.state.jit_train_step itself (on-device
augmentation, loss, AdamW, metrics); PyTorch's is forward, cross-entropy,
backward, clipping, AdamW (benchmarks/unet_torch.py) on batches already in
tensors, so the comparison leaves fcn's augmentation cost in fcn's figure; the
augmentation is also timed alone, in the same rounds, and the report gives
fcn's rate less it as an estimate beside the ratio.
With --trees NAME=PATH, each fcn variant also runs from another source tree's
fcn package in the same rounds, and the report adds the per-round ratio of the
two: a code change measured against the code before it in one run.
OMP_WAIT_POLICY is left as found and printed (it moves PyTorch's figures on a
shared machine; benchmarks/README.md). Prints a markdown table; --json writes
every number.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import platform
import resource
import shutil
import subprocess
import sys
import tempfile
import time

T0 = time.perf_counter()  # start-up times count from here
# The variants' processes share one GPU: no preallocation by JAX.
os.environ.setdefault("XLA_PYTHON_CLIENT_PREALLOCATE", "false")
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from benchmarks import common  # noqa: E402


def parse(argv=None):
    p = argparse.ArgumentParser(description="fcn vs PyTorch: speed, start-up time and memory of the default U-Net")
    common.add_model_flags(p)
    p.add_argument("--conv_impls", default="xla,auto", help="fcn variants: comma-separated conv_impl values")
    p.add_argument("--torch_variants", default="eager+cl,compile", help="eager, compile; '+cl' = channels_last")
    p.add_argument(
        "--trees",
        default="",
        help="A/B of fcn's code in one interleaved run: NAME=PATH[,NAME=PATH]: each conv_impl also "
        "runs as 'fcn IMPL @NAME' with the fcn package of the source tree at PATH (a copy or a git "
        "worktree with a change; the benchmark itself is this tree's)",
    )
    p.add_argument("--steps", type=int, default=3, help="steps per timed round")
    p.add_argument("--repeats", type=int, default=5, help="timed rounds (median reported)")
    p.add_argument("--warmup_rounds", type=int, default=4, help="untimed interleaved rounds before them")
    p.add_argument(
        "--one_at_a_time",
        action="store_true",
        help="throughput: each variant's process started, timed and ended before the next (when "
        "the variants do not fit in memory together); rounds then do not interleave variants",
    )
    p.add_argument("--skip_startup", action="store_true", help="skip the first-step subprocesses")
    p.add_argument("--skip_throughput", action="store_true", help="only the first-step subprocesses")
    p.add_argument("--json", default="", help="write all results here")
    p.add_argument("--first_step", default="", help=argparse.SUPPRESS)  # internal: subprocess mode
    return p.parse_args(argv)


# ---------------------------------------------------------------------------
# Time to the first training step and peak memory, each in a fresh process.


def first_step(args) -> dict:
    """Run in a fresh subprocess: seconds from process start to the end of the first step, and peak memory."""
    t0 = T0
    kind = args.first_step
    if kind.startswith("fcn"):
        import jax

        from fcn.ops import StepPacer
        from fcn.train import enable_compilation_cache

        enable_compilation_cache()  # FCN_JAX_CACHE, set by the caller
        t_import = time.perf_counter() - t0
        step, state, batch = common.fcn_train_step(args)
        pacer = StepPacer()  # as train.py: on a CPU, each step waits for the one before and its temporaries
        pacer.wait()
        state, out = step(state, *batch)
        jax.block_until_ready(out)
        t_first = time.perf_counter() - t0
        pacer.started(out)
        for _ in range(2):
            pacer.wait()
            state, out = step(state, *batch)
            pacer.started(out)
        jax.block_until_ready(out)
        dev = jax.devices()[0]
        peak = (dev.memory_stats() or {}).get("peak_bytes_in_use") if dev.platform != "cpu" else None
    else:
        import torch

        from benchmarks import torch_side

        t_import = time.perf_counter() - t0
        v = torch_side.Variant(args, kind.split(":", 1)[1])
        v.train()
        v.sync()
        t_first = time.perf_counter() - t0
        for _ in range(2):
            v.train()
        v.sync()
        peak = torch.cuda.max_memory_allocated() if v.device == "cuda" else None
    if peak is None:
        import resource

        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    return {"import_s": t_import, "first_step_s": t_first, "peak_bytes": peak}


def startup(args, argv) -> dict:
    """Cold and warm-cache first steps of each variant, each in its own subprocess."""
    caches = {"fcn": tempfile.mkdtemp(prefix="fcn_jax_cache_"), "torch": tempfile.mkdtemp(prefix="inductor_")}
    env = dict(os.environ, FCN_JAX_CACHE=caches["fcn"], TORCHINDUCTOR_CACHE_DIR=caches["torch"])
    env["TRITON_CACHE_DIR"] = os.path.join(caches["torch"], "triton")
    runs = [("fcn", "cold"), ("fcn", "warm")]
    for v in args.torch_variants.split(","):
        runs += [(f"torch:{v}", "cold"), (f"torch:{v}", "warm")] if "compile" in v else [(f"torch:{v}", "cold")]
    out = {}
    for kind, cache in runs:
        cmd = [sys.executable, os.path.abspath(__file__), *argv, "--first_step", kind]
        proc = subprocess.run(cmd, env=env, capture_output=True, text=True, cwd=ROOT)
        if proc.returncode:
            out[f"{kind} {cache}"] = {"error": proc.stderr.strip().splitlines()[-1] if proc.stderr.strip() else "?"}
            print(f"  {kind} ({cache} cache): FAILED\n{proc.stderr[-3000:]}", file=sys.stderr)
            continue
        res = json.loads(proc.stdout.strip().splitlines()[-1])
        out[f"{kind} {cache}"] = res
        peak = res["peak_bytes"] / 2**20
        print(f"  {kind} ({cache} cache): first step {res['first_step_s']:.1f} s, peak {peak:.0f} MiB", flush=True)
    return out, env


# ---------------------------------------------------------------------------
# Throughput: every variant in a process of its own, interleaved (or one after another).


def throughput(args) -> dict:
    """Every variant in a process of its own, driven in interleaved rounds from this one.

    Separate processes, as users run them: with torch and jax in one process
    (this benchmark's first form), the default network's fcn training step took
    2159-2370 ms against 1191 ms alone (4 x 256 x 256; docs/benchmarks.md).
    """
    import numpy as np

    impls = [impl for impl in args.conv_impls.split(",") if impl]
    names = [f"fcn {impl}" for impl in impls]
    names += [f"fcn {impl} @{tree}" for tree in _trees(args) for impl in impls]
    names += [f"torch {name}" for name in args.torch_variants.split(",") if name]
    # Interleaved: all variants alive together, one round of each in turn. One at a time: each
    # variant's process started, timed and ended before the next (sizes whose variants do not
    # fit in memory together), so load from other processes no longer falls on all alike.
    groups = [[name] for name in names] if args.one_at_a_time else [names]
    info, times, faults = {}, {}, {}
    load0 = os.getloadavg()[0]
    for group in groups:
        workers = _start_workers(args, group, info)
        for k in workers:
            times[k] = {"train": [], "predict": [], **({"augment": []} if k.startswith("fcn") else {})}
            faults[k] = {w: [] for w in times[k]}
        try:
            # Untimed rounds first, interleaved like the timed ones: a process's heap keeps growing
            # (and faulting pages in) over its first steps of alternating training and inference.
            for r in range(args.warmup_rounds + args.repeats):
                order = _round_order(list(workers), r - args.warmup_rounds)
                for what in ("train", "predict", "augment"):
                    for k in order:
                        conn = workers[k][1]
                        if what == "augment" and not k.startswith("fcn"):
                            continue  # fcn's on-device augmentation alone; PyTorch's step starts from tensors
                        conn.send(what)
                        t, f = conn.recv()
                        if r >= args.warmup_rounds:
                            times[k][what].append(t)
                            faults[k][what].append(f)
        finally:
            for proc, conn in workers.values():
                conn.send(None)
                proc.join()
    if not any(k.startswith("fcn") for k in info):
        raise SystemExit("no fcn variant could run (see above)")
    n_fcn = next(v["num_params"] for k, v in info.items() if k.startswith("fcn"))
    for k, v in info.items():
        assert v["num_params"] == n_fcn, f"{k}: {v['num_params']} parameters, fcn has {n_fcn}"
    fcn0 = next(v for k, v in info.items() if k.startswith("fcn"))
    res = {
        "params": n_fcn,
        "warmup_s": {k: v["warmup_s"] for k, v in info.items()},
        "load": (load0, os.getloadavg()[0]),
        "upsampling_wired": fcn0["upsampling_wired"],
        "fcn_from": {k: v["fcn_from"] for k, v in info.items() if "fcn_from" in v},
        "xla_flops": fcn0["xla_flops"],
        "xla_flops_custom_calls": fcn0.get("xla_flops_custom_calls", 0),
        "device": fcn0["device"],
    }
    if "bf16_matmul_flops" in fcn0:
        res["bf16_matmul_flops"] = fcn0["bf16_matmul_flops"]
    for k, t in times.items():
        res[k] = {
            w: {
                "step_s": float(np.median(v)),
                "all_s": v,
                "img_s": args.batch / float(np.median(v)),
                "page_faults_minor_major": faults[k][w],  # per timed round
            }
            for w, v in t.items()
        }
    return res


def _round_order(names: list, r: int) -> list:
    """The variants' order in round r, from a Williams design (a balanced Latin square).

    Over len(names) rounds each variant runs once in every position, and, for an
    even count, right after every other variant exactly once (an odd count takes
    twice the rounds, the rows reversed in the second half). In a fixed order each
    variant always followed the same one, and whatever that one left behind
    (threads still spinning, the caches' contents, a GPU's clock) fell on it alone.
    """
    n = len(names)
    base, lo, hi = [0], 1, n - 1
    while len(base) < n:  # 0, 1, n-1, 2, n-2, ...
        base.append(lo if len(base) % 2 else hi)
        lo, hi = (lo + 1, hi) if len(base) % 2 == 0 else (lo, hi - 1)
    row = [(b + r) % n for b in base]
    if n % 2 and (r // n) % 2:
        row.reverse()
    return [names[i] for i in row]


def _trees(args) -> dict[str, str]:
    """--trees as {name: absolute path}, each checked to hold an fcn package."""
    out = {}
    for item in filter(None, args.trees.split(",")):
        name, sep, path = item.partition("=")
        path = os.path.abspath(os.path.expanduser(path))
        if not sep or not name or not os.path.isfile(os.path.join(path, "fcn", "__init__.py")):
            raise SystemExit(f"--trees {item!r}: expected NAME=PATH, PATH a source tree with fcn/__init__.py")
        out[name] = path
    return out


def _start_workers(args, names: list, info: dict) -> dict:
    """A spawned process per variant, built and warmed up one at a time (no variant's compilation
    slows another's): {name: (process, pipe)} of those that run; `info` gets what each reported."""
    import multiprocessing

    ctx = multiprocessing.get_context("spawn")
    workers = {}
    for name in names:
        conn, child = ctx.Pipe()
        proc = ctx.Process(target=_worker, args=(child, vars(args), name), daemon=True)
        proc.start()
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


def _worker(conn, args: dict, name: str) -> None:
    """One variant in this (spawned) process: build, warm up, report; then time rounds on request."""
    args = argparse.Namespace(**args)
    common.retain_freed_memory(args.retain_memory)  # first, before jax or torch start threads
    try:
        kind, _, variant = name.partition(" ")
        variant, _, tree = variant.partition(" @")
        if tree:  # before anything imports fcn in this (spawned) process
            sys.path.insert(0, _trees(args)[tree])
        t = time.perf_counter()
        if kind == "fcn":
            runner, info = _fcn_variant(argparse.Namespace(**{**vars(args), "conv_impl": variant}))
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

    from fcn.train import enable_compilation_cache

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
        # XLA counts nothing inside a custom call: the oneDNN convolutions on CPU.
        info["xla_flops_custom_calls"] = compiled.as_text().count('custom_call_target="fcn_onednn')
    except Exception:  # noqa: BLE001 -- cost analysis is not offered on every backend
        info["xla_flops"] = None
    info["device"] = str(jax.devices()[0].device_kind)
    if jax.devices()[0].platform == "gpu":
        info["bf16_matmul_flops"] = _matmul_rate()
    return runner, info


class _FcnRunner:
    def __init__(self, step, state, batch, predict, pstate, images, augment):
        self.step, self.state, self.batch = step, state, batch
        self.predict_fn, self.pstate, self.images = predict, pstate, images
        self.augment_fn, self.augments = augment, 0
        self.out = None
        from fcn.ops import StepPacer

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


def _matmul_rate(n: int = 8192, repeats: int = 5, back_to_back: int = 20) -> float:
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


def unet_flops(args) -> tuple[float, float]:
    """Analytic FLOPs (2 x multiply-adds) of the U-Net's convolutions: (forward, training step = 3 x forward)."""
    h, w = args.size
    h, w = -(-h // 2**args.depth) * 2**args.depth, -(-w // 2**args.depth) * 2**args.depth
    widths = [args.features * 2**i for i in range(args.depth + 1)]
    macs, c = 0, 3
    for i, wd in enumerate(widths):  # down blocks and the bottom block
        px = (h >> i) * (w >> i)
        macs += px * 9 * (c * wd + wd * wd)
        c = wd
    for i in reversed(range(args.depth)):  # transposed conv 2x2/2, then a block on [up, skip]
        px = (h >> i) * (w >> i)
        macs += px * widths[i + 1] * widths[i] + px * 9 * (2 * widths[i] * widths[i] + widths[i] * widths[i])
    macs += h * w * widths[0] * args.classes
    fwd = 2.0 * macs * args.batch
    return fwd, 3 * fwd


# ---------------------------------------------------------------------------
# Report.


def table(args, argv, res: dict) -> str:
    """The markdown report: command, hardware, throughput and ratios, start-up and memory, FLOPs."""
    tput, start, env = res.get("throughput") or {}, res.get("startup") or {}, res["env"]
    fcn_keys = [k for k in tput if k.startswith("fcn ")]
    torch_keys = [k for k in tput if k.startswith("torch ")]
    _, train_flops = unet_flops(args)
    lines = [
        f"Command: `python benchmarks/speed.py {' '.join(argv)}`",
        f"Hardware: {env['hardware']}; {env['software']}; date {env['date']}.",
        f"Batch {args.batch} x {args.size[0]}x{args.size[1]}, features {args.features}, depth {args.depth}, "
        f"{args.classes} classes; fcn compute dtype {args.dtype}.",
    ]
    if tput:
        order = (
            "consecutive (--one_at_a_time: one variant's process after another)"
            if args.one_at_a_time
            else "interleaved"
        )
        lines[-1] = lines[-1][:-1] + f"; {tput['params']:,} parameters in both."
        lines += [
            f"Throughput: median of {args.repeats} {order} rounds of {args.steps} steps, after "
            f"{args.warmup_rounds} untimed rounds; "
            f"load average {tput['load'][0]:.1f} before, {tput['load'][1]:.1f} after.",
            "",
            "| variant | train img/s | infer img/s | train step ms | GFLOP/s (analytic) |",
            "| --- | --- | --- | --- | --- |",
        ]
        for k in fcn_keys + torch_keys:
            t, p = tput[k]["train"], tput[k]["predict"]
            rate = train_flops / t["step_s"] / 1e9
            lines.append(f"| {k} | {t['img_s']:.2f} | {p['img_s']:.2f} | {1e3 * t['step_s']:.0f} | {rate:.1f} |")
        if any(" @" in k for k in fcn_keys):  # --trees: say which code each fcn variant ran
            lines.append("fcn's code: " + "; ".join(f"{k} from {tput['fcn_from'].get(k, '?')}" for k in fcn_keys) + ".")
    if fcn_keys and torch_keys:
        lines += ["", "| ratio fcn / PyTorch (best of each) | training | inference |", "| --- | --- | --- |"]
        best = lambda keys, w: max(tput[k][w]["img_s"] for k in keys)  # noqa: E731
        for k in fcn_keys:
            lines.append(
                f"| {k} / best torch | {tput[k]['train']['img_s'] / best(torch_keys, 'train'):.2f}x "
                f"| {tput[k]['predict']['img_s'] / best(torch_keys, 'predict'):.2f}x |"
            )
        if not args.one_at_a_time:  # rounds interleaved: each round's ratio sees the same load on both sides
            lines += [
                "",
                f"| per round, fcn / fastest torch variant of the round: median (lowest-highest of {args.repeats}) "
                "| training | inference |",
                "| --- | --- | --- |",
            ]
            for k in fcn_keys:
                lines.append(
                    f"| {k} | {_round_ratios(tput, k, torch_keys, 'train')} "
                    f"| {_round_ratios(tput, k, torch_keys, 'predict')} |"
                )
            pairs = [(k.split(" @")[0], k) for k in fcn_keys if " @" in k and k.split(" @")[0] in tput]
            if pairs:  # --trees: the A/B itself, paired by round
                lines += [
                    "",
                    f"| per round, this tree's speed / the other tree's: median (lowest-highest of {args.repeats}) "
                    "| training | inference |",
                    "| --- | --- | --- |",
                ]
                for mine, other in pairs:
                    lines.append(
                        f"| {mine} / {other} | {_round_ratios(tput, mine, [other], 'train')} "
                        f"| {_round_ratios(tput, mine, [other], 'predict')} |"
                    )
        for k in fcn_keys:
            if "augment" in tput[k]:
                aug, step = tput[k]["augment"]["step_s"], tput[k]["train"]["step_s"]
                rate = args.batch / (step - aug) if step > aug else float("nan")
                lines.append(
                    f"{k}'s training step includes its on-device augmentation, timed alone in the same "
                    f"rounds at {1e3 * aug:.1f} ms ({100 * aug / step:.0f}% of the step); PyTorch's step starts "
                    f"from ready tensors. Less it (an estimate): {rate:.2f} img/s, "
                    f"{rate / best(torch_keys, 'train'):.2f}x."
                )
    if start:
        lines += [
            "",
            f"| first training step, fresh process (fcn: conv_impl {args.conv_impl}) | seconds "
            "| of which imports | peak memory MiB |",
            "| --- | --- | --- | --- |",
        ]
        for k, v in start.items():
            if "error" in v:
                lines.append(f"| {k} | failed: {v['error']} | | |")
            else:
                peak = v["peak_bytes"] / 2**20
                lines.append(f"| {k} cache | {v['first_step_s']:.1f} | {v['import_s']:.1f} | {peak:.0f} |")
    lines += ["", f"Training step FLOPs: {train_flops / 1e9:.1f} G analytic (convolutions, 3 x forward)"]
    if tput.get("xla_flops"):
        lines[-1] += f"; {tput['xla_flops'] / 1e9:.1f} G by XLA's cost analysis of fcn's step"
        if tput.get("xla_flops_custom_calls"):
            lines[-1] += f", which leaves out its {tput['xla_flops_custom_calls']} oneDNN convolutions (custom calls)"
    memory = "fcn.ops.retain_freed_memory() in every process, fcn's and PyTorch's"
    lines.append(f"Host memory: {memory if res.get('retained') else 'glibc defaults'}.")
    if tput and not tput["upsampling_wired"]:
        lines.append(
            "fcn/model.py does not yet build its upsampling with fcn.ops.ConvTranspose: the benchmark "
            "did so itself for conv_impl other than xla (benchmarks/common.py: route_upsampling)."
        )
    if tput.get("bf16_matmul_flops"):
        rate = tput["bf16_matmul_flops"]
        lines.append(f"bfloat16 matmul rate measured here: {rate / 1e12:.0f} TFLOP/s.")
        lines.append("MFU (analytic FLOPs / step time / that rate):")
        for k in fcn_keys + torch_keys:
            lines.append(f"- {k}: {100 * train_flops / tput[k]['train']['step_s'] / rate:.1f}%")
    return "\n".join(lines)


def _round_ratios(tput: dict, fcn_key: str, torch_keys: list, what: str) -> str:
    """fcn's speed over the fastest PyTorch variant's, round by round (times of one interleaved round
    are paired): the median ratio and its range. On a machine whose speed drifts, a ratio of medians
    compares rounds run under different loads; paired ratios do not."""
    import numpy as np

    fcn_s = tput[fcn_key][what]["all_s"]
    torch_s = np.min([tput[k][what]["all_s"] for k in torch_keys], axis=0)
    ratios = np.asarray(torch_s) / np.asarray(fcn_s)
    return f"{np.median(ratios):.2f}x ({ratios.min():.2f}-{ratios.max():.2f})"


def describe_env() -> dict:
    import jax

    hw = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            hw = next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    hw = f"{hw}, {os.cpu_count()} CPU cores"
    if jax.devices()[0].platform != "cpu":
        hw = f"{jax.devices()[0].device_kind}; host {hw}"
    sw = f"jax {jax.__version__}"
    try:
        import flax
        import torch

        sw += f", flax {flax.__version__}, torch {torch.__version__} ({torch.get_num_threads()} threads, "
        sw += f"OMP_WAIT_POLICY={os.environ.get('OMP_WAIT_POLICY', 'unset')})"
    except ImportError:
        pass
    return {"hardware": hw, "software": sw, "date": time.strftime("%Y-%m-%d")}


def main(argv=None):
    argv = sys.argv[1:] if argv is None else argv
    args = parse(argv)
    _trees(args)  # a wrong --trees fails now, not after the start-up runs
    retained = common.retain_freed_memory(args.retain_memory)
    if args.first_step:
        print(json.dumps(first_step(args)))
        return
    res = {"args": vars(args), "retained": retained, "startup": {}, "throughput": {}}
    if not args.skip_startup:
        print("first training step, fresh processes:", flush=True)
        res["startup"], env = startup(args, argv)
        os.environ.update({k: env[k] for k in ("FCN_JAX_CACHE", "TORCHINDUCTOR_CACHE_DIR", "TRITON_CACHE_DIR")})
    if not args.skip_throughput:
        print(f"throughput, {'one variant at a time' if args.one_at_a_time else 'interleaved'}:", flush=True)
        res["throughput"] = throughput(args)
    res["env"] = describe_env()
    if not args.skip_startup:  # the temporary caches made for the start-up runs
        for key in ("FCN_JAX_CACHE", "TORCHINDUCTOR_CACHE_DIR"):
            shutil.rmtree(env[key], ignore_errors=True)
    text = table(args, argv, res)
    print(text)
    if args.json:
        with open(args.json, "w") as f:
            json.dump({**res, "table": text}, f, indent=1, default=str)


if __name__ == "__main__":
    main()
