"""The benchmark's plumbing (no timing assertions: speed claims live in benchmarks/RESULTS.md)."""

import json
from dataclasses import asdict, replace
from pathlib import Path

import pytest
import torch

from dpnas import bench
from dpnas.bench import (
    MODES,
    _add_ratios,
    _median_of_repeats,
    format_table,
    parse_variant,
    resolve_model,
    run_benchmark,
    run_case,
    run_interleaved,
    study_points,
)
from dpnas.cli import main

TINY = asdict(resolve_model("tiny"))
STUDIES = Path(__file__).resolve().parents[1] / "studies"

FIELDS = {"model", "mode", "batch_size", "device", "step_seconds", "samples_per_second", "peak_memory_mb"}


@pytest.mark.parametrize("mode", MODES)
def test_each_mode_times_real_steps(mode):
    row = run_case(model=TINY, mode=mode, batch_size=8, steps=2, warmup=1, device="cpu")
    assert FIELDS <= set(row)
    assert row["mode"] == mode and row["device"] == "cpu"
    assert row["step_seconds"] > 0 and row["samples_per_second"] > 0 and row["peak_memory_mb"] > 0


def test_nonprivate_baseline_times_the_same_poisson_batches_as_dpnas():
    # a fixed-size baseline against Poisson batches would bias the ratio by however the sizes fell
    rows = [run_case(model=TINY, mode=mode, batch_size=8, steps=6, warmup=1, device="cpu")
            for mode in ("nonprivate", "dpnas")]
    sizes = [r["timed_batch_sizes"] for r in rows]
    assert sizes[0] == sizes[1]
    assert len(set(sizes[0])) > 1  # really Poisson: the sizes vary


@pytest.fixture
def in_process(monkeypatch):
    """Cases run in this process: the order, repeat and row logic is the same, without a fresh interpreter (about
    25 s each on the 2-core CI machine). The CLI tests below still run every case in its own process."""
    monkeypatch.setattr("dpnas.bench.run_in_own_process", lambda args, label: run_case(**args))


def test_repeats_take_turns_and_report_each_cases_median(capsys, in_process):
    rows = run_benchmark(models=["tiny"], modes=["nonprivate", "dpnas"], batch_size=4, steps=1, warmup=0,
                         device="cpu", repeats=2)
    assert [r["mode"] for r in rows] == ["nonprivate", "dpnas"]
    for r in rows:
        assert len(r["repeat_step_seconds"]) == 2
        assert r["step_seconds"] == min(r["repeat_step_seconds"])  # the lower middle of two
    progress = [line.strip() for line in capsys.readouterr().err.splitlines() if "running" in line]
    assert progress == [  # in turn, not each case twice in a row
        "running tiny / nonprivate / fp32 (repeat 1/2) ...", "running tiny / dpnas / fp32 (repeat 1/2) ...",
        "running tiny / nonprivate / fp32 (repeat 2/2) ...", "running tiny / dpnas / fp32 (repeat 2/2) ...",
    ]
    with pytest.raises(ValueError, match="repeats must be >= 1"):
        run_benchmark(models=["tiny"], modes=["dpnas"], batch_size=4, steps=1, repeats=0)


def test_median_of_repeats():
    repeats = [{"step_seconds": t, "peak_memory_mb": m, "tag": t} for t, m in [(3.0, 10), (1.0, 30), (2.0, 20)]]
    row = _median_of_repeats(repeats)
    assert row["step_seconds"] == 2.0 and row["tag"] == 2.0  # the whole median repeat, not a mix
    assert row["repeat_step_seconds"] == [3.0, 1.0, 2.0]
    assert row["peak_memory_mb"] == 30


