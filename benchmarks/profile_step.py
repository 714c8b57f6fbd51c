"""Where the time of fcn's compiled training step goes, on CPU or GPU: per-op time, by kind.

    python benchmarks/profile_step.py --batch 8 --size 176 240 --features 16 [--conv_impl auto] [--what predict|augment]
    python benchmarks/profile_step.py --batch 16 --size 360 480 --dtype bfloat16   # on a GPU

Traces a few steps with jax.profiler. On a CPU: XLA's per-thunk trace events
(turned on with --xla_cpu_enable_xprof_traceme), each thunk's time summed over
the traced steps and threads and named from the compiled HLO: convolution
forward, input gradient (dx) or weight gradient (dw), dot, fusion, copy. On a
GPU: the kernels on the device's streams, summed by name and by class (cuDNN's
convolutions, matrix products, XLA's fusions). Not a test.

The traced steps come after --warmup untimed ones: with `retain_freed_memory`
the heap can still grow by a whole set of the step's temporaries in a
process's first steps (docs/benchmarks.md, the ninth and eleventh sessions),
and a traced step that faults those pages in shows its fusions several times
slower than they run once the heap has settled. The report gives the traced
steps' page faults and says when they were that many.
"""

from __future__ import annotations

import argparse
import collections
import glob
import os
import re
import resource
import sys
import tempfile
import time

os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + " --xla_cpu_enable_xprof_traceme=true").strip()
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import jax  # noqa: E402
import numpy as np  # noqa: E402

from benchmarks import common  # noqa: E402

# Page faults a traced step may take before its times are not the settled step's
# (about 150,000 when a 596 MB set of temporaries is faulted in; 0-300 once settled).
_FAULTS_WARN = 5000


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
            # The shape: one array's, or a tuple's (several outputs; no parentheses inside).
            m = re.match(r"^(?:ROOT\s+)?%(\S+)\s*=\s*(\(.*?\)|\S+)\s+(\w[\w-]*)\(", line)
            if not m:
                continue
            name, shape, op = m.groups()
            called = re.search(r"calls=%([\w.-]+)", line)
            body = "\n".join(comps.get(called.group(1), [])) if called else line
            out[name] = _describe(op, shape, body, line)
    return out


# fcn.onednn's FFI targets, named as the kinds XLA's own convolutions get below.
_ONEDNN_KINDS = {
    "fcn_onednn_conv_fwd": "oneDNN conv",
    "fcn_onednn_conv_bwd_data": "oneDNN conv dx",
    "fcn_onednn_conv_bwd_weights": "oneDNN conv dw",
    "fcn_onednn_conv_bias_relu": "oneDNN conv",
    "fcn_onednn_bn_relu_fwd": "oneDNN batch norm",
    "fcn_onednn_bn_relu_bwd": "oneDNN batch norm grad",
}


# XLA:GPU's cuDNN convolution calls, by what they compute.
_CUDNN_KINDS = {
    "__cudnn$convForward": "cuDNN conv fprop",
    "__cudnn$convBackwardInput": "cuDNN conv dgrad",
    "__cudnn$convBackwardFilter": "cuDNN conv wgrad",
    "__cudnn$convBiasActivationForward": "cuDNN conv fprop+bias+activation",
}


def _describe(op: str, shape: str, body: str, line: str) -> str:
    target = re.search(r'custom_call_target="([^"]+)"', line)
    if op == "custom-call" and target and target.group(1) in _CUDNN_KINDS:
        window = re.search(r"window=\{size=([\dx]+)", line)
        operands = re.findall(r"(\w+\[[\d,]*\])\{", line.split("custom-call(", 1)[1])
        return (
            f"{_CUDNN_KINDS[target.group(1)]} {window.group(1) if window else '?'} {' '.join(operands[:2])} -> {shape}"
        )
    if op == "custom-call" and target:
        return f"{_ONEDNN_KINDS.get(target.group(1), target.group(1))} -> {shape}"
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


