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
import json
import os
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

from benchmarks import common, report, variants  # noqa: E402


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

        from fcn.host_memory import StepPacer
        from fcn.traced import enable_compilation_cache

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
    names += [f"fcn {impl} @{tree}" for tree in common.trees(args) for impl in impls]
    names += [f"torch {name}" for name in args.torch_variants.split(",") if name]
    # Interleaved: all variants alive together, one round of each in turn. One at a time: each
    # variant's process started, timed and ended before the next (sizes whose variants do not
    # fit in memory together), so load from other processes no longer falls on all alike.
    groups = [[name] for name in names] if args.one_at_a_time else [names]
    info, times, faults = {}, {}, {}
    load0 = os.getloadavg()[0]
    for group in groups:
        workers = variants.start(args, group, info)
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
        "xla_flops_custom_calls": fcn0.get("xla_flops_custom_calls") or {},
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


def main(argv=None):
    argv = sys.argv[1:] if argv is None else argv
    args = parse(argv)
    common.trees(args)  # a wrong --trees fails now, not after the start-up runs
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
    res["env"] = report.describe_env()
    if not args.skip_startup:  # the temporary caches made for the start-up runs
        for key in ("FCN_JAX_CACHE", "TORCHINDUCTOR_CACHE_DIR"):
            shutil.rmtree(env[key], ignore_errors=True)
    text = report.table(args, argv, res)
    print(text)
    if args.json:
        with open(args.json, "w") as f:
            json.dump({**res, "table": text}, f, indent=1, default=str)


if __name__ == "__main__":
    main()
