"""The figures and the report on the studies that are not a plain search: components that matter only with
others, budgets that were not searched, ablations without a finished base, damaged journals, non-private and
proxy studies. Each test builds its study without training (trials recorded as dpnas records them), except the
damaged journal, which is a plain Optuna journal damaged in place."""

import errno
import math
from pathlib import Path

import optuna
import pandas as pd
from optuna.distributions import CategoricalDistribution
from optuna.storages import JournalStorage
from optuna.storages.journal import JournalFileBackend
from optuna.trial import TrialState, create_trial

from dpnas.analysis.ablation import ablation_axes, is_ablation
from dpnas.analysis.components import component_effects, component_info, components_to_show
from dpnas.analysis.figures import study_figures
from dpnas.analysis.frame import COMPONENTS, trials_frame
from dpnas.analysis.report import figure_caption
from dpnas.arch.registry import MODELS
from dpnas.cli import main

TINY = MODELS["tiny"].arch


def _trial(value, params, *, state=TrialState.COMPLETE, **attrs):
    arch = TINY.replace(**{k: v for k, v in params.items() if k in TINY.__dataclass_fields__})
    distributions = {k: CategoricalDistribution([v]) for k, v in params.items()}
    user_attrs = {"config": arch.to_dict(), "epsilon_target": 4.0, "params": 9286, **attrs}
    if state == TrialState.COMPLETE:
        user_attrs["val_accuracy"] = value
    return create_trial(state=state, value=value if state == TrialState.COMPLETE else None, params=params,
                        distributions=distributions, user_attrs=user_attrs)


def _study(trials, name="review"):
    study = optuna.create_study(study_name=name, direction="maximize")
    for trial in trials:
        study.add_trial(trial)
    return study


def test_a_component_counts_only_the_trials_where_it_matters():
    """`groups` is suggested only with GroupNorm; the other trials keep the base's groups (8 for tiny), never
    searched. The groups figure and the component table showed a value "8" made of the layer-norm and no-norm
    trials, ranked between the searched values."""
    study = _study([_trial(0.17, {"norm": "layer"}), _trial(0.15, {"norm": "group", "groups": 2}),
                    _trial(0.24, {"norm": "group", "groups": 4}), _trial(0.15, {"norm": "none"})])
    frame = trials_frame(study)
    assert TINY.groups == 8 and sorted(frame["groups"].astype(str)) == ["2", "4", "8", "8"]  # as stored
    info = component_info(frame, "groups")
    assert info.order == ["4", "2"] and info.trials == {"4": [2], "2": [1]}
    effects = component_effects(frame)
    assert effects[effects["component"] == "groups"]["value"].tolist() == ["4", "2"]
    assert effects[effects["component"] == "norm"]["trials"].sum() == 4  # norm always matters
    # a component that varies only among trials where it does not matter says nothing
    assert "groups" not in components_to_show(_frame_groups_unused(), COMPONENTS)


def _frame_groups_unused():
    return trials_frame(_study([_trial(0.2, {"norm": "layer", "groups": 4}), _trial(0.3, {"norm": "none"})]))


def test_accuracy_against_epsilon_is_drawn_only_for_searched_budgets():
    """A total-ε study that searched batch_size got an "accuracy against the privacy budget" figure: each batch size's
    calibrated per-run ε (4.81 and 5.31) drawn as a budget that was searched. It was never searched: the
    accuracy differences are the batch size's."""
    total = _study([_trial(0.36, {"batch_size": 64}, epsilon_target=5.313449),
                    _trial(0.35, {"batch_size": 64}, epsilon_target=5.313449),
                    _trial(0.21, {"batch_size": 256}, epsilon_target=4.805092),
                    _trial(0.24, {"batch_size": 256}, epsilon_target=4.805092)])
    total.set_user_attr("total_epsilon", 8.0)
    assert "accuracy_vs_epsilon" not in study_figures(total)
    # a searched ε still gets it, grouped by the searched value (a TAN trial's own ε is its simulated run's)
    searched = _study([_trial(0.5, {"epsilon": 4.0}, epsilon_target=40.5), _trial(0.6, {"epsilon": 8.0},
                                                                                   epsilon_target=81.0),
                       _trial(0.7, {"epsilon": math.inf}, epsilon_target="inf (non-private)")])
    figures = study_figures(searched)
    assert "accuracy_vs_epsilon" in figures
    assert list(figures["accuracy_vs_epsilon"].data[0].x) == [4.0, 8.0]


