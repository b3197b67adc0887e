"""notebooks/reproduce_smoothnet.ipynb runs top to bottom (quick mode, digits) and prints real results.

The kernel is this interpreter (the project's venv): a kernelspec written to a temporary
JUPYTER_PATH entry points at sys.executable, so a user-level `python3` kernelspec elsewhere
cannot send the notebook to another Python.
"""

import json
import re
import sys
from pathlib import Path

import pytest

nbformat = pytest.importorskip("nbformat")
nbclient = pytest.importorskip("nbclient")
pytest.importorskip("ipykernel")

NOTEBOOK = Path(__file__).resolve().parents[1] / "notebooks" / "reproduce_smoothnet.ipynb"
KERNEL = "dpnas-test-venv"


def test_notebook_is_saved_without_outputs():
    nb = nbformat.read(NOTEBOOK, as_version=4)
    nbformat.validate(nb)
    code = [cell for cell in nb.cells if cell.cell_type == "code"]
    assert code and all(not cell.outputs and cell.execution_count is None for cell in code)
    assert "parameters" in code[0].metadata.get("tags", [])
    assert sum(cell.cell_type == "markdown" for cell in nb.cells) >= 6


@pytest.fixture
def venv_kernel(tmp_path, monkeypatch):
    spec_dir = tmp_path / "jupyter" / "kernels" / KERNEL
    spec_dir.mkdir(parents=True)
    spec = {"argv": [sys.executable, "-m", "ipykernel_launcher", "-f", "{connection_file}"],
            "display_name": "dpnas test (venv)", "language": "python"}
    (spec_dir / "kernel.json").write_text(json.dumps(spec))
    monkeypatch.setenv("JUPYTER_PATH", str(tmp_path / "jupyter"))
    return KERNEL


def test_notebook_runs_quick_and_reports_the_paper_comparison(tmp_path, monkeypatch, venv_kernel):
    out_dir = tmp_path / "runs"
    for name, value in {"QUICK": "1", "EPOCHS": "1", "DATASET": "digits", "OUT_DIR": str(out_dir),
                        "DATA_DIR": str(tmp_path / "no-data"), "DEVICE": "cpu"}.items():
        monkeypatch.setenv(f"DPNAS_NOTEBOOK_{name}", value)
    monkeypatch.setenv("OMP_NUM_THREADS", "2")
    nb = nbformat.read(NOTEBOOK, as_version=4)
    client = nbclient.NotebookClient(nb, kernel_name=venv_kernel, timeout=240, startup_timeout=120,
                                     resources={"metadata": {"path": str(tmp_path)}})
    client.execute()

    text = "\n".join(
        output.get("text", "") if output.output_type == "stream" else "".join(output.get("data", {}).get("text/plain", ""))
        for cell in nb.cells if cell.cell_type == "code" for output in cell.outputs
    )
    assert not [o for c in nb.cells if c.cell_type == "code" for o in c.outputs if o.output_type == "error"]
    assert "SmoothNet W80D50: 3,391,853 parameters (paper: 3,391,853)" in text
    assert "dataset: digits" in text

    accuracy = re.search(r"test accuracy: (\d\.\d{4})", text)
    eps = re.search(r"epsilon spent: (\d+\.\d{3}) of 7 \(delta 1e-05\)", text)
    assert accuracy and eps, text[-3000:]
    assert 0.0 <= float(accuracy.group(1)) <= 1.0
    assert 0.99 * 7 <= float(eps.group(1)) <= 7.0

    # the paper comparison table shows both published results and marks this run as not comparable
    assert "73.5" in text and "69.2" in text and "not comparable" in text
    (result_file,) = out_dir.glob("notebook-smoothnet-digits-*.json")
    result = json.loads(result_file.read_text())
    assert result["quick"] is True and len(result["history"]) == 1
    assert f"{result['test_accuracy']:.4f}" == accuracy.group(1)
    assert result["config"]["width"] == 1.0 and result["max_grad_norm"] == 6.83


def test_results_go_to_the_repositorys_runs_folder_when_jupyter_starts_in_notebooks(tmp_path, monkeypatch):
    """Jupyter runs a notebook in its own folder: the result JSON goes to the repository's runs/ (ignored by git),
    not to a notebooks/runs/ that nothing ignores."""
    (tmp_path / "notebooks").mkdir()
    monkeypatch.chdir(tmp_path / "notebooks")
    monkeypatch.delenv("DPNAS_NOTEBOOK_OUT_DIR", raising=False)
    code = [cell for cell in nbformat.read(NOTEBOOK, as_version=4).cells if cell.cell_type == "code"]
    parameters = {}
    exec(code[0].source, parameters)
    assert Path(parameters["OUT_DIR"]) == tmp_path / "runs"
