"""notebooks/ablations.ipynb runs top to bottom on a tiny study, so it cannot rot."""

import json
import sys
from pathlib import Path

import nbformat
from nbclient import NotebookClient

ROOT = Path(__file__).parent.parent


def kernel_for_this_interpreter(directory: Path) -> str:
    """A kernelspec that runs this very interpreter (the project's venv), whatever else is installed."""
    spec_dir = directory / "kernels" / "dpnas-test"
    spec_dir.mkdir(parents=True)
    (spec_dir / "kernel.json").write_text(json.dumps({
        "argv": [sys.executable, "-m", "ipykernel_launcher", "-f", "{connection_file}"],
        "display_name": "dpnas test", "language": "python",
    }))
    return "dpnas-test"


def test_ablations_notebook_executes(tmp_path, monkeypatch):
    study = tmp_path / "tiny.toml"
    from search_helpers import write_study

    write_study(tmp_path, n_trials=4, sampler="random", epochs=1)
    monkeypatch.setenv("JUPYTER_PATH", str(tmp_path / "jupyter"))
    kernel = kernel_for_this_interpreter(tmp_path / "jupyter")
    monkeypatch.setenv("DPNAS_STUDY", str(study))
    monkeypatch.setenv("DPNAS_NOTEBOOK_QUICK", "1")
    monkeypatch.setenv("DPNAS_ROOT", str(ROOT))
    monkeypatch.setenv("DPNAS_REPORT", str(tmp_path / "report.html"))
    notebook = nbformat.read(ROOT / "notebooks" / "ablations.ipynb", as_version=4)
    assert all(not cell.get("outputs") for cell in notebook.cells if cell.cell_type == "code"), "commit it without outputs"
    NotebookClient(notebook, kernel_name=kernel, timeout=600, resources={"metadata": {"path": str(tmp_path)}}).execute()
    printed = "\n".join(out.get("text", "") for cell in notebook.cells if cell.cell_type == "code"
                        for out in cell.outputs if out.get("output_type") == "stream")
    assert "tiny: 4 trials" in printed
    assert "components shown: ['activation']" in printed
    assert "median_val_accuracy" in printed and "Pareto-optimal trials:" in printed
    assert f"report written to {tmp_path / 'report.html'}" in printed
    assert "dpnas study tiny" in (tmp_path / "report.html").read_text()
    # quick mode's trials went to a storage of their own: the study file's (and its budget) is untouched
    assert not (tmp_path / "tiny.journal").exists() and (tmp_path / "tiny.notebook-quick.journal").exists()


def test_quick_is_off_when_the_environment_says_0(monkeypatch, tmp_path):
    """DPNAS_NOTEBOOK_QUICK=0 means what it says (as in reproduce_smoothnet.ipynb): no quick trials are run."""
    notebook = nbformat.read(ROOT / "notebooks" / "ablations.ipynb", as_version=4)
    monkeypatch.chdir(tmp_path)
    for value, quick in (("0", False), ("", False), ("1", True), ("true", True)):
        monkeypatch.setenv("DPNAS_NOTEBOOK_QUICK", value)
        parameters = {}
        exec(notebook.cells[1].source, parameters)
        assert parameters["QUICK"] is quick, value
