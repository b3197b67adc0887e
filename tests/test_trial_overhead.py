"""benchmarks/trial_overhead.py end to end, tiny: the wall-clock timers split real trials, then leave no trace."""

import json

import pytest
from bench_helpers import load_benchmark
from search_helpers import write_study


def _load():
    return load_benchmark("trial_overhead")


def test_wall_timers_split_each_trial_and_are_removed_afterwards(tmp_path, capsys):
    import dpnas.dp.engine
    import dpnas.dp.train
    import dpnas.search.runner

    originals = (dpnas.dp.engine.DPSGDEngine.step, dpnas.dp.train.count_correct, dpnas.search.runner.run_trial)
    study = write_study(tmp_path, n_trials=2, epochs=2)
    out = tmp_path / "overhead.json"
    result = _load().main(["--study", str(study), "--json", str(out)])
    assert json.loads(out.read_text()) == json.loads(json.dumps(result))
    assert result["timer"] == "wall" and result["trials"] == 2
    seconds = {row["part"]: row["seconds_per_trial"] for row in result["rows"]}
    assert seconds["steps"] > 0 and seconds["evaluation"] > 0 and seconds["model build"] > 0
    assert all(value >= 0 for value in seconds.values())
    # the parts add up to the trial, and the trials and the start to no more than the whole search
    assert result["fixed_seconds_per_trial"] == pytest.approx(sum(seconds.values()) - seconds["steps"])
    assert 2 * sum(seconds.values()) + result["search_start_s"] <= result["wall_s"] * (1 + 1e-6)
    assert (dpnas.dp.engine.DPSGDEngine.step, dpnas.dp.train.count_correct,
            dpnas.search.runner.run_trial) == originals
    assert "fixed cost" in capsys.readouterr().out


def test_profile_needs_cprofile(tmp_path):
    with pytest.raises(SystemExit):
        _load().main(["--study", str(write_study(tmp_path)), "--profile", str(tmp_path / "p.prof")])
