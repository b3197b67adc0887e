"""Figure data on a small real study (private and non-private trials), and every figure rendered."""

import math

import optuna
import pytest

from dpnas.analysis.budget import budget_info
from dpnas.analysis.components import component_info, components_to_show
from dpnas.analysis.dp_gap import dp_gap_info
from dpnas.analysis.figures import attach_to_dashboard, study_figures, write_figures
from dpnas.analysis.frame import COMPONENTS, finished, trials_frame
from dpnas.analysis.heatmap import width_depth_info
from dpnas.analysis.pareto import pareto_info
from dpnas.cli import main
from dpnas.search.runner import search
from dpnas.search.storage import open_storage
from dpnas.search.study_file import load_study_file

STUDY = """
[study]
name = "analysis"
n_trials = 8
sampler = "grid"
pruner = "none"

[data]
dataset = "digits"

[privacy]

[train]
recipe = "quick"
epochs = 1
batch_size = 256
physical_batch_size = 256

[arch]
base = "tiny"

[search]
epsilon = [4.0, inf]
activation = ["selu", "relu"]
width = [0.5, 1.0]
"""


@pytest.fixture(scope="module")
def study(tmp_path_factory):
    path = tmp_path_factory.mktemp("analysis") / "analysis.toml"
    path.write_text(STUDY)
    spec = load_study_file(path)
    search(spec, progress=False)
    return optuna.load_study(study_name="analysis", storage=open_storage(spec.default_storage())), path


def test_frame_has_every_field_and_result(study):
    study, _ = study
    frame = trials_frame(study)
    assert len(frame) == 8 and (frame["state"] == "COMPLETE").all()
    assert {"norm", "groups", "activation", "width", "depth", "val_accuracy", "test_accuracy", "epsilon_spent",
            "params", "epoch_seconds", "private"} <= set(frame.columns)
    assert set(frame.attrs["searched"]) == {"epsilon", "activation", "width"}
    assert frame["private"].sum() == 4 and (~frame["private"]).sum() == 4
    assert (frame.loc[frame["private"], "epsilon_spent"] <= 4.0).all()
    assert frame.loc[~frame["private"], "epsilon_spent"].apply(math.isinf).all()


def test_component_data_groups_and_orders_by_median(study):
    study, _ = study
    frame = trials_frame(study)
    info = component_info(frame, "activation")
    assert sorted(info.order) == ["relu", "selu"]
    assert all(len(info.accuracies[v]) == 4 for v in info.order)
    medians = [info.medians[v] for v in info.order]
    assert medians == sorted(medians, reverse=True)
    assert sorted(sum(info.trials.values(), [])) == list(range(8))
    assert components_to_show(frame, COMPONENTS) == ["activation"]  # the only searched component that varies


def test_width_depth_heatmap_holds_the_best_accuracy(study):
    study, _ = study
    frame = trials_frame(study)
    info = width_depth_info(frame)
    assert info.widths == [0.5, 1.0] and info.depths == [1.0]
    for j, width in enumerate(info.widths):
        expected = finished(frame)[frame["width"] == width]["val_accuracy"].max()
        assert info.best[0][j] == pytest.approx(expected) and info.counts[0][j] == 4


def test_dp_gap_pairs_private_and_nonprivate_runs_of_one_architecture(study):
    study, _ = study
    info = dp_gap_info(trials_frame(study))
    assert len(info.labels) == 4  # activation x width, each trained with and without DP
    for p, n, g in zip(info.private, info.nonprivate, info.gap):
        assert g == pytest.approx(n - p)
    assert info.gap == sorted(info.gap)


def test_pareto_front_is_not_dominated(study):
    study, _ = study
    frame = trials_frame(study)
    info = pareto_info(frame, "params")
    points = list(zip(info.trials, info.costs, info.accuracies))
    front = set(info.front)
    for number, cost, acc in points:
        dominated = any(c <= cost and a > acc for _, c, a in points)
        assert (number in front) == (not dominated and not any(c < cost and a >= acc for _, c, a in points))


def test_budget_figure_data(study):
    study, _ = study
    info = budget_info(trials_frame(study))
    assert info.epsilons == [4.0] and not math.isnan(info.nonprivate_best)
    assert info.best[0] >= info.median[0]


def test_every_figure_renders_to_html_and_is_attached(study, tmp_path):
    study, _ = study
    figures = study_figures(study)
    assert {"component_activation", "width_depth", "dp_gap", "pareto_params", "accuracy_vs_epsilon",
            "optuna_history", "optuna_intermediate_values"} <= set(figures)
    written = write_figures(figures, tmp_path, formats=("html",))
    assert sorted(p.name for p in written) == sorted([f"{name}.html" for name in figures] + ["plotly.min.js"])
    for path in written:
        if path.suffix == ".html":  # each page loads the one plotly.js beside it: opens offline, from that folder
            text = path.read_text()
            assert '<script charset="utf-8" src="plotly.min.js"></script>' in text and len(text) < 100_000
    assert (tmp_path / "plotly.min.js").stat().st_size > 1_000_000
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(p.name for p in written)  # no scratch left behind
    assert attach_to_dashboard(study, figures) >= 5
    keys = study._storage.get_study_system_attrs(study._study_id)
    assert any(k.startswith("dashboard:plot_data:dpnas-dp-gap") for k in keys)


def test_empty_study_gives_an_empty_figure_and_a_warning(tmp_path):
    empty = optuna.create_study(study_name="empty", storage=open_storage(str(tmp_path / "e.journal")))
    with pytest.warns(UserWarning, match="no completed trial"):
        figures = study_figures(empty)
    assert list(figures) == ["empty"]


def test_plot_cli(study, tmp_path, capsys):
    _, path = study
    out = tmp_path / "plots"
    assert main(["plot", str(path), "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    assert (out / "trials.csv").exists() and (out / "component_activation.html").exists()
    assert "wrote" in printed and not list(out.glob("*.png"))  # html only by default
    assert main(["plot", str(path), "--out", str(tmp_path / "gif"), "--format", "html,gif"]) == 2
    assert "unknown format 'gif'" in capsys.readouterr().err and not (tmp_path / "gif").exists()


def test_component_effects_table(study):
    from dpnas.analysis.components import component_effects

    study, _ = study
    table = component_effects(trials_frame(study))
    assert list(table["component"]) == ["activation", "activation"]
    assert table["trials"].tolist() == [4, 4]
    assert table.iloc[0]["median_minus_best_median"] == 0.0
    assert table.iloc[1]["median_minus_best_median"] <= 0.0
