"""Can cuDNN's own fused graphs take batch norm's passes out of the step? Each conv, against XLA's.

    bash benchmarks/run_gpu.sh --cudnn_graphs    # on the GPU machine, cuDNN's Python frontend carried in wheels/
    python benchmarks/cudnn_graphs.py --batch 16 --size 360 480 --dtype bfloat16   # a GPU with torch and
                                                                                   # nvidia-cudnn-frontend

benchmarks/fused_conv.py's Pallas kernels lost to cuDNN + XLA's passes on the H200 (the forty-first
session, docs/benchmarks.md): 4.9 ms a step lost where 40% MFU needs 2.6 ms saved. What is left is
cuDNN's runtime-fused graphs, which XLA does not build: a conv with batch norm + ReLU applied to its
input as it is read and batch norm's statistics of its output written beside it, and the gradients
likewise. This times them through cuDNN's Python frontend (tensors from PyTorch, which the GPU machine
has), for every 3x3 conv of the network at its padded size, beside XLA's in the same process and
interleaved rounds (fused_conv.py's XLA functions and inputs; its four kinds):
  - "conv": XLA's conv alone against a graph of the conv alone (the same library: the baseline);
  - "layer": XLA's (batch norm + ReLU ->) conv -> statistics against scale -> bias -> ReLU -> conv ->
    genstats in one graph (the normalised activations are never written);
  - "wgrad": XLA's weight gradient from the activations the forward wrote, against scale -> bias ->
    ReLU -> wgrad (batch norm taken in as the forward does);
  - "dgrad": XLA's input gradient on through batch norm + ReLU (cuDNN's conv, then fcn.norm's two
    passes) against dgrad -> the ReLU's mask -> the two sums fcn.norm.bn_grad_from_sums takes, in one
    graph, plus that last pass by XLA (timed alone and added).
Each graph's first `--plans` execution plans (cuDNN's heuristics' order) are built and the fastest
is used, as XLA times cuDNN's algorithms. A graph cuDNN does not support is named, and XLA's time
stands for it in the totals.
Values are compared first. Not a test, and not used by fcn.
"""

from __future__ import annotations

import argparse
import ctypes
import glob
import os
import re
import sys
import sysconfig
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
import torch  # noqa: E402  (before cudnn: it loads the CUDA runtime the frontend looks for)

from benchmarks import common  # noqa: E402
from benchmarks.conv_kernels import network_convs  # noqa: E402
from benchmarks.fused_conv import (  # noqa: E402
    KINDS,
    _inputs,
    bn_relu,
    relative,
    report,
    xla_conv,
    xla_dgrad,
    xla_layer,
    xla_wgrad,
)
from benchmarks.head_loss import _ms_per_call  # noqa: E402
from fcn import norm  # noqa: E402

HEADERS = {
    "conv": "the conv alone: XLA's (cuDNN's) against a cuDNN graph of it",
    "layer": "(batch norm + ReLU ->) conv -> statistics: XLA's passes against one cuDNN graph",
    "wgrad": "the weight gradient: XLA's (from the activations written) against a cuDNN graph (batch norm taken in)",
    "dgrad": "the input gradient (on through batch norm + ReLU): cuDNN's + XLA's two passes against a graph + one",
}


def import_cudnn():
    """cuDNN's frontend, bound to the libcudnn of the nvidia-cudnn package installed beside jax's CUDA
    plugin (the frontend looks only in sysconfig's purelib, which need not be where pip put it), with
    NVRTC loaded first for its runtime-compiled kernels."""
    import nvidia.cudnn

    libs = [p for d in nvidia.cudnn.__path__ for p in glob.glob(os.path.join(d, "lib", "libcudnn.so.*[0-9]"))]
    if not libs:
        raise SystemExit(f"no libcudnn.so.N under {list(nvidia.cudnn.__path__)}")
    site = os.path.dirname(os.path.dirname(os.path.dirname(os.path.dirname(libs[0]))))
    for lib in sorted(glob.glob(os.path.join(site, "nvidia", "**", "libnvrtc*.so*"), recursive=True)):
        ctypes.CDLL(lib, mode=ctypes.RTLD_GLOBAL)
    original = sysconfig.get_path
    sysconfig.get_path = lambda name, *a, **k: site if name == "purelib" else original(name, *a, **k)
    try:
        import cudnn
    finally:
        sysconfig.get_path = original
    print(f"cuDNN frontend {cudnn.__version__}, cuDNN {cudnn.backend_version_string()} ({libs[0]})", flush=True)
    return cudnn