def _ablation(base_state=TrialState.COMPLETE):
    trials = []
    for repeat, shift in enumerate((0.0, 0.02)):
        trials += [_trial(0.60 + shift, {"norm": "group", "lr": 0.01}, state=base_state, ablation_axis="base",
                          repeat=repeat),
                   _trial(0.50 + shift, {"norm": "layer", "lr": 0.01}, ablation_axis="norm", repeat=repeat),
                   _trial(0.40 + shift, {"norm": "group", "lr": 0.005}, ablation_axis="lr", repeat=repeat)]
    return _study(trials, name="ablation")


def test_the_ablation_caption_keeps_its_significance_threshold():
    """The caption's markup was stripped with <[^>]+>, which also ate "< 0.05)</sup>": it ended "(p."."""
    figure = study_figures(_ablation())["component_norm"]
    assert "p < 0.05" in figure.layout.title.text
    caption = figure_caption("component_norm", figure)
    assert caption.endswith("paired t-test over seeds (p < 0.05).") and "<sup" not in caption


def test_an_ablation_whose_base_point_has_no_finished_run_is_still_drawn_as_one():
    """With the base point's runs pruned (diverged) or still running, the ablation was drawn and tabled as a sample
    of the space: its lr axis vanished and "norm = group" became the median over every other move."""
    frame = trials_frame(_ablation(base_state=TrialState.PRUNED))
    assert is_ablation(frame) and ablation_axes(frame) == ["norm", "lr"]
    figures = study_figures(_ablation(base_state=TrialState.PRUNED), frame)
    assert {"component_norm", "component_lr"} <= set(figures)
    effects = component_effects(frame)
    assert effects[["component", "value"]].values.tolist() == [["norm", "layer"], ["lr", "0.005"]]
    assert not effects["base"].any() and effects["paired_seeds"].tolist() == [0, 0]


def _damaged_in_the_middle(path):
    _journal_study(path)
    lines = path.read_bytes().splitlines(keepends=True)
    middle = len(lines) // 2
    lines[middle] = bytes(b ^ 0xFF for b in lines[middle][:12]) + lines[middle][12:]
    path.write_bytes(b"".join(lines))
    return path