def _kernel_class(name: str) -> str:
    """A GPU kernel's class, from its name: cuDNN's convolutions, XLA's matrix products, XLA's fusions."""
    if any(k in name for k in ("fprop", "dgrad", "wgrad", "cudnn", "ImplicitGemmConvolution")):
        kind = "wgrad" if "wgrad" in name else "dgrad" if "dgrad" in name else "fprop" if "fprop" in name else ""
        return f"cuDNN convolution {kind}".strip()
    # cuBLAS's Hopper kernels are named nvjet_*; XLA's own products gemm_fusion_*, triton_gemm_*, dot_*.
    # A Triton kernel with neither gemm nor dot in its name is one of XLA's fusions (a normalization).
    if any(k in name for k in ("gemm", "cublas", "nvjet", "cutlass")) or name.startswith("dot"):
        return "matrix product"
    if "triton" in name:
        return "XLA fusion (Triton)" if "dot" not in name else "matrix product"
    if "memcpy" in name.lower() or "memset" in name.lower():
        return "copy or fill"
    if "fusion" in name:
        return "XLA fusion " + name.split("_")[0]  # loop_ (elementwise) or input_ (reductions, concatenations)
    return "other"


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    common.add_model_flags(p)
    p.add_argument("--steps", type=int, default=4, help="traced steps")
    p.add_argument("--warmup", type=int, default=12, help="untimed steps before them (the heap settles)")
    p.add_argument("--top", type=int, default=25, help="ops listed")
    p.add_argument(
        "--what",
        default="train",
        choices=("train", "predict", "augment"),
        help="training step, inference, or the training step's on-device augmentation alone",
    )
    p.add_argument("--hlo", default="", help="also write the compiled step's optimised HLO to this file")
    args = p.parse_args(argv)
    common.retain_freed_memory(args.retain_memory)
    if args.what == "train":
        step, state, batch = common.fcn_train_step(args)
    elif args.what == "predict":
        step, state, images = common.fcn_predict(args)
        batch = (images,)
    else:  # augment(n, images, labels, sizes): state is the step number
        step, state = common.fcn_augment(args), 0
        batch = tuple(jax.device_put(a) for a in common.synthetic_batch(args))

    def run():
        nonlocal state
        if args.what == "train":
            state, out = step(state, *batch)
        else:
            out = step(state, *batch)
        jax.block_until_ready(out)

    for _ in range(max(1, args.warmup)):
        run()
    gpu = jax.default_backend() == "gpu"  # a GPU's kernels are named by the trace itself
    hlo = step.lower(state, *batch).compile().as_text()
    if args.hlo:
        with open(args.hlo, "w") as f:
            f.write(hlo)
    names = _instructions(hlo)
    entry = collections.Counter(
        re.findall(r"= \S+ (fusion|copy|custom-call|convolution|dot|gather)\(", hlo[hlo.find("ENTRY") :])
    )
    print(f"compiled program: {sum(entry.values())} operations in its entry ({dict(entry.most_common())})")
    logdir = tempfile.mkdtemp(prefix="fcn_profile_")
    jax.profiler.start_trace(logdir)
    faults = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    t0 = time.perf_counter()
    for _ in range(args.steps):
        run()
    wall = (time.perf_counter() - t0) / args.steps
    faults = (resource.getrusage(resource.RUSAGE_SELF).ru_minflt - faults) / args.steps
    jax.profiler.stop_trace()
    from jax._src.lib import _profile_data

    data = _profile_data.ProfileData.from_file(glob.glob(f"{logdir}/**/*.xplane.pb", recursive=True)[-1])
    per_op: collections.Counter = collections.Counter()
    kernels: collections.Counter = collections.Counter()
    for plane in data.planes:
        if gpu and not plane.name.startswith("/device:GPU"):
            continue  # the host's thunk launches would count the device's time again
        for line in plane.lines:
            if line.name == "python":
                continue
            for ev in line.events:
                ms = ev.duration_ns / 1e6 / args.steps
                if gpu and line.name.startswith("Stream"):
                    kernels[ev.name[:110]] += ms
                elif not gpu and ev.name in names:
                    per_op[ev.name] += ms
    if gpu:
        _print_kernels(wall, kernels, args.top, names)
        return
    total = sum(per_op.values())
    by_kind: collections.Counter = collections.Counter()
    for name, ms in per_op.items():
        by_kind[names[name].split(" ->")[0].split(" (")[0].split(" 3x3")[0].split(" 1x1")[0]] += ms
    print(
        f"step wall {wall * 1e3:.0f} ms; summed thunk time {total:.0f} ms (over threads); "
        f"{faults:.0f} page faults a step"
    )
    if faults > _FAULTS_WARN:
        print(
            f"  the heap was still growing in the traced steps ({faults:.0f} page faults a step): "
            "the ops that touched new pages are inflated; run again with a larger --warmup"
        )
    print("by kind:")
    for kind, ms in by_kind.most_common():
        print(f"  {ms:9.1f} ms {100 * ms / total:5.1f}%  {kind}")
    print(f"top {args.top} ops:")
    for name, ms in per_op.most_common(args.top):
        print(f"  {ms:9.1f} ms {100 * ms / total:5.1f}%  {name}: {names[name]}")
    np.set_printoptions()


def _print_kernels(wall: float, kernels: collections.Counter, top: int, names: dict[str, str]) -> None:
    """A GPU step: its kernels' time by class and by name, per step."""
    all_ms = sum(kernels.values())
    print(f"step wall {wall * 1e3:.1f} ms; kernels on the device's streams {all_ms:.1f} ms a step")
    by_class: collections.Counter = collections.Counter()
    for name, ms in kernels.items():
        by_class[_kernel_class(name)] += ms
    print("kernels by class:")
    for kind, ms in by_class.most_common():
        print(f"  {ms:9.2f} ms {100 * ms / all_ms:5.1f}%  {kind}")
    print(f"top {top} kernels:")
    # XLA's fusions' kernels are named after their HLO instruction, with '_' for its '.' and '-'.
    by_kernel = {k.replace(".", "_").replace("-", "_"): v for k, v in names.items()}
    for name, ms in kernels.most_common(top):
        what = names.get(name) or by_kernel.get(name)
        print(f"  {ms:9.2f} ms  {name}" + (f": {what}" if what else ""))


if __name__ == "__main__":
    main()
