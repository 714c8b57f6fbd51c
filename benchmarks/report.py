"""benchmarks/speed.py's report: the markdown tables (command, hardware, throughput, ratios of
fcn to PyTorch, start-up, memory, FLOPs and MFU) and the analytic FLOP count."""

from __future__ import annotations

import collections
import math
import os
import platform
import re
import time


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


def onednn_calls(hlo_text: str) -> dict[str, int]:
    """{custom-call target: count} of fcn's oneDNN calls in a compiled program's text."""
    return dict(collections.Counter(re.findall(r'custom_call_target="(fcn_onednn\w*)"', hlo_text)))


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
                f"| per round, fcn / the fastest torch variant (by median): median (lowest-highest of {args.repeats}) "
                "| training | inference |",
                "| --- | --- | --- |",
            ]
            for k in fcn_keys:
                lines.append(
                    f"| {k} | {round_ratios(tput, k, torch_keys, 'train')} "
                    f"| {round_ratios(tput, k, torch_keys, 'predict')} |"
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
                        f"| {mine} / {other} | {round_ratios(tput, mine, [other], 'train')} "
                        f"| {round_ratios(tput, mine, [other], 'predict')} |"
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
        calls = tput.get("xla_flops_custom_calls") or {}
        convs = sum(n for target, n in calls.items() if target.startswith("fcn_onednn_conv"))
        if calls:
            lines[-1] += (
                f", which leaves out what its {sum(calls.values())} oneDNN custom calls compute: "
                f"{convs} convolutions, {sum(calls.values()) - convs} batch norms with ReLU"
            )
    memory = "fcn.host_memory.retain_freed_memory() in every process, fcn's and PyTorch's"
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


def round_ratios(tput: dict, fcn_key: str, torch_keys: list, what: str) -> str:
    """fcn's speed over PyTorch's best variant (the fastest by median), round by round (the times
    of one interleaved round are paired): the median ratio, its range and, with enough rounds, the
    median's interval. On a machine whose speed drifts, a ratio of medians compares rounds run
    under different loads; paired ratios do not. The variant is chosen once, not per round: the
    faster of two noisy variants in each round would be faster than either one typically is (on
    the 2-core Xeon, 21 rounds, that put camvid_cpu's inference at 0.97x against 1.01x)."""
    import numpy as np

    best = min(torch_keys, key=lambda k: np.median(tput[k][what]["all_s"]))
    ratios = np.asarray(tput[best][what]["all_s"]) / np.asarray(tput[fcn_key][what]["all_s"])
    text = f"{np.median(ratios):.2f}x ({ratios.min():.2f}-{ratios.max():.2f}"
    lo, hi, coverage = median_interval(ratios)
    if coverage >= 0.95:  # 6 rounds or more; 6-8 give the whole range
        text += f"; the median's {100 * coverage:.0f}% interval {lo:.2f}-{hi:.2f}"
    return text + ")"


def median_interval(values, level: float = 0.95) -> tuple[float, float, float]:
    """(low, high, coverage): a distribution-free confidence interval for the median of whatever
    produced `values` (independent draws), from their order statistics: the k-th smallest and the
    k-th largest, k as large as keeps the coverage 1 - 2 P(Binomial(n, 1/2) < k) at least `level`
    (k = 1, the whole range, when no k does). An interval that excludes 1.0 is a difference the
    rounds resolve; one that includes it is not."""
    x = sorted(float(v) for v in values)
    n = len(x)
    coverage = lambda k: 1 - 2 * sum(math.comb(n, i) for i in range(k)) / 2**n  # noqa: E731
    k = 1
    while k + 1 <= (n + 1) // 2 and coverage(k + 1) >= level:
        k += 1
    return x[k - 1], x[n - k], coverage(k)


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
