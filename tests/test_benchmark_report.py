"""benchmarks/speed.py's report: the per-round ratios pair the rounds of one interleaved run;
profile_step.py's classes of GPU kernels; and a variant whose process dies is named, not waited for."""

import collections

import pytest

from benchmarks import common, profile_step, report, speed, variants


def test_round_ratios_pair_each_round_with_the_fastest_torch_variant_by_median():
    # Round 2 ran slowly for everyone (load): the paired ratio stays 1.0x there, where a ratio of
    # medians would mix rounds of different load.
    tput = {
        "fcn auto": {"train": {"all_s": [1.0, 2.0, 1.0]}},
        "torch eager": {"train": {"all_s": [1.5, 2.2, 0.8]}},
        "torch compile": {"train": {"all_s": [1.2, 2.0, 0.9]}},
    }
    # torch compile has the lower median (1.2 s against 1.5 s): ratios 1.2, 1.0, 0.9. Eager's fast
    # third round is not picked out: the per-round fastest would give 1.2, 1.0, 0.8.
    assert report.round_ratios(tput, "fcn auto", ["torch eager", "torch compile"], "train") == "1.00x (0.90-1.20)"


def test_the_medians_interval_comes_from_order_statistics():
    """Distribution-free: the k-th smallest and largest of n values, k the largest whose coverage,
    1 - 2 P(Binomial(n, 1/2) < k), is still at least 95%."""
    values = [1.0 + 0.01 * i for i in (7, 3, 11, 0, 14, 5, 9, 1, 12, 6, 2, 13, 8, 4, 10)]  # 1.00 .. 1.14
    lo, hi, coverage = report.median_interval(values)
    assert (lo, hi) == (1.03, 1.11)  # k = 4: the 4th smallest and the 4th largest
    assert coverage == pytest.approx(1 - 2 * (1 + 15 + 105 + 455) / 2**15)  # 0.965
    assert 1 - 2 * (1 + 15 + 105 + 455 + 1365) / 2**15 < 0.95  # k = 5 would cover less
    assert report.median_interval([3.0, 1.0, 2.0, 5.0, 4.0]) == (1.0, 5.0, 1 - 2 / 32)  # 5 rounds: the range, 94%
    # Printed with the ratios once the rounds give 95%: 15 rounds of fcn 1.0 s against torch 0.9-1.04 s.
    tput = {"fcn": {"train": {"all_s": [1.0] * 15}}, "torch": {"train": {"all_s": [v - 0.1 for v in values]}}}
    assert (
        report.round_ratios(tput, "fcn", ["torch"], "train") == "0.97x (0.90-1.04; the median's 96% interval 0.93-1.01)"
    )