def nchw(t_BHWC: torch.Tensor) -> torch.Tensor:
    """An NHWC tensor as cuDNN's dimensions (N, C, H, W) with channels-last strides: no copy."""
    return t_BHWC.permute(0, 3, 1, 2)


class Graphs:
    """cuDNN graphs of one conv: `build(kind)` -> a function running it, or why cuDNN cannot."""

    def __init__(self, cudnn, handle, x, w, stats, g, plans: int, bn_dtype=torch.float32):
        self.cudnn, self.handle, self.plans = cudnn, handle, plans
        t = lambda a: torch.from_dlpack(a)  # noqa: E731  (jax arrays on the GPU, shared)
        self.x, self.g = nchw(t(x)), nchw(t(g))
        # weights as (K, C, 3, 3) with channels-last strides, in the activations' dtype
        self.w = t(w).to(self.x.dtype).permute(3, 0, 1, 2).contiguous().permute(0, 3, 1, 2)
        self.bn = None
        if stats is not None:  # batch norm + ReLU as x * mul + (bias - mean * mul), then max(0, .)
            mean, mul, bias = (t(s).reshape(1, -1, 1, 1) for s in stats)
            self.bn = (mul.to(bn_dtype).contiguous(), (bias - mean * mul).to(bn_dtype).contiguous())
        self.c, self.k = self.x.shape[1], self.w.shape[0]

    def _graph(self):
        dt = self.cudnn.data_type
        return self.cudnn.pygraph(
            io_data_type=self._type(self.x),
            intermediate_data_type=dt.FLOAT,
            compute_data_type=dt.FLOAT,
            handle=self.handle,
        )

    def _type(self, t: torch.Tensor):
        dt = self.cudnn.data_type
        return {torch.float32: dt.FLOAT, torch.bfloat16: dt.BFLOAT16, torch.float16: dt.HALF}[t.dtype]

    def _tensor(self, graph, t, name):
        return graph.tensor(name=name, dim=list(t.shape), stride=list(t.stride()), data_type=t.dtype)

    def _input(self, graph, pack, bn: bool = True, relu: bool = True):
        """X, and what the conv reads: X through batch norm (+ ReLU) where the conv has one and `bn`."""
        X = self._tensor(graph, self.x, "X")
        pack[X] = self.x
        if self.bn is None or not bn:
            return X, X
        S, B = self._tensor(graph, self.bn[0], "S"), self._tensor(graph, self.bn[1], "B")
        pack[S], pack[B] = self.bn
        pre = graph.bias(input=graph.scale(input=X, scale=S), bias=B)
        return X, graph.relu(input=pre) if relu else pre

    def _output(self, graph, pack, T, t: torch.Tensor):
        """T an output of the graph, written to t (its dims, strides and dtype)."""
        T.set_output(True).set_data_type(self._type(t)).set_dim(list(t.shape)).set_stride(list(t.stride()))
        pack[T] = t
        return t

    def _sums(self, graph, pack, y):
        """The float32 sum of y over pixels, per channel."""
        out = graph.reduction(input=y, mode=self.cudnn.reduction_mode.ADD, compute_data_type=self.cudnn.data_type.FLOAT)
        return self._output(graph, pack, out, torch.zeros(1, self.c, 1, 1, device="cuda", dtype=torch.float32))

    def build(self, kind: str):
        """A function running `kind`'s graph and returning its outputs (torch tensors), or why not."""
        graph, pack = self._graph(), {}
        conv = dict(padding=[1, 1], stride=[1, 1], dilation=[1, 1])
        b, _, h, w = self.x.shape
        if kind in ("conv", "layer"):
            _, A = self._input(graph, pack, bn=kind == "layer")
            W = self._tensor(graph, self.w, "W")
            pack[W] = self.w
            Y = graph.conv_fprop(image=A, weight=W, **conv)
            outs = [self._output(graph, pack, Y, nchw(torch.empty(b, h, w, self.k, device="cuda", dtype=self.x.dtype)))]
            if kind == "layer":
                for T in graph.genstats(input=Y):
                    zeros = torch.zeros(1, self.k, 1, 1, device="cuda", dtype=torch.float32)
                    outs.append(self._output(graph, pack, T, zeros))
        elif kind == "wgrad":
            _, A = self._input(graph, pack)
            G = self._tensor(graph, self.g, "G")
            pack[G] = self.g
            DW = graph.conv_wgrad(image=A, loss=G, **conv)
            # in the activations' dtype, as XLA's cuDNN call writes it before converting
            dw = torch.empty(self.k, 3, 3, self.c, device="cuda", dtype=self.x.dtype).permute(0, 3, 1, 2)
            outs = [self._output(graph, pack, DW, dw)]
        else:  # dgrad; after batch norm + ReLU: the ReLU's mask (its input recomputed from x), sum d, sum d * x
            G, W = self._tensor(graph, self.g, "G"), self._tensor(graph, self.w, "W")
            pack[G], pack[W] = self.g, self.w
            D = graph.conv_dgrad(loss=G, filter=W, **conv)
            d = nchw(torch.empty(b, h, w, self.c, device="cuda", dtype=self.x.dtype))
            D.set_dim(list(d.shape)).set_stride(list(d.stride()))  # cuDNN does not infer a dgrad's output
            if self.bn is None:
                outs = [self._output(graph, pack, D, d)]
            else:
                X, pre = self._input(graph, pack, relu=False)
                DR = graph.relu_backward(loss=D, input=pre)
                outs = [self._output(graph, pack, DR, d), self._sums(graph, pack, DR)]
                outs.append(self._sums(graph, pack, graph.mul(a=DR, b=X)))
        return self._plan(graph, pack, outs)

    def _plan(self, graph, pack, outs):
        """The graph's fastest of its first `plans` plans, as a function returning `outs`; why not, if none runs."""
        cudnn = self.cudnn
        try:
            graph.validate()
            graph.build_operation_graph()
            graph.create_execution_plans([cudnn.heur_mode.A, cudnn.heur_mode.FALLBACK])
            graph.check_support()
        except Exception as e:  # noqa: BLE001  (cudnnGraphNotSupportedError and the frontend's others)
            return f"not supported: {type(e).__name__}: {str(e)[:400]}"
        best, why = None, []
        for i in range(min(self.plans, graph.get_execution_plan_count())):
            try:
                graph.build_plan_at_index(i)
                ws = torch.empty(max(1, graph.get_workspace_size_plan_at_index(i)), device="cuda", dtype=torch.uint8)
                run = lambda i=i, ws=ws: graph.execute_plan_at_index(pack, ws, i, handle=self.handle)  # noqa: E731
                ms = ms_torch(run, 5)
            except Exception as e:  # noqa: BLE001
                why.append(f"plan {i}: {type(e).__name__}: {str(e)[:200]}")
                continue
            if best is None or ms < best[0]:
                best = (ms, i, run)
        if best is None:
            return "no plan ran: " + "; ".join(why)[:600]
        _, i, run = best

        def fn():
            run()
            return outs

        fn.label = f"plan {i} of {graph.get_execution_plan_count()}"
        return fn


