"""benchmarks/epoch_throughput.py end to end, tiny: both pipelines train a whole epoch and the ratio is theirs."""

import json

import pytest
from bench_helpers import load_benchmark


def test_epoch_throughput_compares_both_pipelines(tmp_path):
    module = load_benchmark("epoch_throughput")
    out = tmp_path / "epoch.json"
    module.main(["--model", "tiny", "--samples", "256", "--batch-size", "32", "--physical", "16", "--device", "cpu",
                 "--json", str(out)])
    result = json.loads(out.read_text())
    assert result["date"] and result["torch"] and result["args"]["model"] == "tiny"
    (row,) = result["rows"]
    assert row["model"] == "tiny" and row["per_sample"] == "dpnas"
    assert row["opacus_default_samples_per_second"] > 0 and row["dpnas_train_samples_per_second"] > 0
    assert row["ratio"] == pytest.approx(row["dpnas_train_samples_per_second"] / row["opacus_default_samples_per_second"])


def test_epoch_throughput_options_apply_to_dpnas_only(tmp_path, capsys):
    module = load_benchmark("epoch_throughput")
    out = tmp_path / "epoch.json"
    module.main(["--model", "tiny", "--samples", "128", "--batch-size", "32", "--physical", "32", "--device", "cpu",
                 "--set", "channels_last=true", "--json", str(out)])
    result = json.loads(out.read_text())
    assert result["rows"][0]["dpnas_options"] == {"channels_last": True}
    with pytest.raises(SystemExit):
        module.main(["--model", "tiny", "--set", "activation=relu", "--json", str(out)])
    assert "TrainConfig fields only" in capsys.readouterr().err


def test_a_run_stopped_after_a_model_keeps_that_model_in_its_json(tmp_path, monkeypatch):
    """A GPU session's time limit can stop the benchmark between models: the JSON holds the finished ones."""
    module = load_benchmark("epoch_throughput")
    out = tmp_path / "epoch.json"
    epochs = []

    def opacus_epoch_then_stop(*args, **kwargs):
        if epochs:
            raise KeyboardInterrupt  # the time limit, in the second model's Opacus epoch
        epochs.append(kwargs)
        return 100.0

    monkeypatch.setattr(module, "opacus_epoch", opacus_epoch_then_stop)
    with pytest.raises(KeyboardInterrupt):
        module.main(["--model", "tiny,tiny", "--samples", "128", "--batch-size", "32", "--physical", "32",
                     "--device", "cpu", "--json", str(out)])
    (row,) = json.loads(out.read_text())["rows"]
    assert row["model"] == "tiny" and row["ratio"] == pytest.approx(row["dpnas_train_samples_per_second"] / 100.0)
