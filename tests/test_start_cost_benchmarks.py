"""benchmarks/unfold_patches.py and benchmarks/calibration_speed.py end to end: what they print and write is what
they measured, and a candidate that got the answer wrong is refused rather than timed."""

import json

import pytest
from bench_helpers import load_benchmark


def test_unfold_patches_times_every_candidate_on_every_case(tmp_path, capsys):
    out = tmp_path / "unfold.json"
    bench = load_benchmark("unfold_patches")
    assert bench.main(["--rounds", "1", "--json", str(out)]) == 0
    rows = json.loads(out.read_text())["rows"]
    assert [(r["shape"], r["layout"], r["stride"]) for r in rows] == [(list(s), lay, st) for s, lay, st in bench.CASES]
    for row in rows:
        assert set(row["ms"]) == set(bench.CANDIDATES) and all(ms > 0 for ms in row["ms"].values())
        ratio = row["ms"]["stacked slices"] / row["ms"]["strided view (dpnas)"]
        assert row["stacked_over_dpnas"] == pytest.approx(ratio)
    assert "stacked / dpnas" in capsys.readouterr().out


def test_unfold_patches_refuses_a_candidate_with_other_values(tmp_path, monkeypatch):
    bench = load_benchmark("unfold_patches")
    monkeypatch.setitem(bench.CANDIDATES, "strided view (dpnas)", lambda conv, a: bench.stacked_slices(conv, a) + 1e-7)
    with pytest.raises(AssertionError, match="differs from F.unfold"):
        bench.main(["--rounds", "1", "--json", str(tmp_path / "x.json")])


def test_calibration_speed_counts_the_rdp_curves_of_a_calibration_that_meets_the_budget(tmp_path):
    out = tmp_path / "calibration.json"
    assert load_benchmark("calibration_speed").main(["--repeats", "1", "--json", str(out)]) == 0
    quickstart, shapes = json.loads(out.read_text())["rows"]
    # every evaluation of the root finder is one RDP curve: 5 for the quickstart (bisection took 12)
    assert 3 <= quickstart["rdp_curves"] <= 6 and len(quickstart["noise_multipliers"]) == 1
    assert len(shapes["noise_multipliers"]) == 6 and shapes["rdp_curves"] >= 6
    for row in (quickstart, shapes):
        assert 0.99 * 8.0 <= row["training_epsilon"] <= 8.0 and row["validation_epsilon"] <= 8.0
