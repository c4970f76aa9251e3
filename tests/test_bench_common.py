"""The benchmarks' paired-rounds helper: which round it reports and the spread it gives."""

from hps_core.bench.common import paired


def test_paired_reports_the_median_round_and_the_ratio_spread():
    rounds = iter(
        [
            {"ours": 10.0, "base": 2.0},  # 5x
            {"ours": 9.0, "base": 1.0},  # 9x
            {"ours": 6.0, "base": 2.0},  # 3x
        ]
    )
    mid, runs, (lo, hi) = paired(lambda: next(rounds), 3, "ours", "base")
    assert mid == {"ours": 10.0, "base": 2.0}
    assert [r["ours"] / r["base"] for r in runs] == [5.0, 9.0, 3.0]
    assert (lo, hi) == (3.0, 9.0)


def test_paired_with_one_round_reports_it():
    mid, runs, spread = paired(lambda: {"a": 3.0, "b": 4.0}, 1, "a", "b")
    assert mid == {"a": 3.0, "b": 4.0} and len(runs) == 1 and spread == (0.75, 0.75)
