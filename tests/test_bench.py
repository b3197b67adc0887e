"""The benchmark's plumbing (no timing assertions: speed claims live in benchmarks/RESULTS.md)."""

import json

import pytest

from dpnas.bench import MODES, _add_ratios, format_table, run_case
from dpnas.cli import main

FIELDS = {"model", "mode", "batch_size", "device", "step_seconds", "samples_per_second", "peak_memory_mb"}


@pytest.mark.parametrize("mode", MODES)
def test_each_mode_times_real_steps(mode):
    row = run_case(model_name="tiny", mode=mode, batch_size=8, steps=2, warmup=1, device="cpu")
    assert FIELDS <= set(row)
    assert row["mode"] == mode and row["device"] == "cpu"
    assert row["step_seconds"] > 0 and row["samples_per_second"] > 0 and row["peak_memory_mb"] > 0


def test_ratios_and_table():
    rows = [
        {"model": "m", "mode": "nonprivate", "batch_size": 8, "step_seconds": 1.0, "samples_per_second": 8.0, "peak_memory_mb": 1.0},
        {"model": "m", "mode": "opacus", "batch_size": 8, "step_seconds": 3.0, "samples_per_second": 2.7, "peak_memory_mb": 1.0},
        {"model": "m", "mode": "dpnas", "batch_size": 8, "step_seconds": 2.0, "samples_per_second": 4.0, "peak_memory_mb": 1.0},
    ]
    _add_ratios(rows)
    assert [r["slowdown_vs_nonprivate"] for r in rows] == [1.0, 3.0, 2.0]
    table = format_table(rows)
    assert "Opacus-default step time / dpnas step time = 1.50" in table


def test_cli_bench_writes_rows(tmp_path, capsys):
    out = tmp_path / "bench.json"
    assert main(["bench", "--models", "tiny", "--modes", "dpnas", "--steps", "1", "--warmup", "0",
                 "--batch-size", "4", "--device", "cpu", "--json", str(out)]) == 0
    rows = json.loads(out.read_text())
    assert len(rows) == 1 and FIELDS <= set(rows[0]) and rows[0]["model"] == "tiny"
    assert "tiny" in capsys.readouterr().out


def test_cli_bench_rejects_unknown_names(capsys):
    assert main(["bench", "--models", "nonet", "--steps", "1"]) == 2
    assert "unknown architecture 'nonet'" in capsys.readouterr().err
    assert main(["bench", "--models", "tiny", "--modes", "fast", "--steps", "1"]) == 2
    assert "unknown mode 'fast'" in capsys.readouterr().err
