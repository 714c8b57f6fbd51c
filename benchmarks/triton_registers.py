"""fcn's Pallas kernels compiled for a GPU on a machine without one: registers, spills, shared memory.

    pip install triton==3.9.0      # once; 285 MB, not a dependency of fcn
    python benchmarks/triton_registers.py [--kernels 64x4x8x2,...] [--arch 90]
    python benchmarks/triton_registers.py --kernel conv [--kernels 128x64x32x4x3,...]

`--kernel head` (the default): for each mode ("head", "head+norm") and setting (pixels a step x
steps, warps, stages) of the fused head and loss kernel (fcn/head_loss.py) at the full recipe's
size (16 x 368 x 480 x 32 features in bfloat16, 11 classes; `--features` for other widths).
`--kernel conv`: benchmarks/conv_kernels.py's prototype kernels (the conv, its weight gradient,
and its input gradient: the conv kernel over the output gradient, its epilogue batch norm's
gradient's where the conv comes after batch norm + ReLU), for each of the network's 3x3 convs at
that size and each setting. jax lowers the kernel for CUDA to a Triton module (no GPU needed),
Triton compiles that module to PTX for the
given compute capability, and ptxas (shipped with Triton) reports each thread's registers and
spills. A setting whose threads need more than 255 registers spills to memory; fewer registers
let more blocks share a multiprocessor. The PTX also tells whether the products run on Hopper's
warpgroup instructions (wgmma: a product of 64 rows or more) or the older mma.sync, and whether
loads are pipelined through shared memory (cp.async). Triton here is PyPI's, not the one inside
jaxlib's CUDA plugin that compiles the kernel on a GPU, so this says the kernel compiles and
roughly what it costs, not how fast it runs.
Not a test.
"""

from __future__ import annotations

import argparse
import os
import re
import subprocess
import sys
import tempfile

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402

from benchmarks import conv_kernels  # noqa: E402
from benchmarks.gpu_target import abstract_gpu  # noqa: E402
from benchmarks.head_loss import describe, parse_setting  # noqa: E402
from fcn import head_loss  # noqa: E402

HEAD_SETTINGS = "64x4x1x1,128x4x1x1,128x8x1x1,256x8x1x1,128x4x8x1,128x4x8x2,128x4x8x3,64x4x8x2,128x8x8x2"


def triton_module(fn, *shapes) -> str:
    """The Triton module (MLIR text) of the one Pallas kernel in jitted `fn`, as jax lowers it for CUDA."""
    from jax._src.pallas.triton import lowering, pallas_call_registration as registration

    captured = []
    lower = lowering.lower_jaxpr_to_triton_module

    def capture(*args, **kwargs):
        result = lower(*args, **kwargs)
        captured.append(result.module.operation.get_asm(enable_debug_info=False))
        return result

    registration.lowering.lower_jaxpr_to_triton_module = capture
    try:
        with abstract_gpu():  # jax 0.11 asks which GPU to lower for
            jax.jit(fn).trace(*shapes).lower(lowering_platforms=("cuda",))
    finally:
        registration.lowering.lower_jaxpr_to_triton_module = lower
    (module,) = captured
    return module


def head_module(setting: dict, bn: bool, c: int = 32) -> str:
    """The fused network-end kernel at the full recipe's size."""
    shapes = (
        jax.ShapeDtypeStruct((16, 368, 480, c), jnp.bfloat16),
        jax.ShapeDtypeStruct((1, 1, c, 11), jnp.float32),
        jax.ShapeDtypeStruct((11,), jnp.float32),
        jax.ShapeDtypeStruct((16, 360, 480), jnp.uint8),
    )
    norm = (jnp.ones(c), jnp.zeros(c), 1e-5) if bn else None

    def fn(x, kernel, bias, labels):
        return head_loss.linear_head_cross_entropy(x, kernel, bias, labels, bn=norm, interpret=False, **setting)

    return triton_module(fn, *shapes)


CONV_KINDS = ("conv", "wgrad", "dgrad")


def conv_module(setting: dict, x_shape: tuple, c_out: int, bn: bool, kind: str = "conv") -> str:
    """One of benchmarks/conv_kernels.py's prototype kernels (`kind`: the conv, its weight gradient, its
    input gradient) for one of the network's convs (`setting` cut to the kernel's own channels)."""
    bf16, f32 = jnp.bfloat16, jnp.float32
    c_in = x_shape[-1]
    x, g = jax.ShapeDtypeStruct(x_shape, bf16), jax.ShapeDtypeStruct((*x_shape[:3], c_out), bf16)
    w, stats = jax.ShapeDtypeStruct((3, 3, c_in, c_out), f32), [jax.ShapeDtypeStruct((c_in,), f32)] * 3

    def fn(x, w_or_g, mean, mul, bias):
        bn_stats = (mean, mul, bias) if bn else None
        if kind == "dgrad":  # its input the output gradient; its epilogue masks with x's batch norm + ReLU
            return conv_kernels.conv3x3_dgrad(
                w_or_g[0], w_or_g[1], bn_stats and (x, *bn_stats), interpret=False, **setting
            )
        kernel = conv_kernels.conv3x3_wgrad if kind == "wgrad" else conv_kernels.conv3x3
        return kernel(x, w_or_g, bn_stats, interpret=False, **setting)

    return triton_module(fn, x, {"conv": w, "wgrad": g, "dgrad": (g, w)}[kind], *stats)


