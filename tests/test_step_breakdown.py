"""benchmarks/step_breakdown.py end to end, tiny: both models take turns and the ratio is their own."""

import inspect
import json
import platform

import pytest
from bench_helpers import BENCHMARKS, load_benchmark

from dpnas.arch.models import build_model
from dpnas.arch.registry import get_arch


def _load():
    return load_benchmark("step_breakdown")


def test_breakdown_times_both_models_and_writes_rows(tmp_path, capsys):
    out = tmp_path / "breakdown.json"
    assert _load().main(["--models", "tiny", "--batch-size", "8", "--steps", "2", "--warmup", "1",
                         "--device", "cpu", "--json", str(out)]) == 0
    result = json.loads(out.read_text())
    assert result["date"] and result["torch"] and result["args"]["models"] == "tiny"
    (row,) = result["rows"]
    parts = [row[f"{p}_ms"] for p in ("nonprivate_forward_backward", "dpnas_forward_backward", "dpnas_norms_and_sums")]
    assert all(ms > 0 for ms in parts)
    assert row["dpnas_vs_nonprivate"] == pytest.approx((parts[1] + parts[2]) / parts[0])
    tiny = build_model(get_arch("tiny"), num_classes=10, in_channels=3)
    trainable = [m for m in tiny.modules() if any(p.requires_grad for p in m.parameters(recurse=False))]
    assert sum(row["per_sample_methods"].values()) == len(trainable)  # each layer with the method it used
    assert "tiny" in capsys.readouterr().out
    assert "dpnas_images_grad_forward_backward_ms" not in row


@pytest.mark.parametrize(("flag", "variant", "other", "title"), [
    ("--images-grad", "images_grad", "stock_pointwise", "with images grad ms"),  # the images requiring a gradient
    ("--stock-pointwise", "stock_pointwise", "images_grad", "oneDNN 1x1 fwd+bwd ms"),  # 1x1 convs not as products
])
def test_breakdown_also_times_dpnas_backward_as_it_was_before_a_lever(tmp_path, capsys, flag, variant, other, title):
    out = tmp_path / "breakdown.json"
    assert _load().main(["--models", "tiny", "--batch-size", "8", "--steps", "2", "--warmup", "1", flag,
                         "--device", "cpu", "--json", str(out)]) == 0
    (row,) = json.loads(out.read_text())["rows"]
    before = row[f"dpnas_{variant}_forward_backward_ms"]
    assert before > 0 and row[f"{variant}_vs_nonprivate"] == pytest.approx(
        (before + row["dpnas_norms_and_sums_ms"]) / row["nonprivate_forward_backward_ms"])
    assert f"dpnas_{other}_forward_backward_ms" not in row
    assert title in capsys.readouterr().out


def test_breakdown_also_times_the_norms_and_sums_of_the_whole_batch_at_once(tmp_path, capsys, monkeypatch):
    from dpnas.dp import per_sample

    chunked = []
    monkeypatch.setattr(per_sample, "CHUNK_BYTES", 1)  # tiny's batch of 8 in chunks of 2 samples
    monkeypatch.setattr(per_sample, "MIN_CHUNK_SAMPLES", 2)
    sample_chunks = per_sample.sample_chunks
    monkeypatch.setattr(per_sample, "sample_chunks", lambda captured, k: chunked.append(1) or sample_chunks(captured, k))
    out = tmp_path / "breakdown.json"
    assert _load().main(["--models", "tiny", "--batch-size", "8", "--steps", "2", "--warmup", "1",
                         "--whole-batch-sums", "--device", "cpu", "--json", str(out)]) == 0
    (row,) = json.loads(out.read_text())["rows"]
    whole = row["dpnas_whole_batch_norms_and_sums_ms"]
    assert whole > 0 and row["whole_batch_sums_vs_nonprivate"] == pytest.approx(
        (row["dpnas_forward_backward_ms"] + whole) / row["nonprivate_forward_backward_ms"])
    assert len(chunked) == 3  # the chunked sums (a warm-up and two timed steps) ask for chunks; the others do not
    assert "whole-batch sums ms" in capsys.readouterr().out


def test_breakdown_rejects_unknown_models(tmp_path, capsys):
    with pytest.raises(SystemExit):
        _load().main(["--models", "nonet", "--json", str(tmp_path / "x.json")])
    assert "unknown architecture 'nonet'" in capsys.readouterr().err


@pytest.mark.parametrize("script", ["step_breakdown", "noisy_step", "per_sample_layers", "mapped_blocks"])
def test_model_benchmarks_refuse_no_models_and_an_unwritable_json_before_any_runs(script, tmp_path, capsys):
    """The scripts that share `dpnas bench`'s --models: `--models ,` would write an empty table over the committed
    results, and a --json that is a folder would fail with a traceback only after the whole run."""
    (tmp_path / "taken").mkdir()
    with pytest.raises(SystemExit):
        load_benchmark(script).main(["--models", ",", "--json", str(tmp_path / "rows.json")])
    assert "names no model" in capsys.readouterr().err and not (tmp_path / "rows.json").exists()
    with pytest.raises(SystemExit):
        load_benchmark(script).main(["--models", "tiny", "--json", str(tmp_path / "taken")])
    assert "is a directory" in capsys.readouterr().err