def test_report_and_plot_of_a_journal_damaged_in_the_middle(tmp_path, capsys):
    """The README: `report` and `plot` read the records before the damage. `report` stopped with the privacy
    statement's refusal and wrote nothing; `plot` wrote its figures, then failed attaching them (exit 2, no
    trials.csv). Now the page says the search's ε is not stated (as `dpnas best` does) and neither attaches."""
    journal = _damaged_in_the_middle(tmp_path / "s.journal")
    damaged = journal.read_bytes()
    out = tmp_path / "report.html"
    assert main(["report", str(journal), "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "note: not attached to the study" in printed
    page = out.read_text()
    assert "Not stated: the study's storage is damaged" in page and "Best recipe" in page
    assert main(["plot", str(journal), "--out", str(tmp_path / "plots")]) == 0
    assert "not attached to the study" in capsys.readouterr().out
    assert (tmp_path / "plots" / "trials.csv").is_file()
    assert journal.read_bytes() == damaged


def test_a_non_private_study_s_budget_is_not_called_dp_sgd():
    """A study with `epsilon = inf` was described in the report and the dashboard note as
    "ε = inf (non-private) for every trial (DP-SGD)"."""
    from dpnas.search.study_report import budget_words

    study = _study([])
    study.set_user_attr("epsilon", "inf (non-private)")  # as dpnas stores it
    assert "DP-SGD" not in budget_words(study).replace("without DP-SGD", "")
    assert budget_words(study) == "none: every trial trains without DP-SGD (ε = inf, non-private)"
    study.set_user_attr("epsilon", 4.0)
    assert budget_words(study) == "ε = 4.0 for every trial (DP-SGD)"


def test_the_report_says_a_proxy_trial_s_run_and_weights_are_the_proxy_s():
    """`dpnas best` says the weights of a [fidelity] search's winner are the proxy run's, not the exported recipe's;
    the report put the proxy's ε, test accuracy and weights beside the target recipe without a word."""
    from dpnas.analysis.report import _best

    proxy = _study([_trial(0.6, {"activation": "relu"}, fidelity={"data_fraction": 0.5, "epochs": 1})])
    assert "the proxy run's, not the recipe's" in _best(proxy, None, None, None)
    assert "proxy" not in _best(_study([_trial(0.6, {"activation": "relu"})]), None, None, None)


def test_a_multi_objective_report_shows_the_parameter_count_once_as_a_count():
    """With objectives val_accuracy and params, the trials table had two "params" columns, the objective's
    written as 1.42e+04."""
    from dpnas.analysis.report import _trials

    study = optuna.create_study(study_name="pareto", directions=["maximize", "minimize"])
    study.set_metric_names(["val_accuracy", "params"])
    for value, params in ((0.8, 14204), (0.7, 9286)):
        trial = _trial(value, {"width": 1.0})
        study.add_trial(create_trial(state=TrialState.COMPLETE, values=[value, params], params=trial.params,
                                     distributions=trial.distributions,
                                     user_attrs=dict(trial.user_attrs, params=params)))
    table = _trials(study, trials_frame(study))
    head = table.split("</thead>")[0]
    assert head.count("<th>params</th>") == 1 and head.count("<th>val_accuracy</th>") == 1
    assert ">14,204<" in table and "e+04" not in table


def test_a_waiting_retry_is_not_shown_with_its_original_s_failure():
    """Optuna's retry carries the failed original's attributes until it runs: the trials table showed the waiting
    retry "interrupted (Ctrl-C)", as if it had failed itself."""
    from dpnas.analysis.report import _trials

    study = _study([_trial(None, {"width": 1.0}, state=TrialState.FAIL, failure_reason="interrupted (Ctrl-C)")])
    failed = study.get_trials()[0]
    study.add_trial(create_trial(state=TrialState.WAITING, params=failed.params, distributions=failed.distributions,
                                 user_attrs=failed.user_attrs,
                                 system_attrs={"failed_trial": 0, "retry_history": [0]}))
    table = _trials(study, trials_frame(study))
    assert table.count(">interrupted (Ctrl-C)<") == 1  # the original's row only
    assert "retry of trial 0: waiting to run" in table


def test_learning_curves_are_drawn_only_where_a_trial_reported_them():
    """A multi-objective study reports no score per epoch (Optuna cannot prune it): its learning-curve figure
    was an empty plot."""
    pareto = optuna.create_study(study_name="pareto", directions=["maximize", "minimize"])
    single = _study([])
    for value in (0.8, 0.7):
        trial = _trial(value, {"width": 1.0})
        pareto.add_trial(create_trial(state=TrialState.COMPLETE, values=[value, 9286], params=trial.params,
                                      distributions=trial.distributions, user_attrs=trial.user_attrs))
        single.add_trial(create_trial(state=TrialState.COMPLETE, value=value, params=trial.params,
                                      distributions=trial.distributions, user_attrs=trial.user_attrs,
                                      intermediate_values={1: value - 0.1, 2: value}))
    assert "optuna_intermediate_values" not in study_figures(pareto)
    assert "optuna_intermediate_values" in study_figures(single)


def _journal_study(path):
    study = optuna.create_study(study_name="tiny", storage=JournalStorage(JournalFileBackend(str(path))),
                                direction="maximize")

    def objective(trial):  # recorded as dpnas records a trial, so `plot` has a figure of its own to attach
        trial.set_user_attr("config", TINY.to_dict())
        trial.set_user_attr("params", 1000 + trial.number)
        return trial.suggest_float("x", 0, 1)

    study.optimize(objective, n_trials=3)
    return path


def test_plot_refuses_an_output_folder_it_cannot_make_in_one_line(tmp_path, capsys, monkeypatch):
    """`plot --out` below a file (or its default folder being a file) ended in a NotADirectoryError traceback, and
    a folder on a read-only file system in a PermissionError one; a failed trials.csv could be left half-written."""
    journal = _journal_study(tmp_path / "s.journal")
    (tmp_path / "afile").write_text("mine")
    assert main(["plot", str(journal), "--out", str(tmp_path / "afile" / "plots")]) == 2
    assert "afile is a file, not a folder" in capsys.readouterr().err
    monkeypatch.chdir(tmp_path)
    (tmp_path / "runs").write_text("mine")  # the default folder, runs/plots-tiny, cannot be made
    assert main(["plot", str(journal)]) == 2
    assert "runs is a file, not a folder" in capsys.readouterr().err

    def full_disk(self, path, **kwargs):
        Path(path).write_text("number,sta")  # a part of the table, then the disk is full
        raise OSError(errno.ENOSPC, "No space left on device", str(path))

    monkeypatch.setattr(pd.DataFrame, "to_csv", full_disk)
    out = tmp_path / "plots"
    assert main(["plot", str(journal), "--out", str(out), "--no-attach"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "cannot write there (No space left on device)" in err
    assert not (out / "trials.csv").exists() and not list(out.glob(".trials.csv*"))
    assert (tmp_path / "runs").read_text() == (tmp_path / "afile").read_text() == "mine"


def test_plot_and_report_of_a_study_kept_read_only_write_their_files_and_say_why_not_attached(tmp_path, capsys,
                                                                                            monkeypatch):
    """A study read from where this user cannot write (a colleague's folder, a read-only mount): `plot` and `report`
    wrote their files, then stopped with an OSError traceback while attaching them to the study."""
    from optuna.artifacts import FileSystemArtifactStore

    journal = _journal_study(tmp_path / "s.journal")
    kept = journal.read_bytes()

    def read_only(self, *args, **kwargs):
        raise OSError(errno.EROFS, "Read-only file system", str(journal))

    monkeypatch.setattr(JournalFileBackend, "append_logs", read_only)
    monkeypatch.setattr(FileSystemArtifactStore, "write", read_only)
    assert main(["plot", str(journal), "--out", str(tmp_path / "plots")]) == 0
    printed = capsys.readouterr().out
    assert "not attached to the study: cannot write to its storage (Read-only file system" in printed
    assert (tmp_path / "plots" / "trials.csv").is_file()
    assert main(["report", str(journal), "--out", str(tmp_path / "report.html")]) == 0
    printed = capsys.readouterr().out
    assert "not attached to the study: cannot write to its storage (Read-only file system" in printed
    assert (tmp_path / "report.html").is_file() and journal.read_bytes() == kept


def _with_a_repeated_proposal():
    study = _study([_trial(0.5, {"activation": "relu"}), _trial(0.6, {"activation": "selu"})])
    study.add_trial(create_trial(state=TrialState.FAIL, params={"activation": "relu"},
                                 distributions={"activation": CategoricalDistribution(["relu"])},
                                 user_attrs={"duplicate_of": 0, "failure_reason": "repeats trial 0: not trained, no "
                                             "privacy budget spent, takes no slot"}))
    for key, value in {"epsilon": 4.0, "delta": 1e-5, "dataset": "digits", "sampler": "tpe", "pruner": "none",
                       "trial_count": "fixed"}.items():
        study.set_user_attr(key, value)
    return study


def test_the_dashboard_note_and_the_report_say_a_repeated_proposal_was_skipped_not_failed():
    """A proposal of a point already trained is recorded as FAIL (Optuna has no state for "skipped"): the
    dashboard's note counted it as "fail 1" with the real failures, as if a run had broken."""
    from dpnas.analysis.report import _trials
    from dpnas.search.study_privacy import study_privacy
    from dpnas.search.study_report import study_note

    study = _with_a_repeated_proposal()
    note = study_note(study, study_privacy(study), "s.journal")
    assert "- **Trials**: complete 2; " in note and "fail" not in note.split("**Trials**")[1].split(";")[0]
    assert "**Repeated proposals**: 1, shown as FAIL" in note and "no privacy budget spent" in note
    assert "(1 of them repeated proposals of a point already trained: recorded as FAIL, not trained" in _trials(
        study, trials_frame(study))
    study.add_trial(create_trial(state=TrialState.FAIL, user_attrs={"failure_reason": "CUDA out of memory"}))
    assert "- **Trials**: complete 2, fail 1; " in study_note(study, study_privacy(study), "s.journal")


def test_an_unnamed_multi_objective_study_s_values_stay_under_their_headers():
    """A multi-objective study without metric names (not written by dpnas) had one "value" column for two values:
    the second objective went under "ε spent", and every later cell one column to the right."""
    from dpnas.analysis.report import _trials

    study = optuna.create_study(study_name="pareto", directions=["maximize", "minimize"])
    trial = _trial(0.8, {"width": 1.0})
    study.add_trial(create_trial(state=TrialState.COMPLETE, values=[0.8, 14204], params=trial.params,
                                 distributions=trial.distributions, user_attrs=trial.user_attrs))
    table = _trials(study, trials_frame(study))
    head, body = table.split("</thead>")
    assert "<th>objective 0</th><th>objective 1</th><th>ε spent</th>" in head
    assert head.count("<th>") == body.split("</tr>")[0].count("<td")


def test_a_companion_storage_of_several_studies_names_the_companion_s_flag(tmp_path, capsys):
    """`plot --companion STORAGE` of several studies said "choose one with --study-name", the flag that names the
    plotted study, not the companion (--companion-name)."""
    journal = _journal_study(tmp_path / "s.journal")
    several = JournalStorage(JournalFileBackend(str(tmp_path / "two.journal")))
    for name in ("dp", "nondp"):
        optuna.create_study(study_name=name, storage=several)
    assert main(["plot", str(journal), "--companion", str(tmp_path / "two.journal"), "--out",
                 str(tmp_path / "plots")]) == 2
    assert "holds 2 studies (dp, nondp); choose one with --companion-name" in capsys.readouterr().err
    assert not (tmp_path / "plots").exists()


def test_the_pareto_front_keeps_every_trial_that_ties_a_front_point():
    """Two trials at the same cost and accuracy dominate neither each other: both are in Optuna's Pareto set (what
    `dpnas best` exports), but the figure's front kept only the first of them."""
    from dpnas.analysis.pareto import pareto_info
    from dpnas.search.runner import best_trials

    study = optuna.create_study(study_name="pareto", directions=["maximize", "minimize"])
    study.set_metric_names(["val_accuracy", "params"])
    for value, params in ((0.8, 14204), (0.7, 9286), (0.8, 14204), (0.7, 14204), (0.6, 9286), (0.8, 20000)):
        trial = _trial(value, {"width": 1.0})
        study.add_trial(create_trial(state=TrialState.COMPLETE, values=[value, params], params=trial.params,
                                     distributions=trial.distributions,
                                     user_attrs=dict(trial.user_attrs, params=params)))
    info = pareto_info(trials_frame(study), "params")
    assert info.front == [1, 0, 2] and sorted(info.front) == sorted(t.number for t in best_trials(study))
    front = study_figures(study)["pareto_params"].data[1]
    assert list(front.x) == [9286, 14204, 14204] and list(front.y) == [0.7, 0.8, 0.8]


def test_the_dp_gap_pairs_a_proxy_run_only_with_a_run_at_its_own_fidelity():
    """A [fidelity] study's private proxies (1 epoch) and a full non-private companion were drawn as one
    architecture's DP gap: most of that gap was the epochs'. A pair is one fidelity; where both are drawn, the
    proxy's bars say so."""
    from dpnas.analysis.dp_gap import dp_gap_info

    proxy = _study([_trial(0.4, {"activation": "relu"}, fidelity={"epochs": 1}),
                    _trial(0.3, {"activation": "selu"}, fidelity={"epochs": 1})])
    full = _study([_trial(0.9, {"activation": "relu"}, epsilon_target="inf (non-private)")], name="nonprivate")
    frame = trials_frame(proxy)
    assert frame["fidelity"].tolist() == ["1 epochs", "1 epochs"]
    companion = trials_frame(full)
    companion["number"] += 100_000
    assert "dp_gap" not in study_figures(proxy, frame, companion=companion)  # no run of the same kind to pair with
    both = _study([_trial(0.9, {"activation": "relu"}, epsilon_target="inf (non-private)"),
                   _trial(0.6, {"activation": "relu"}, epsilon_target="inf (non-private)", fidelity={"epochs": 1}),
                   _trial(0.8, {"activation": "relu"})], name="both")
    companion = trials_frame(both)
    companion["number"] += 100_000
    figure = study_figures(proxy, frame, companion=companion)["dp_gap"]
    assert list(figure.data[0].x) == ["activation=relu", "activation=relu (proxy: 1 epochs)"]  # smallest gap first
    assert list(figure.data[0].y) == [0.9, 0.6] and list(figure.data[1].y) == [0.8, 0.4]
    info = dp_gap_info(trials_frame(proxy))  # one fidelity alone: no pair, and no label either
    assert info.labels == []