def test_ratios_and_table():
    rows = [
        {"model": "m", "mode": "nonprivate", "batch_size": 8, "step_seconds": 1.0, "samples_per_second": 8.0, "peak_memory_mb": 1.0},
        {"model": "m", "mode": "opacus", "batch_size": 8, "step_seconds": 3.0, "samples_per_second": 2.7, "peak_memory_mb": 1.0},
        {"model": "m", "mode": "dpnas", "batch_size": 8, "step_seconds": 2.0, "samples_per_second": 4.0, "peak_memory_mb": 1.0},
    ]
    rows += [
        {"model": "m", "mode": "nonprivate", "variant": "bf16", "batch_size": 8, "step_seconds": 0.5, "samples_per_second": 16.0, "peak_memory_mb": 1.0},
        {"model": "m", "mode": "dpnas", "variant": "bf16", "batch_size": 8, "step_seconds": 0.6, "samples_per_second": 13.3, "peak_memory_mb": 1.0},
    ]
    _add_ratios(rows)
    # each variant against the non-private step of the same variant
    assert [r["slowdown_vs_nonprivate"] for r in rows] == pytest.approx([1.0, 3.0, 2.0, 1.0, 1.2])
    table = format_table(rows)
    assert "Opacus-default step time / dpnas (fp32) step time = 1.50" in table
    assert "Opacus-default step time / dpnas (bf16) step time = 5.00" in table


@pytest.mark.parametrize("mode", ["nonprivate", "dpnas"])
def test_variants_change_how_the_convolutions_run(mode, monkeypatch):
    monkeypatch.setattr(torch.backends.cudnn, "benchmark", False)  # run_case sets it for its own process
    seen = []

    def record(module, inputs, output):
        if isinstance(module, torch.nn.Conv2d) and module.training:
            seen.append((output.dtype, output.is_contiguous(memory_format=torch.channels_last)))

    handle = torch.nn.modules.module.register_module_forward_hook(record)
    try:
        for variant in ("fp32", "bf16+channels_last+cudnn_benchmark"):
            seen.clear()
            row = run_case(model=TINY, mode=mode, batch_size=8, steps=1, warmup=0, device="cpu", variant=variant)
            assert row["variant"] == variant
            assert set(seen) == ({(torch.float32, False)} if variant == "fp32" else {(torch.bfloat16, True)})
    finally:
        handle.remove()
    assert torch.backends.cudnn.benchmark


def test_variant_names_are_checked():
    assert parse_variant("fp32") == frozenset()
    assert parse_variant("channels_last+bf16") == {"bf16", "channels_last"}
    for bad in ("fp16", "bf16+", "bf16+fp32"):
        with pytest.raises(ValueError, match="unknown variant"):
            parse_variant(bad)
    with pytest.raises(ValueError, match="fp32 variant only"):
        run_case(model=TINY, mode="opacus", batch_size=8, steps=1, warmup=0, device="cpu", variant="bf16")


def test_opacus_baseline_runs_once_in_fp32_whatever_the_variants(in_process):
    rows = run_benchmark(models=["tiny"], modes=["opacus", "dpnas"], batch_size=4, steps=1, warmup=0, device="cpu",
                         variants=["fp32", "bf16"], progress=False)
    assert [(r["mode"], r["variant"]) for r in rows] == [("opacus", "fp32"), ("dpnas", "fp32"), ("dpnas", "bf16")]


def test_cli_bench_writes_rows(tmp_path, capsys):
    out = tmp_path / "bench.json"
    assert main(["bench", "--models", "tiny", "--modes", "dpnas", "--steps", "1", "--warmup", "0",
                 "--batch-size", "4", "--device", "cpu", "--json", str(out)]) == 0
    rows = json.loads(out.read_text())
    assert len(rows) == 1 and FIELDS <= set(rows[0]) and rows[0]["model"] == "tiny"
    assert "tiny" in capsys.readouterr().out


def test_cli_bench_json_keeps_the_cases_measured_before_a_stop(tmp_path, monkeypatch, capsys):
    """A GPU session's time limit stops `dpnas bench` wherever it is: the JSON already holds every finished case
    (with its ratio once the non-private case has run), not nothing."""
    out = tmp_path / "bench.json"
    seen: list[list[dict]] = []

    def case_then_stop(args, label):
        if len(seen) == 2:  # the third case: the time limit strikes
            raise KeyboardInterrupt
        row = run_case(**args)
        seen.append(row)
        return row

    monkeypatch.setattr("dpnas.bench.run_in_own_process", case_then_stop)
    assert main(["bench", "--models", "tiny", "--modes", "nonprivate,dpnas", "--variants", "fp32,channels_last",
                 "--steps", "1", "--warmup", "0", "--batch-size", "4", "--device", "cpu", "--json", str(out)]) == 130
    rows = json.loads(out.read_text())
    assert [(r["mode"], r["variant"]) for r in rows] == [("nonprivate", "fp32"), ("dpnas", "fp32")]
    assert rows[0]["slowdown_vs_nonprivate"] == 1.0 and rows[1]["slowdown_vs_nonprivate"] > 0
    assert rows[1]["step_seconds"] == seen[1]["step_seconds"]


