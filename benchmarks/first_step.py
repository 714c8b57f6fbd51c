"""Time to the first training step of the real command line, with its breakdown. Not a test.

    python benchmarks/first_step.py [--runs 2] [-- train.py flags]

Default flags: `--config configs/camvid_cpu.py --config.data.path=../shared/datasets/camvid
--config.num_steps=1`, i.e. what `make train` runs, stopped after one step.
Each run is a fresh process running `fcn.cli.train_main` (exactly what
`python train.py` runs) in a new workdir; the first run starts from an empty
cache folder (FCN_CACHE_DIR, a temporary folder: compilations and decoded
splits), later runs find it warm. Inside the child, timestamps from process start are taken at:
python imports done, each data split decoded, the state created, and the
first step's metrics on the host (what the progress bar shows as step 1);
jax.monitoring's events add tracing, lowering, backend compilation and
persistent-cache reads per jitted function. What comes after the first step
(evaluation at the last step, checkpoint writing) is timed too, and reported
apart from it.
"""

from __future__ import annotations

import time

T0 = time.perf_counter()

import argparse  # noqa: E402
import collections  # noqa: E402
import json  # noqa: E402
import os  # noqa: E402
import shutil  # noqa: E402
import subprocess  # noqa: E402
import sys  # noqa: E402
import tempfile  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
_COMPILE_EVENTS = ("jaxpr_trace_duration", "jaxpr_to_mlir_module_duration", "backend_compile_duration")
DEFAULT_FLAGS = [
    "--config",
    "configs/camvid_cpu.py",
    "--config.data.path=../shared/datasets/camvid",
    "--config.num_steps=1",
]


def child(flags: list[str], out_path: str) -> None:
    """Run train.py's main in this process, recording when each phase ends."""
    marks: list[tuple[str, float]] = []
    events: collections.Counter = collections.Counter()
    counts: collections.Counter = collections.Counter()
    detail: list = []
    import resource

    def mark(name: str) -> None:
        faults = resource.getrusage(resource.RUSAGE_SELF).ru_minflt  # pages touched for the first time
        marks.append((name, time.perf_counter() - T0, time.process_time(), faults))

    from fcn import cli  # what train.py imports

    mark("import fcn.cli")
    real_main = cli.run_training

    def run_training(config, workdir):
        import jax
        import jax.monitoring

        from fcn import checkpoint, state as state_lib, train
        from fcn.data import base

        mark("imports for training")

        def on_duration(event, duration, **kw):
            name = event.split("/")[-1]
            events[name] += duration
            if name in _COMPILE_EVENTS and duration > 0.02:
                detail.append((time.perf_counter() - T0, name, kw.get("fun_name", ""), duration))

        def on_event(event, **kw):
            if event.startswith("/jax/compilation_cache/"):
                counts[event.split("/")[-1]] += 1

        jax.monitoring.register_event_duration_secs_listener(on_duration)
        jax.monitoring.register_event_listener(on_event)
        wrap(base.Source, "load", lambda *a, **k: f"decode {a[1]}", mark)
        wrap(state_lib, "create", "state created", mark)
        wrap(checkpoint.Checkpoints, "__init__", "checkpoint managers made", mark)
        wrap(train.MetricsLog, "__init__", "metrics log opened", mark)
        wrap(train.sharding, "put_batch", "first batch on device", mark, once=True)
        wrap(checkpoint.Checkpoints, "save", "checkpoint saved", mark)
        wrap(train, "evaluate_split", "evaluation", mark)
        wrap(train, "_check_finite", lambda *a, **k: f"step {a[1]} metrics on host", mark)
        return real_main(config, workdir)

    cli.run_training = run_training
    try:
        cli.train_main([sys.argv[0], *flags])
    except SystemExit as e:
        if e.code:
            raise
    mark("exit")
    with open(out_path, "w") as f:
        json.dump({"marks": marks, "events": dict(events), "counts": dict(counts), "detail": detail}, f)


def wrap(owner, name: str, label, mark, once: bool = False) -> None:
    fn = getattr(owner, name)
    calls = [0]

    def wrapped(*a, **k):
        out = fn(*a, **k)
        calls[0] += 1
        if not once or calls[0] == 1:
            mark(label(*a, **k) if callable(label) else label)
        return out

    setattr(owner, name, wrapped)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--runs", type=int, default=2, help="fresh processes; the first with an empty cache")
    p.add_argument(
        "--cache", default="", help="FCN_CACHE_DIR: compilations and decoded splits (default: a new temporary one)"
    )
    p.add_argument("--child", default="", help=argparse.SUPPRESS)
    args, flags = p.parse_known_args()
    flags = [f for f in flags if f != "--"] or DEFAULT_FLAGS
    if args.child:
        child(flags, args.child)
        return
    cache = args.cache or tempfile.mkdtemp(prefix="fcn_cache_")
    # Compilations and decoded splits both (FCN_JAX_CACHE overrides FCN_CACHE_DIR/jax).
    env = dict(os.environ, FCN_CACHE_DIR=cache)
    env.pop("FCN_JAX_CACHE", None)
    print(f"python train.py {' '.join(flags)} --workdir NEW; FCN_CACHE_DIR={cache}; load {os.getloadavg()[0]:.1f}")
    for run in range(args.runs):
        workdir = tempfile.mkdtemp(prefix="fcn_first_step_")
        out = os.path.join(workdir, "timing.json")
        cmd = [sys.executable, os.path.abspath(__file__), "--child", out, *flags, "--workdir", workdir + "/run"]
        t = time.perf_counter()
        proc = subprocess.run(cmd, env=env, cwd=ROOT, capture_output=True, text=True)
        wall = time.perf_counter() - t
        if proc.returncode:
            print(proc.stderr[-3000:], file=sys.stderr)
            sys.exit(f"run {run} failed")
        res = json.load(open(out))
        shutil.rmtree(workdir, ignore_errors=True)
        print(f"run {run + 1} ({'empty' if run == 0 and not args.cache else 'warm'} cache), wall {wall:.1f} s:")
        print("  wall s  (+ phase)   CPU s (+ phase)   page faults (+ phase)")
        prev = prev_cpu = prev_faults = 0.0
        for name, t_end, cpu, faults in res["marks"]:
            print(
                f"  {t_end:6.2f}  (+{t_end - prev:5.2f})  {cpu:6.2f} (+{cpu - prev_cpu:5.2f})  "
                f"{faults:8d} (+{faults - prev_faults:7.0f})  {name}"
            )
            prev, prev_cpu, prev_faults = t_end, cpu, faults
        for t_end, name, fun, duration in res["detail"]:
            print(f"  {t_end:6.2f} s  {duration:6.2f} s  {name} {fun}")
        print("  compilation cache:", res["counts"])
        ev = res["events"]
        keys = sorted(ev, key=ev.get, reverse=True)
        print("  jax.monitoring, summed over all jitted functions:", ", ".join(f"{k} {ev[k]:.2f}" for k in keys))
    if not args.cache:
        shutil.rmtree(cache, ignore_errors=True)


if __name__ == "__main__":
    main()