def test_digits_resolution_sets_the_image_size_in_the_data_table():
    module = load_benchmark("digits_resolution")
    import tomllib

    quickstart = (BENCHMARKS.parent / "studies" / "quickstart.toml").read_text()
    for size in (8, 16):
        document = tomllib.loads(module.with_image_size(quickstart, size))
        assert document["data"]["image_size"] == size and document["data"]["dataset"] == "digits"
        assert tomllib.loads(module.with_image_size(module.with_image_size(quickstart, 32), size))["data"][
            "image_size"] == size  # replaced, not added twice


def test_noisy_step_benchmark_times_both_ends_of_a_step_on_one_engine(tmp_path, capsys):
    out = tmp_path / "noisy.json"
    assert load_benchmark("noisy_step").main(["--models", "tiny", "--rounds", "3", "--json", str(out)]) == 0
    (row,) = json.loads(out.read_text())["rows"]
    assert row["model"] == "tiny" and row["parameters"] > 0
    assert set(row["ms"]) == {"DPOptimizer.step()", "dpnas"} and row["x"] == row["ms"]["DPOptimizer.step()"] / row["ms"]["dpnas"]
    assert "DPOptimizer.step() ms" in capsys.readouterr().out


def test_poisson_chunks_benchmark_counts_the_steps_a_physical_batch_splits(tmp_path, capsys):
    out = tmp_path / "chunks.json"
    study = BENCHMARKS.parent / "studies" / "quickstart.toml"
    assert load_benchmark("poisson_chunks").main(["--study", str(study), "--n", "1", "--physical", "64,4096",
                                                  "--steps", "2", "--json", str(out)]) == 0
    result = json.loads(out.read_text())
    (row,) = result["rows"]
    assert result["physical"] == [64, 4096] and row["expected_batch"] == 256
    # batches of about 256 rows: every one is split at 64, none at 4096
    assert row["split_steps"] == {"64": 2, "4096": 0}
    assert all(ms > 0 for ms in row["mean_step_ms"].values())
    assert row["x_first_over_last"] == pytest.approx(row["mean_step_ms"]["64"] / row["mean_step_ms"]["4096"])
    assert "quickstart#0" in capsys.readouterr().out


@pytest.mark.skipif(platform.libc_ver()[0] != "glibc", reason="mallopt is glibc's")
def test_mapped_blocks_times_both_allocator_settings_in_turn_and_leaves_the_heap_setting(tmp_path, monkeypatch):
    module = load_benchmark("mapped_blocks")
    settings = []
    real_set = module.set_mmap_max
    monkeypatch.setattr(module, "set_mmap_max", lambda value: settings.append(value) or real_set(value))
    out = tmp_path / "mapped.json"
    assert module.main(["--models", "tiny", "--batch-size", "8", "--steps", "1", "--rounds", "2",
                        "--json", str(out)]) == 0
    (row,) = json.loads(out.read_text())["rows"]
    # mapped then heap, then heap then mapped, and dpnas's own setting (glibc's default count) at the end
    assert settings == [65536, 0, 0, 65536, 65536]
    for name in ("mapped", "heap"):
        assert row[f"{name}_dpnas_ms"] == pytest.approx(row[f"{name}_dpnas_forward_backward_ms"]
                                                        + row[f"{name}_dpnas_norms_and_sums_ms"])
        assert row[f"{name}_dpnas_vs_nonprivate"] == pytest.approx(
            row[f"{name}_dpnas_ms"] / row[f"{name}_nonprivate_forward_backward_ms"])
    assert row["dpnas_ms_mapped_over_heap"] == pytest.approx(row["mapped_dpnas_ms"] / row["heap_dpnas_ms"])


@pytest.mark.parametrize("script", sorted(p.stem for p in BENCHMARKS.glob("*.py") if '"--json"' in p.read_text()))
def test_every_benchmark_refuses_a_json_it_could_not_write_before_it_runs(script, tmp_path, capsys, monkeypatch):
    """A --json that is a folder failed with a traceback after the whole run, and the measurements were lost."""
    (tmp_path / "taken").mkdir()
    module = load_benchmark(script)
    argv = ["--json", str(tmp_path / "taken")]
    monkeypatch.setattr("sys.argv", [script, *argv])  # the scripts whose main() reads sys.argv
    with pytest.raises(SystemExit) as exit_info:
        module.main(argv) if "argv" in inspect.signature(module.main).parameters else module.main()
    assert exit_info.value.code == 2 and "is a directory" in capsys.readouterr().err