def cases(args):
    """(label, setting, Triton module) for each kernel and setting asked for."""
    if args.kernel == "head":
        for mode, item in ((m, k) for m in args.modes.split(",") for k in args.kernels.split(",")):
            setting = parse_setting(item)
            yield f"{mode:9s} {describe(setting)}", setting, head_module(setting, mode == "head+norm", args.features)
        return
    convs = conv_kernels.network_convs(16, (360, 480), args.features, 4)
    for name, x_shape, c_out, bn in convs:
        seen = []
        for item in (args.kernels or conv_kernels.SETTINGS).split(","):
            for kind in CONV_KINDS:  # the input gradient's channels the other way round
                channels = (c_out, x_shape[-1]) if kind == "dgrad" else (x_shape[-1], c_out)
                setting = conv_kernels.fits(*channels, conv_kernels.parse_setting(item))
                if setting is not None and (kind, setting) not in seen:  # settings cut to the same blocks: once
                    seen.append((kind, setting))
                    label = f"{name:12s} {kind:5s} {channels[0]:3d} -> {channels[1]:3d}, "
                    label += f"{conv_kernels.describe(setting):14s}"
                    yield label, setting, conv_module(setting, x_shape, c_out, bn, kind)


def instructions(ptx: str) -> str:
    """How the PTX multiplies (Hopper's asynchronous warpgroup products, wgmma; the older mma.sync; else
    none) and whether it copies global memory to shared asynchronously (cp.async, Triton's pipelining)."""
    products = "wgmma" if "wgmma.mma_async" in ptx else "mma.sync" if "mma.sync" in ptx else "no tensor-core"
    return f"{products} products, {'' if 'cp.async' in ptx else 'no '}async copies"


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--kernel", default="head", choices=("head", "conv"), help="head: fcn/head_loss.py's; conv: "
                   "benchmarks/conv_kernels.py's prototypes, for each of the network's convs")  # fmt: skip
    p.add_argument("--kernels", default="", help="settings: head_loss.py's SUBxWARPSxSTEPSxSTAGES,... or "
                   "conv_kernels.py's BMxBNxBKxWARPSxSTAGES,... (default: each benchmark's own list)")  # fmt: skip
    p.add_argument("--arch", type=int, default=90, help="compute capability (90: H100 and H200)")
    p.add_argument("--modes", default="head,head+norm", help="the kernel's modes (config.loss.fused_head)")
    p.add_argument("--features", type=int, default=32, help="the head's input channels (config.model.features)")
    args = p.parse_args()
    try:
        import triton
        from triton.backends.compiler import GPUTarget
    except ImportError:
        sys.exit("needs PyPI's Triton: pip install triton==3.9.0")
    os.environ.setdefault("TRITON_DEFAULT_FP_FUSION", "1")
    bin_dir = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin")
    ptxases = sorted(os.path.join(bin_dir, n) for n in os.listdir(bin_dir) if n.startswith("ptxas"))
    print(f"jax {jax.__version__}, triton {triton.__version__}, sm_{args.arch}a")
    if args.kernel == "head":
        args.kernels = args.kernels or HEAD_SETTINGS
    for label, setting, module in cases(args):
        with tempfile.TemporaryDirectory() as tmp:
            path = os.path.join(tmp, "kernel.ttir")
            with open(path, "w") as f:
                f.write(module)
            compiled = triton.compile(
                path,
                target=GPUTarget("cuda", args.arch, 32),
                options={"num_warps": setting["num_warps"], "num_stages": setting["num_stages"]},
            )
            ptx = compiled.asm["ptx"]
            with open(path + ".ptx", "w") as f:
                f.write(ptx)
            for ptxas in ptxases:  # Triton 3.9 ships two; the older refuses the newer PTX versions
                done = subprocess.run(
                    [ptxas, f"-arch=sm_{args.arch}a", "-v", path + ".ptx", "-o", os.devnull],
                    capture_output=True,
                    text=True,
                )
                if done.returncode == 0:
                    break
            else:
                sys.exit(f"no ptxas of {ptxases} took the PTX:\n{done.stderr}")
            report = done.stderr
        registers = re.search(r"Used (\d+) registers", report).group(1)
        spills = re.search(r"(\d+) bytes spill stores", report).group(1)
        print(
            f"{label}: {registers:>3s} registers a thread, {spills:>5s} bytes spilled, "
            f"{compiled.metadata.shared:6d} bytes of shared memory; {instructions(ptx)}",
            flush=True,
        )


if __name__ == "__main__":
    main()
