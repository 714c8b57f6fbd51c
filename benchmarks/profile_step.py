"""Where the time of fcn's compiled training step goes on CPU: per-op time, by kind.

    python benchmarks/profile_step.py --batch 8 --size 176 240 --features 16 [--conv_impl auto] [--what predict]

Traces a few steps with jax.profiler (XLA:CPU's per-thunk trace events, turned
on with --xla_cpu_enable_xprof_traceme), sums each thunk's time over the traced
steps and threads, and names it from the compiled HLO: convolution forward,
input gradient (dx) or weight gradient (dw), dot, fusion, copy. Not a test.
"""

from __future__ import annotations

import argparse
import collections
import glob
import os
import re
import sys
import tempfile
import time

os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + " --xla_cpu_enable_xprof_traceme=true").strip()
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import jax  # noqa: E402
import numpy as np  # noqa: E402

from benchmarks import common  # noqa: E402


def _instructions(hlo_text: str) -> dict[str, str]:
    """HLO instruction name -> a short description of what it computes."""
    comps: dict[str, list[str]] = {}
    current = None
    for line in hlo_text.splitlines():
        m = re.match(r"^\s*(?:ENTRY\s+)?%(\S+)\s+\(.*\{\s*$", line)
        if m:
            current = m.group(1)
            comps[current] = []
        elif current is not None:
            comps[current].append(line.strip())
    out = {}
    for lines in comps.values():
        for line in lines:
            m = re.match(r"^(?:ROOT\s+)?%(\S+)\s*=\s*(\S+)\s+(\w[\w-]*)\(", line)
            if not m:
                continue
            name, shape, op = m.groups()
            called = re.search(r"calls=%([\w.-]+)", line)
            body = "\n".join(comps.get(called.group(1), [])) if called else line
            out[name] = _describe(op, shape, body, line)
    return out


def _describe(op: str, shape: str, body: str, line: str) -> str:
    if "convolution(" in body:
        conv = next(b for b in body.splitlines() if "convolution(" in b)
        window = re.search(r"window=\{size=([\dx]+)", conv)
        size = window.group(1) if window else "?"
        # The weight gradient is a convolution whose window spans the image (larger than 3x3).
        kind = "conv dw" if max(int(s) for s in size.split("x")) > 3 else "conv"
        if kind == "conv" and "transpose(jvp" in conv:
            kind = "conv dx"
        return f"{kind} {size} -> {shape}"
    if "dot(" in body:
        return f"dot -> {shape}"
    if op == "fusion":
        ops = sorted({m.split("/")[-1] for m in re.findall(r'op_name="([^"]+)"', body)})
        return f"fusion ({' '.join(ops)[:90] or '?'}) -> {shape}"
    return f"{op} -> {shape}"


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    common.add_model_flags(p)
    p.add_argument("--steps", type=int, default=2, help="traced steps")
    p.add_argument("--top", type=int, default=25, help="ops listed")
    p.add_argument("--what", default="train", choices=("train", "predict"), help="training step or inference")
    args = p.parse_args(argv)
    common.retain_freed_memory(args.retain_memory)
    if args.what == "train":
        step, state, batch = common.fcn_train_step(args)
    else:
        step, state, images = common.fcn_predict(args)
        batch = (images,)

    def run():
        nonlocal state
        if args.what == "train":
            state, out = step(state, *batch)
        else:
            out = step(state, *batch)
        jax.block_until_ready(out)

    run()
    hlo = step.lower(state, *batch).compile().as_text()
    names = _instructions(hlo)
    logdir = tempfile.mkdtemp(prefix="fcn_profile_")
    jax.profiler.start_trace(logdir)
    t0 = time.perf_counter()
    for _ in range(args.steps):
        run()
    wall = (time.perf_counter() - t0) / args.steps
    jax.profiler.stop_trace()
    from jax._src.lib import _profile_data

    data = _profile_data.ProfileData.from_file(glob.glob(f"{logdir}/**/*.xplane.pb", recursive=True)[-1])
    per_op: collections.Counter = collections.Counter()
    for plane in data.planes:
        for line in plane.lines:
            if line.name == "python":
                continue
            for ev in line.events:
                if ev.name in names:
                    per_op[ev.name] += ev.duration_ns / 1e6 / args.steps
    total = sum(per_op.values())
    by_kind: collections.Counter = collections.Counter()
    for name, ms in per_op.items():
        by_kind[names[name].split(" ->")[0].split(" (")[0].split(" 3x3")[0].split(" 1x1")[0]] += ms
    print(f"step wall {wall * 1e3:.0f} ms; summed thunk time {total:.0f} ms (over threads)")
    print("by kind:")
    for kind, ms in by_kind.most_common():
        print(f"  {ms:9.1f} ms {100 * ms / total:5.1f}%  {kind}")
    print(f"top {args.top} ops:")
    for name, ms in per_op.most_common(args.top):
        print(f"  {ms:9.1f} ms {100 * ms / total:5.1f}%  {name}: {names[name]}")
    np.set_printoptions()


if __name__ == "__main__":
    main()
