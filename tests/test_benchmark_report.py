"""benchmarks/speed.py's report: the per-round ratios pair the rounds of one interleaved run."""

from benchmarks import speed


def test_round_ratios_pair_each_round_with_its_fastest_torch_variant():
    # Round 2 ran slowly for everyone (load): the paired ratio stays 1.0x there, where a ratio of
    # medians would mix rounds of different load.
    tput = {
        "fcn auto": {"train": {"all_s": [1.0, 2.0, 1.0]}},
        "torch eager": {"train": {"all_s": [1.5, 2.2, 0.8]}},
        "torch compile": {"train": {"all_s": [1.2, 2.0, 0.9]}},
    }
    # Per round the fastest torch step: 1.2, 2.0, 0.8 -> ratios 1.2, 1.0, 0.8.
    assert speed._round_ratios(tput, "fcn auto", ["torch eager", "torch compile"], "train") == "1.00x (0.80-1.20)"