def test_cli_bench_refuses_an_unwritable_json_before_any_case(tmp_path, monkeypatch, capsys):
    monkeypatch.setattr("dpnas.bench.run_in_own_process", lambda args, label: pytest.fail("a case ran"))
    (tmp_path / "taken").mkdir()
    assert main(["bench", "--models", "tiny", "--steps", "1", "--json", str(tmp_path / "taken")]) == 2
    assert "--json" in capsys.readouterr().err


def test_cli_bench_rejects_unknown_names(capsys):
    assert main(["bench", "--models", "nonet", "--steps", "1"]) == 2
    assert "unknown architecture 'nonet'" in capsys.readouterr().err
    assert main(["bench", "--models", "tiny", "--modes", "fast", "--steps", "1"]) == 2
    assert "unknown mode 'fast'" in capsys.readouterr().err
    assert main(["bench", "--models", "tiny", "--variants", "fp16", "--steps", "1"]) == 2
    assert "unknown variant 'fp16'" in capsys.readouterr().err
    assert main(["bench", "--models", "tiny", "--repeats", "0"]) == 2
    assert "--repeats and --n must be >= 1" in capsys.readouterr().err


def test_cli_bench_refuses_models_that_name_none(capsys, monkeypatch):
    monkeypatch.setattr("dpnas.bench.run_in_own_process", lambda args, label: pytest.fail("a case ran"))
    for models in (",", " "):  # not an empty table written where the rows go, with status 0
        assert main(["bench", "--models", models, "--steps", "1"]) == 2
        assert "names no model" in capsys.readouterr().err


def test_models_are_names_arch_files_or_recipe_files(tmp_path):
    assert resolve_model("tiny").arch["width"] == 1.0 and resolve_model("tiny").batch_size is None
    arch_file = tmp_path / "narrow.toml"
    arch_file.write_text('width = 0.5\npool = "avg_smooth"\n')
    narrow = resolve_model(str(arch_file))
    assert (narrow.label, narrow.arch["width"], narrow.arch["pool"]) == ("narrow", 0.5, "avg_smooth")
    recipe = tmp_path / "best.toml"
    recipe.write_text('[arch]\nwidth = 0.5\n[train]\nbatch_size = 128\nphysical_batch_size = 8\n'
                      '[data]\ndataset = "digits"\nimage_size = 16\n')
    point = resolve_model(str(recipe))
    assert (point.in_channels, point.image_size, point.batch_size) == (1, 16, 8)
    row = run_case(model=asdict(point), mode="dpnas", batch_size=999, steps=1, warmup=0, device="cpu")
    assert row["input_shape"] == [1, 16, 16] and row["batch_size"] == 8  # the recipe's own shape and batch
    with pytest.raises(ValueError, match="unknown"):
        resolve_model("no_such_model")


def test_study_points_are_distinct_seeded_and_at_the_studys_shape():
    points = study_points(STUDIES / "quickstart.toml", 4, seed=3)
    assert [p.label for p in points] == [f"quickstart#{i}" for i in range(4)]
    assert len({json.dumps(p.arch, sort_keys=True) for p in points}) == 4
    assert all((p.in_channels, p.image_size, p.batch_size) == (1, 16, 256) for p in points)  # its [data] image_size
    assert {p.arch["norm"] for p in points} <= {"group", "layer"}  # drawn from the study's own axes
    assert study_points(STUDIES / "quickstart.toml", 4, seed=3) == points
    assert study_points(STUDIES / "quickstart.toml", 4, seed=4) != points


