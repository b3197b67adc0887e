"""benchmarks/per_sample_layers.py end to end, tiny: every layer with its methods timed and the tuner's pick."""

import json

import pytest
from bench_helpers import load_benchmark

from dpnas.arch.models import build_model
from dpnas.arch.registry import get_arch
from dpnas.dp.per_sample_layers import methods_for


def test_every_trainable_layer_gets_each_of_its_methods_timed(tmp_path, capsys):
    out = tmp_path / "layers.json"
    bench = load_benchmark("per_sample_layers")
    assert bench.main(["--models", "tiny", "--batch-size", "4", "--rounds", "1", "--json", str(out)]) == 0
    rows = json.loads(out.read_text())["rows"]
    tiny = build_model(get_arch("tiny"), num_classes=10, in_channels=3)
    layers = [m for m in tiny.modules() if any(p.requires_grad for p in m.parameters(recurse=False))]
    assert [r["type"] for r in rows] == [type(m).__name__ for m in layers]
    for row, layer in zip(rows, layers):
        assert list(row["ms"]) == list(methods_for(layer)) and all(ms > 0 for ms in row["ms"].values())
        assert row["chosen"] in row["ms"]
    assert rows[0]["input"] == [3, 32, 32] and rows[0]["grad_layout"] in ("NCHW", "NHWC")
    assert "the picked methods together" in capsys.readouterr().out


def test_tuner_repeats_record_both_ways_of_picking_and_what_the_picks_cost(tmp_path, capsys, monkeypatch):
    """`--tuner-repeats`: each layer with several candidates records the picks with and without the whole-batch
    timings, and the summary sums the whole-batch times of what was picked."""
    bench = load_benchmark("per_sample_layers")
    out = tmp_path / "layers.json"
    # batch 64: beyond the tuner's 32 samples, so dpnas's way also times the close methods on the whole batch
    assert bench.main(["--models", "tiny", "--batch-size", "64", "--rounds", "1", "--tuner-repeats", "2",
                       "--json", str(out)]) == 0
    rows = json.loads(out.read_text())["rows"]
    tuned = [r for r in rows if r["tuner_picks"]]
    assert tuned and all(r["tuner_picks"] == {} for r in rows if len(r["ms"]) == 1)
    for row in tuned:
        assert set(row["tuner_picks"]) == {"sample", "whole"}
        assert all(len(p) == 2 and set(p) <= set(row["ms"]) for p in row["tuner_picks"].values())
    cost = bench.tuner_cost(rows)
    expected = sum(sum(r["ms"][p] for p in r["tuner_picks"]["whole"]) / 2 if r["tuner_picks"] else r["ms"][r["chosen"]]
                   for r in rows)
    assert cost["whole"] == pytest.approx(expected)
    assert "the tuner's picks, mean over its repeats" in capsys.readouterr().out
    import dpnas.dp.per_sample as per_sample
    assert per_sample.FINALIST_RATIO == 1.5  # restored after the sample-only runs


def test_unknown_models_are_refused_before_any_runs(tmp_path, capsys):
    with pytest.raises(SystemExit):
        load_benchmark("per_sample_layers").main(["--models", "nonet", "--json", str(tmp_path / "x.json")])
    assert "unknown architecture 'nonet'" in capsys.readouterr().err


def test_the_shifted_candidate_is_checked_exact_then_timed_on_stride_1_convolutions(tmp_path, capsys, monkeypatch):
    out = tmp_path / "layers.json"
    bench = load_benchmark("per_sample_layers")
    assert bench.main(["--models", "tiny", "--batch-size", "4", "--rounds", "1", "--candidate", "shifted",
                       "--json", str(out)]) == 0
    rows = json.loads(out.read_text())["rows"]
    convs = [r for r in rows if r["type"] == "Conv2d"]
    assert convs and all(bench.SHIFTED in r["ms"] for r in convs)
    assert not any(bench.SHIFTED in r["ms"] for r in rows if r["type"] != "Conv2d")
    assert "with the candidate where it is faster" in capsys.readouterr().out
    # a wrong product is caught before anything is timed
    exact = bench.shifted_per_sample
    monkeypatch.setattr(bench, "shifted_per_sample", lambda conv, a, g: 2 * exact(conv, a, g))
    with pytest.raises(AssertionError):
        bench.main(["--models", "tiny", "--batch-size", "4", "--rounds", "1", "--candidate", "shifted",
                    "--json", str(out)])


def test_one_piece_times_each_method_without_the_bound_and_restores_it(tmp_path, capsys):
    import dpnas.dp.per_sample_layers as per_sample_layers

    bench = load_benchmark("per_sample_layers")
    out = tmp_path / "layers.json"
    bound = per_sample_layers._TEMPORARY_BYTES
    assert bench.main(["--models", "tiny", "--batch-size", "4", "--rounds", "2", "--one-piece",
                       "--json", str(out)]) == 0
    for row in json.loads(out.read_text())["rows"]:
        # a ghost method whose warm-up call took longer than HEAVY_GHOST_MS (a loaded machine) is timed once only,
        # and not one piece: every method that was is in "ms" too
        assert row["ms_one_piece"] and set(row["ms_one_piece"]) <= set(row["ms"])
        assert all(ms > 0 for ms in row["ms_one_piece"].values())
    assert per_sample_layers._TEMPORARY_BYTES == bound and "one piece)" in capsys.readouterr().out