def ms_torch(fn, calls: int) -> float:
    """Milliseconds a call, as _ms_per_call times jax's: one call first, then `calls`, synchronised."""
    fn()
    torch.cuda.synchronize()
    t = time.perf_counter()
    for _ in range(calls):
        fn()
    torch.cuda.synchronize()
    return 1e3 * (time.perf_counter() - t) / calls


def check(kind, out, ref, x, stats, count) -> str:
    """The graph's result against XLA's, as relative differences."""
    j = lambda t: t.detach().cpu().float().numpy()  # noqa: E731
    if kind == "conv":
        return f"output {relative(j(out[0].permute(0, 2, 3, 1)), ref):.2g}"
    if kind == "layer":
        y, s, q = (j(o) for o in out)
        mean = s.reshape(-1) / count
        var = q.reshape(-1) / count - mean**2
        return (f"output {relative(y.transpose(0, 2, 3, 1), ref[0]):.2g}, mean {relative(mean, ref[1][0]):.2g}, "
                f"variance {relative(var, ref[1][1]):.2g}")  # fmt: skip
    if kind == "wgrad":
        return f"weight gradient {relative(j(out[0]).transpose(2, 3, 1, 0), ref):.2g}"
    dx = last_pass(x, stats, *out)
    return f"input gradient {relative(dx, ref):.2g}"


def to_jax(t: torch.Tensor) -> jax.Array:
    """A torch tensor on the GPU as a jax array (shared, no copy); NCHW views as their NHWC storage."""
    return jax.dlpack.from_dlpack(t.permute(0, 2, 3, 1) if t.dim() == 4 and t.shape[2:] != (1, 1) else t.reshape(-1))


def last_pass(x, stats, d, s1=None, s2=None):
    """The input gradient from the dgrad graph's outputs: fcn.norm.bn_grad_from_sums's pass, by XLA."""
    if stats is None:
        return to_jax(d)
    return _last_pass(x, to_jax(d), stats[0], stats[1], to_jax(s1), to_jax(s2))