def _variant(all_s):
    med = sorted(all_s)[len(all_s) // 2]
    return {w: {"all_s": all_s, "step_s": med, "img_s": 4 / med} for w in ("train", "predict")}


def test_trees_are_compared_round_by_round_and_named(tmp_path):
    (tmp_path / "fcn").mkdir()
    (tmp_path / "fcn" / "__init__.py").write_text("")
    args = speed.parse(["--batch", "4", "--conv_impls", "gemm", "--trees", f"before={tmp_path}", "--skip_startup"])
    assert common.trees(args) == {"before": str(tmp_path)}
    tput = {
        "params": 10,
        "load": (0.0, 0.0),
        "upsampling_wired": True,
        "fcn_from": {"fcn gemm": "/here", "fcn gemm @before": str(tmp_path)},
        "fcn gemm": _variant([1.0, 2.0, 1.0]),
        "fcn gemm @before": _variant([1.1, 2.4, 1.0]),
        "torch eager": _variant([1.5, 2.2, 0.8]),
    }
    res = {"throughput": tput, "startup": {}, "env": {"hardware": "h", "software": "s", "date": "d"}}
    text = report.table(args, [], res)
    # This tree over the other, per round: 1.1, 1.2, 1.0 -> median 1.1.
    assert "| fcn gemm / fcn gemm @before | 1.10x (1.00-1.20) | 1.10x (1.00-1.20) |" in text
    assert f"fcn gemm @before from {tmp_path}" in text


def test_the_xla_flops_line_counts_onednn_convolutions_apart_from_its_other_calls():
    # A CPU training step on oneDNN (--conv_impls auto): 38 convolution calls and 20 batch norms
    # with ReLU, all custom calls. The line said "its 58 oneDNN convolutions".
    hlo = "".join(
        f'%c{i} = f32[2]{{0}} custom-call(%x), custom_call_target="{target}", api_version=API_VERSION_TYPED_FFI\n'
        for i, target in enumerate(
            ["fcn_onednn_conv_fwd"] * 13
            + ["fcn_onednn_conv_bwd_data"] * 12
            + ["fcn_onednn_conv_bwd_weights"] * 13
            + ["fcn_onednn_bn_relu_fwd", "fcn_onednn_bn_relu_bwd"] * 10
            + ["__onednn$convolution"]  # XLA's own oneDNN rewrite: its FLOPs are counted
        )
    )
    calls = report.onednn_calls(hlo)
    assert sum(calls.values()) == 58 and calls["fcn_onednn_conv_bwd_data"] == 12
    args = speed.parse(["--conv_impls", "auto", "--skip_startup"])
    tput = {"params": 10, "load": (0.0, 0.0), "upsampling_wired": True, "fcn auto": _variant([1.0])}
    tput.update({"torch eager": _variant([1.0]), "xla_flops": 5.9e9, "xla_flops_custom_calls": calls})
    text = report.table(args, [], {"throughput": tput, "env": {"hardware": "h", "software": "s", "date": "d"}})
    assert "leaves out what its 58 oneDNN custom calls compute: 38 convolutions, 20 batch norms with ReLU" in text


def test_trees_must_hold_an_fcn_package(tmp_path):
    with pytest.raises(SystemExit, match="before=.*fcn/__init__.py"):
        common.trees(speed.parse(["--trees", f"before={tmp_path}"]))


@pytest.mark.parametrize(
    "name, kind",
    [
        ("sm90_xmma_fprop_implicit_gemm_bf16bf16_bf16f32_f32_nhwckrsc_nhwc", "cuDNN convolution fprop"),
        ("sm90_xmma_dgrad_implicit_gemm_bf16bf16_bf16f32_f32_nhwckrsc_nhwc", "cuDNN convolution dgrad"),
        ("sm90_xmma_wgrad_implicit_gemm_bf16bf16_bf16f32_f32_nhwckrsc_nhwc", "cuDNN convolution wgrad"),
        ("nvjet_hsh_128x256_64x4_1x2_h_bz_coopA_NNT", "matrix product"),  # cuBLAS on Hopper
        ("gemm_fusion_dot_12", "matrix product"),
        ("triton_softmax_fusion_3", "XLA fusion (Triton)"),
        ("loop_add_fusion_7", "XLA fusion loop"),
        ("input_reduce_fusion_2", "XLA fusion input"),
        ("memcpy32_post", "copy or fill"),
    ],
)
def test_gpu_kernels_are_classed_by_name(name, kind):
    assert profile_step._kernel_class(name) == kind


@pytest.mark.parametrize("n", [2, 3, 4, 5, 6])
def test_rounds_balance_the_variants_order(n):
    """Over a full cycle of rounds (n, or 2n for an odd n) every variant runs in every position
    equally often and right after every other variant equally often."""
    names = [f"v{i}" for i in range(n)]
    rounds = n if n % 2 == 0 else 2 * n
    orders = [speed._round_order(names, r) for r in range(rounds)]
    assert all(sorted(o) == names for o in orders)  # every variant once a round
    for pos in range(n):
        assert sorted(o[pos] for o in orders) == sorted(names * (rounds // n))
    pairs = collections.Counter((o[i - 1], o[i]) for o in orders for i in range(1, n))
    assert len(pairs) == n * (n - 1) and set(pairs.values()) == {rounds // n}


def test_a_variant_whose_process_dies_is_reported_and_the_run_goes_on(tmp_path, capsys):
    # A tree whose fcn kills its process at import, as XLA does with an unknown flag in XLA_FLAGS
    # (a C++ abort, no Python exception). Before, the parent kept its own copy of the worker's end of
    # the pipe, so it waited for a message forever; now it names the variant and moves on.
    (tmp_path / "fcn").mkdir()
    (tmp_path / "fcn" / "__init__.py").write_text("import os\nos.abort()\n")
    args = speed.parse(["--batch", "2", "--conv_impls", "xla", "--trees", f"dead={tmp_path}", "--skip_startup"])
    info = {}
    workers = variants.start(args, ["fcn xla @dead"], info)
    assert workers == {} and info == {}
    assert "fcn xla @dead: cannot run: the worker process exited with code -6" in capsys.readouterr().err


def test_head_loss_says_when_its_training_step_rows_cannot_use_the_kernel():
    """At --features 4 its 'fused_head=head' training-step rows ran unfused, unsaid, beside 'off'."""
    import argparse

    from benchmarks import head_loss

    args = argparse.Namespace(batch=2, size=(36, 48), depth=2, features=4)
    note = head_loss.unfused_note(args)
    assert note and "(2, 36, 48, 4)" in note and "run unfused" in note
    assert head_loss.unfused_note(argparse.Namespace(batch=2, size=(32, 48), depth=2, features=16)) is None
    assert head_loss.unfused_note(argparse.Namespace(batch=16, size=(360, 480), depth=4, features=32)) is None