def test_study_points_say_when_the_space_holds_fewer_than_asked(tmp_path, capsys):
    """A space of 2 points asked for 5 gave a table of 2 rows without a word."""
    study = tmp_path / "two.toml"
    text = (STUDIES / "quickstart.toml").read_text()
    search = text[text.index("[search]"):]
    study.write_text(text.replace(search, '[search]\nnorm = ["group", "layer"]\n'))
    assert len(study_points(study, 5)) == 2
    assert "2 distinct points found in 250 draws, fewer than --n 5" in capsys.readouterr().err


def test_study_points_train_at_the_searchs_fidelity(tmp_path):
    """A study's [fidelity] decides what its trials train: its resolution and, under TAN, the TAN batch."""
    study = tmp_path / "proxy.toml"
    study.write_text((STUDIES / "quickstart.toml").read_text()
                     + "\n[fidelity]\nimage_size = 8\ntan_batch = 64\nprivate_data_ok = false\n")
    points = study_points(study, 2, seed=3)
    assert all((p.in_channels, p.image_size, p.batch_size) == (1, 8, 64) for p in points)
    study.write_text((STUDIES / "quickstart.toml").read_text() + "\n[fidelity]\nimage_size = 8\n")
    assert all((p.image_size, p.batch_size) == (8, 256) for p in study_points(study, 2, seed=3))


def test_cli_times_study_points(tmp_path, capsys):
    out = tmp_path / "rows.json"
    study = tmp_path / "small.toml"  # the quickstart at a physical batch of 8, to keep the test quick
    study.write_text((STUDIES / "quickstart.toml").read_text().replace("physical_batch_size = 320",
                                                                      "physical_batch_size = 8"))
    assert main(["bench", "--points", str(study), "--n", "1", "--modes", "nonprivate",
                 "--steps", "1", "--warmup", "0", "--device", "cpu", "--json", str(out)]) == 0
    rows = json.loads(out.read_text())
    assert [r["model"] for r in rows] == ["quickstart#0"] and rows[0]["input_shape"] == [1, 16, 16]
    assert rows[0]["batch_size"] == 8
    assert main(["bench", "--points", str(tmp_path / "missing.toml"), "--device", "cpu"]) == 2
    assert main(["bench", "--models", "tiny", "--points", str(STUDIES / "quickstart.toml"), "--n", "0"]) == 2


def test_interleaved_modes_take_turns_on_the_same_poisson_batches(monkeypatch):
    """Whole steps of every mode in one process, the first mode rotating from round to round, so that a machine's
    drift reaches each mode alike; the process's peak memory belongs to no one mode and is not reported."""
    order = []
    timed_step = bench._Case.timed_step

    def recording(case):
        order.append(case.mode)
        timed_step(case)

    monkeypatch.setattr(bench._Case, "timed_step", recording)
    rows = run_interleaved(model=TINY, modes=["nonprivate", "opacus", "dpnas"], batch_size=8, steps=4, warmup=1,
                           device="cpu")
    assert order == ["nonprivate", "opacus", "dpnas", "opacus", "dpnas", "nonprivate",
                     "dpnas", "nonprivate", "opacus", "nonprivate", "opacus", "dpnas"]
    assert [r["mode"] for r in rows] == ["nonprivate", "opacus", "dpnas"]
    assert rows[0]["timed_batch_sizes"] == rows[2]["timed_batch_sizes"]
    assert len(set(rows[0]["timed_batch_sizes"])) > 1  # Poisson
    for r in rows:
        assert FIELDS <= set(r) and r["steps"] == 4 and r["step_seconds"] > 0
        assert r["peak_memory_mb"] is None and r["memory_kind"] is None