@jax.jit
def _last_pass(x, d, mean, mul, s1, s2):
    return norm.bn_grad_from_sums(x, d, mean, jnp.ones_like(mean), mul, s1, s2)[0]


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    common.add_model_flags(p)
    p.add_argument("--steps", type=int, default=10, help="calls per timed round")
    p.add_argument("--rounds", type=int, default=5, help="interleaved rounds (median reported)")
    p.add_argument("--plans", type=int, default=3, help="execution plans built and timed per graph (the fastest used)")
    p.add_argument("--convs", default="", help="only the convs whose names match this regular expression")
    p.add_argument("--kinds", default=",".join(KINDS), help="which of conv,layer,wgrad,dgrad to time")
    p.add_argument("--float16", action="store_true", help="activations in float16, not --dtype (cuDNN's frontend "
                   "tests its batch norm fusions in float16; fcn trains in bfloat16)")  # fmt: skip
    p.add_argument("--bn_dtype", default="float32", choices=("float32", "bfloat16", "float16"),
                   help="batch norm's scale and bias in the graphs (float32: fcn's)")  # fmt: skip
    args = p.parse_args(argv)
    if jax.default_backend() != "gpu":
        raise SystemExit("cudnn_graphs.py needs an NVIDIA GPU (cuDNN); this machine has none")
    cudnn = import_cudnn()
    handle = cudnn.create_handle()
    cudnn.set_stream(handle=handle, stream=torch.cuda.current_stream().cuda_stream)
    dtype = jnp.float16 if args.float16 else jnp.bfloat16 if args.dtype == "bfloat16" else jnp.float32
    rng = np.random.default_rng(0)
    print(f"{jax.devices()[0].device_kind}, jax {jax.__version__}, torch {torch.__version__}; batch {args.batch}, "
          f"{tuple(args.size)}, features {args.features}, depth {args.depth}, {jnp.dtype(dtype).name}",
          flush=True)  # fmt: skip
    rows = []
    for name, x_shape, c_out, bn in network_convs(args.batch, tuple(args.size), args.features, args.depth):
        if not re.search(args.convs, name):
            continue
        x, w, stats, g = jax.block_until_ready(_inputs(x_shape, c_out, dtype, rng))  # before torch reads them
        stats = stats if bn else None
        a = x if stats is None else bn_relu(x, stats)
        base = {
            "conv": (jax.jit(xla_conv), (x, w)),
            "layer": (jax.jit(lambda x, w, s=stats: xla_layer(x, w, s)), (x, w)),
            "wgrad": (jax.jit(xla_wgrad), (a, g, w)),
            "dgrad": (jax.jit(lambda x, g, w, s=stats: xla_dgrad(x, g, w, s)), (x, g, w)),
        }
        graphs = Graphs(cudnn, handle, x, w, stats, g, args.plans, getattr(torch, args.bn_dtype))
        fns, extra, kinds = {}, {}, args.kinds.split(",")
        for kind in kinds:
            fn = graphs.build(kind)
            if isinstance(fn, str):
                print(f"{name} {kind}: {fn}", flush=True)
                continue
            ref = base[kind][0](*base[kind][1])
            print(f"{name} {x_shape} -> {c_out}{', bn' if bn else ''}, {kind} ({fn.label}): "
                  f"{check(kind, fn(), ref, x, stats, x.size // x_shape[-1])}", flush=True)  # fmt: skip
            fns[kind] = fn
            if kind == "dgrad" and stats is not None:  # XLA's last pass, on the graph's outputs, timed alone
                d, s1, s2 = map(to_jax, fn())
                extra[kind] = (_last_pass, (x, d, stats[0], stats[1], s1, s2))
        times = {(kind, who): [] for kind in kinds for who in ("xla", "graph") if who == "xla" or kind in fns}
        for _ in range(args.rounds):
            for kind, who in times:
                if who == "xla":
                    ms = _ms_per_call(*base[kind], args.steps)
                else:
                    ms = ms_torch(fns[kind], args.steps)
                    if kind in extra:
                        ms += _ms_per_call(*extra[kind], args.steps)
                times[kind, who].append(ms)
        med = {key: float(np.median(t)) for key, t in times.items()}
        # a graph cuDNN does not support counts as XLA's own (label "-")
        row = {
            k: (med[k, "xla"], med.get((k, "graph"), med[k, "xla"]), fns[k].label if k in fns else "-") for k in kinds
        }
        rows.append((name, x_shape, c_out, bn, row))
        timed = "; ".join(f"{k} {xla:.3f} against {gr:.3f}" for k, (xla, gr, _) in row.items())
        print(f"{name} timed, XLA's ms against the graph's: {timed}", flush=True)
    report(rows, HEADERS)


if __name__ == "__main__":
    main()
