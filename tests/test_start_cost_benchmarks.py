"""benchmarks/unfold_patches.py, calibration_speed.py and pointwise_conv.py end to end: what they print and write
is what they measured, and a candidate that got the answer wrong is refused rather than timed."""

import json

import pytest
from bench_helpers import BENCHMARKS, load_benchmark


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


def test_pointwise_conv_times_both_ways_for_every_gradient_a_step_asks(tmp_path, capsys):
    out = tmp_path / "pointwise.json"
    bench = load_benchmark("pointwise_conv")
    quickstart = str(BENCHMARKS.parent / "studies" / "quickstart.toml")
    assert bench.main(["--rounds", "1", "--eval-points", quickstart, "--n", "1", "--eval-rows", "16",
                       "--json", str(out)]) == 0
    result = json.loads(out.read_text())
    rows = result["rows"]
    assert [tuple(r["case"]) for r in rows] == bench.CASES
    (point,) = result["eval_rows"]  # every quickstart point has a 1x1 transition
    assert point["model"] == "quickstart#0" and point["rows"] == 16 and point["pointwise_convs"] == 1
    assert point["oneDNN_over_products"] == pytest.approx(point["oneDNN"] / point["products"])
    for row in rows:
        for task in ("input grad", "both grads", "forward"):
            cell = row[task]
            assert cell["oneDNN"] > 0 and cell["products"] > 0
            assert cell["oneDNN_over_products"] == pytest.approx(cell["oneDNN"] / cell["products"])
    assert "input grad oneDNN / products ms" in capsys.readouterr().out


def test_pointwise_conv_refuses_products_with_other_values(tmp_path, monkeypatch):
    bench = load_benchmark("pointwise_conv")
    monkeypatch.setattr(bench, "_product_forward", lambda x, weight: bench.F.conv2d(x, weight) + 1e-2)
    with pytest.raises(AssertionError, match="products differ"):
        bench.main(["--rounds", "1", "--json", str(tmp_path / "x.json")])


def test_activation_kernels_times_every_variant_and_checks_it_is_the_same_function(tmp_path, capsys):
    bench = load_benchmark("activation_kernels")
    result = bench.main(["--shapes", "4x2x4x4", "--repeats", "2", "--json", str(tmp_path / "a.json")])
    assert {(r["activation"], r["variant"]) for r in result["rows"]} == {
        (a, v) for a in ("selu", "mish") for v in ("pytorch", "function", "composed")}
    for row in result["rows"]:
        assert row["forward_ms"] > 0 and row["max_abs_diff"] < 1e-5 and row["max_abs_grad_diff"] < 1e-5
    assert "x pytorch" in capsys.readouterr().out and (tmp_path / "a.json").exists()