def test_interleave_runs_each_model_and_variant_in_one_process(monkeypatch):
    processes = []

    def in_process(args, label):
        processes.append((label, args.get("modes")))
        return bench.run_interleaved(**args) if "modes" in args else run_case(**args)

    monkeypatch.setattr("dpnas.bench.run_in_own_process", in_process)
    rows = run_benchmark(models=["tiny"], modes=["opacus", "nonprivate", "dpnas"], batch_size=4, steps=1, warmup=0,
                         device="cpu", variants=["fp32", "channels_last"], repeats=2, interleave=True,
                         progress=False)
    assert processes == 2 * [("tiny/opacus+nonprivate+dpnas/fp32", ["opacus", "nonprivate", "dpnas"]),
                             ("tiny/nonprivate+dpnas/channels_last", ["nonprivate", "dpnas"])]
    assert [(r["mode"], r["variant"]) for r in rows] == [("opacus", "fp32"), ("nonprivate", "fp32"), ("dpnas", "fp32"),
                                                         ("nonprivate", "channels_last"), ("dpnas", "channels_last")]
    for r in rows:
        assert len(r["repeat_step_seconds"]) == 2 and r["peak_memory_mb"] is None
        assert r["slowdown_vs_nonprivate"] == pytest.approx(
            r["step_seconds"] / next(n["step_seconds"] for n in rows
                                     if n["mode"] == "nonprivate" and n["variant"] == r["variant"]))
    table = format_table(rows)
    assert " - " in table.splitlines()[2]  # no peak memory


def test_cli_bench_interleave_runs_the_modes_in_one_process(tmp_path, capsys):
    out = tmp_path / "bench.json"
    assert main(["bench", "--models", "tiny", "--modes", "nonprivate,dpnas", "--steps", "2", "--warmup", "0",
                 "--batch-size", "4", "--device", "cpu", "--interleave", "--json", str(out)]) == 0
    rows = json.loads(out.read_text())
    assert [r["mode"] for r in rows] == ["nonprivate", "dpnas"]
    assert rows[0]["timed_batch_sizes"] == rows[1]["timed_batch_sizes"]
    assert all(r["peak_memory_mb"] is None for r in rows) and rows[1]["slowdown_vs_nonprivate"] > 0
    assert "tiny / nonprivate+dpnas / fp32" in capsys.readouterr().err


def test_cli_bench_json_records_the_settings_it_measured_with(tmp_path, monkeypatch, capsys):
    """The rows said neither how many untimed steps came first nor how many repeats, whether the modes took turns
    in one process, nor on how many threads: two JSON files could not be told apart, or compared fairly."""
    monkeypatch.setenv("OMP_NUM_THREADS", "1")  # each case's own process inherits it
    out = tmp_path / "bench.json"
    assert main(["bench", "--models", "tiny", "--modes", "nonprivate,dpnas", "--steps", "2", "--warmup", "1",
                 "--repeats", "2", "--batch-size", "4", "--device", "cpu", "--interleave", "--json", str(out)]) == 0
    rows = json.loads(out.read_text())
    assert len(rows) == 2
    for r in rows:
        assert (r["warmup"], r["repeats"], r["interleave"], r["threads"]) == (1, 2, True, 1), r
        assert (r["steps"], r["batch_size"], r["device"]) == (2, 4, "cpu") and len(r["repeat_step_seconds"]) == 2
    # a case whose process failed says the same
    failing = run_benchmark(models=[replace(resolve_model("tiny"), label="broken", image_size=1)], modes=["dpnas"],
                            batch_size=4, steps=1, warmup=0, device="cpu", progress=False)
    assert failing[0]["error"] and (failing[0]["warmup"], failing[0]["repeats"], failing[0]["interleave"],
                                    failing[0]["device"]) == (0, 1, False, "cpu")


def test_a_failing_case_is_a_row_with_its_error_and_the_others_still_run(tmp_path, capsys):
    """A case whose process failed (on a GPU: out of memory) ended the whole run with a traceback, and the cases
    after it (a GPU session's other modes) were never measured."""
    from dataclasses import replace

    tiny = resolve_model("tiny")
    broken = replace(tiny, label="broken", image_size=1)  # its pools shrink a 1-pixel input to nothing
    rows = run_benchmark(models=[broken, tiny], modes=["nonprivate", "dpnas"], batch_size=4, steps=1, warmup=0,
                         device="cpu", progress=False, interleave=True)
    assert [(r["model"], r["mode"]) for r in rows] == [("broken", "nonprivate"), ("broken", "dpnas"),
                                                       ("tiny", "nonprivate"), ("tiny", "dpnas")]
    assert all("Output size is too small" in r["error"] and r["step_seconds"] is None for r in rows[:2])
    assert all("error" not in r and r["step_seconds"] > 0 for r in rows[2:]) and rows[3]["slowdown_vs_nonprivate"]
    assert "failed: RuntimeError" in format_table(rows)
