"""A stopped private run continues as the same run (dpnas.dp.resume): the same steps, the same accounting, and for a
reproducible run the same model bit for bit; a secret run's batches and noise stay unreproducible from the state."""

import json
import signal
from pathlib import Path

import pytest
import torch

import dpnas.dp.engine as engine_module
import dpnas.reproduce as reproduce_module
from dpnas import MODELS
from dpnas.cli import main
from dpnas.data.datasets import load_dataset
from dpnas.dp.checkpoint import checkpoint_dict, save_checkpoint
from dpnas.dp.config import PrivacyConfig, TrainConfig
from dpnas.dp.recipe_file import DataSettings
from dpnas.dp.resume import ResumeError, load_state, resume_path, save_state
from dpnas.dp.train import train
from dpnas.search.trial_resume import TrialStateKeeper

TINY = MODELS["tiny"].arch


@pytest.fixture(scope="module")
def digits():
    return load_dataset("digits", val_fraction=0.2, seed=0, image_size=16)


def recipe(**changes):
    # EMA, a plateau schedule and augmentation: every piece of state a resumed run must carry on
    base = {"epochs": 3, "batch_size": 128, "physical_batch_size": 128, "optimizer": "nadam", "lr": 2e-3,
            "ema_decay": 0.9, "schedule": "plateau", "plateau_patience": 0, "augment": True}
    return TrainConfig(**{**base, **changes})


def stop_at_step(monkeypatch, step: int, signum=signal.SIGINT):
    """A real signal (Ctrl-C, or a scheduler's SIGTERM) arriving *inside* DP-SGD step number `step` (1-based)."""
    original = engine_module.DPSGDEngine.step
    calls = []

    def step_with_signal(self, *args, **kwargs):
        calls.append(1)
        if len(calls) == step:
            signal.raise_signal(signum)
        return original(self, *args, **kwargs)

    monkeypatch.setattr(engine_module.DPSGDEngine, "step", step_with_signal)
    return calls


def run(digits, privacy, *, resume=None, keep=None, cfg=None):
    trained = []
    result = train(TINY, digits, train_cfg=cfg or recipe(), privacy=privacy, progress=False,
                   on_trained=trained.append, resume=resume, keep_state=keep)
    return result, {k: v.clone() for k, v in trained[0].state_dict().items()}


def stopped_state(digits, privacy, monkeypatch, tmp_path, step):
    kept = []
    with monkeypatch.context() as patch:
        stop_at_step(patch, step)
        result, _ = run(digits, privacy, keep=kept.append)
    assert result["interrupted"] and result["steps"] == step  # the step the signal landed in was finished
    path = save_state(kept[-1], tmp_path / f"stopped-{step}.resume.pt")  # and through the file, as the CLI does
    return result, load_state(path)


def small_study(tmp_path, *, reproducible=False):
    """Two random trials of 3 epochs of 4 steps (digits at 16 px): a search in seconds."""
    from search_helpers import write_study

    from dpnas.search.study_file import load_study_file

    path = write_study(tmp_path, n_trials=2, sampler="random", epochs=3)
    text = path.read_text().replace("val_fraction = 0.2\n", "val_fraction = 0.2\nimage_size = 16\n")
    path.write_text(text.replace("[privacy]\n", "[privacy]\nreproducible = true\n") if reproducible else text)
    return load_study_file(path)


class FirstEpochOnly(TrialStateKeeper):
    """A trial's keeper as a worker killed later leaves it: only its first epoch's state was written."""

    def __call__(self, state):
        if not state["stopped"] and state["progress"]["epoch"] == 1:
            super().__call__({**state, "stopped": True})


@pytest.mark.parametrize("stop", [13, 9, 27], ids=["mid-epoch", "an epoch's last step", "the run's last step"])
def test_a_reproducible_run_stopped_and_resumed_is_the_uninterrupted_run_bit_for_bit(digits, monkeypatch, tmp_path,
                                                                                        stop):
    privacy = PrivacyConfig(epsilon=4.0, reproducible=True)
    whole, whole_weights = run(digits, privacy)
    assert whole["steps"] == 27 and len(whole["history"]) == 3
    stopped, state = stopped_state(digits, privacy, monkeypatch, tmp_path, stop)
    assert len(stopped["history"]) == (stop - 1) // 9  # a stop in an epoch's last step closes that epoch on resume
    resumed, resumed_weights = run(digits, privacy, resume=state)

    assert resumed["steps"] == resumed["planned_steps"] == 27 and not resumed["interrupted"]
    assert resumed["resumed_at_steps"] == [stop]
    assert resumed_weights.keys() == whole_weights.keys()
    for name, tensor in whole_weights.items():
        assert torch.equal(resumed_weights[name], tensor), name
    keys = ("epoch", "steps", "train_loss", "val_accuracy", "epsilon_spent", "lr")
    assert [{k: h[k] for k in keys} for h in resumed["history"]] == [{k: h[k] for k in keys} for h in whole["history"]]
    # the accountant went on from the first part's history: the same ε as one run, never a run and a half
    assert resumed["epsilon_spent"] == whole["epsilon_spent"] <= 4.0
    assert resumed["validation_epsilon"] == whole["validation_epsilon"]


def test_a_secret_run_keeps_no_secret_generator_and_resumes_with_fresh_batches_and_noise(digits, monkeypatch,
                                                                                        tmp_path):
    privacy = PrivacyConfig(epsilon=4.0)
    stopped, state = stopped_state(digits, privacy, monkeypatch, tmp_path, 13)
    assert set(state["generators"]) == {"augment"}  # augmentation is not the mechanism; the rest are secret
    first, first_weights = run(digits, privacy, resume=state)
    second, second_weights = run(digits, privacy, resume=load_state(tmp_path / "stopped-13.resume.pt"))
    assert not all(torch.equal(first_weights[k], second_weights[k]) for k in first_weights)
    for result in (first, second):
        assert result["steps"] == 27
        assert result["history"][0]["val_accuracy"] == stopped["history"][0]["val_accuracy"]  # released before
        assert result["epsilon_spent"] == first["epsilon_spent"] and 0.99 * 4.0 <= result["epsilon_spent"] <= 4.0


def test_a_reproducible_run_s_state_is_never_continued_as_a_secret_run(digits, monkeypatch, tmp_path):
    """A reproducible run's state holds its sampling and noise generators. Continued with secret seeds (an edited
    file, a caller's other PrivacyConfig), they were restored all the same: the whole run's batches and noise were
    regenerable from its seed and its state, and the result said `reproducible: false`, a model fit to release.
    Refused before the run is planned (a search's retry then trains its own run)."""
    _, state = stopped_state(digits, PrivacyConfig(epsilon=4.0, reproducible=True), monkeypatch, tmp_path, 13)
    assert {"sampling", "noise", "val_noise"} <= set(state["generators"])
    planned = []
    with pytest.raises(ResumeError, match="reproducible run"):
        train(TINY, digits, train_cfg=recipe(), privacy=PrivacyConfig(epsilon=4.0), progress=False, resume=state,
              on_plan=planned.append)
    assert planned == []


def test_a_state_whose_plan_or_data_changed_is_refused_before_a_step(digits, monkeypatch, tmp_path):
    privacy = PrivacyConfig(epsilon=4.0, reproducible=True)
    _, state = stopped_state(digits, privacy, monkeypatch, tmp_path, 5)
    calls = stop_at_step(monkeypatch, 10**9)
    state["plan"]["noise_multiplier"] *= 0.5  # an edited file: half the noise, twice the real ε
    with pytest.raises(ResumeError, match="noise_multiplier"):
        run(digits, privacy, resume=state)
    with pytest.raises(ResumeError, match="sample_rate"):  # the same file at another batch size
        run(digits, privacy, resume=load_state(tmp_path / "stopped-5.resume.pt"), cfg=recipe(batch_size=64))
    assert calls == []


def test_a_file_that_is_not_a_resume_state_is_refused_in_one_line(tmp_path, digits):
    garbage = tmp_path / "garbage.pt"
    garbage.write_bytes(b"not a torch file")
    with pytest.raises(ResumeError, match="not a readable dpnas resume state"):
        load_state(garbage)
    weights = tmp_path / "weights.pt"
    model = torch.nn.Linear(2, 2)
    save_checkpoint(checkpoint_dict(model, arch=TINY, train_cfg=recipe(), privacy=PrivacyConfig(), data=digits,
                                    data_settings=DataSettings(dataset="digits"), results={}), weights)
    with pytest.raises(ResumeError, match="not a dpnas resume state"):
        load_state(weights)
    with pytest.raises(ResumeError, match="no such resume state"):
        load_state(tmp_path / "missing.resume.pt")


def test_dpnas_train_stopped_by_sigterm_resumes_from_the_file_it_names(monkeypatch, tmp_path, capsys):
    out, weights = tmp_path / "run.json", tmp_path / "run.pt"
    state_file = resume_path(out)
    args = ["train", "tiny", "--dataset", "digits", "--image-size", "16", "--epochs", "2", "--batch-size", "128",
            "--physical-batch-size", "128", "--out", str(out), "--weights", str(weights), "--quiet"]
    with monkeypatch.context() as patch:
        stop_at_step(patch, 12, signal.SIGTERM)  # a cluster's warning before its SIGKILL
        assert main(args) == 130
    stopped = json.loads(out.read_text())
    assert stopped["interrupted"] and stopped["steps"] == 12
    assert f"dpnas train --resume {state_file}" in capsys.readouterr().out
    assert state_file.is_file()

    # settings come from the state: a flag that would change the run is refused, the file untouched
    before = state_file.read_bytes()
    assert main(["train", "--resume", str(state_file), "--epochs", "3"]) == 2
    assert "drop --epochs" in capsys.readouterr().err
    # records other than the ones it started on are refused
    edited = load_state(state_file)
    edited["data_fingerprint"] = "0" * 32
    other = save_state(edited, tmp_path / "edited.resume.pt")
    assert main(["train", "--resume", str(other), "--quiet"]) == 2
    assert "differ from the records this run started on" in capsys.readouterr().err
    assert state_file.read_bytes() == before

    assert main(["train", "--resume", str(state_file), "--quiet"]) == 0
    finished = json.loads(out.read_text())
    assert finished["steps"] == finished["planned_steps"] == 18 and not finished["interrupted"]
    assert finished["resumed_at_steps"] == [12] and finished["epsilon_spent"] <= 8.0
    assert [h["epoch"] for h in finished["history"]] == [1, 2]
    assert not state_file.exists() and weights.is_file()  # finished: nothing left to continue


def test_dpnas_train_leaves_no_resume_state_older_than_a_score_it_showed(monkeypatch, tmp_path, capsys):
    """A state that could not be written (a full disk) left the previous epoch's file in place while the run went on
    to show and write later epochs' scores; `--resume` of it trained those epochs again and released their scores a
    second time, from another branch of the run than the one its epsilon covers. The stale file is removed."""
    import dpnas.dp.resume as resume_module

    out = tmp_path / "run.json"
    state_file = resume_path(out)
    original, writes = resume_module.save_state, []

    def disk_full_after_the_first(state, path):
        writes.append(1)
        if len(writes) > 1:
            raise OSError(28, "No space left on device")
        return original(state, path)

    with monkeypatch.context() as patch:
        patch.setattr(resume_module, "save_state", disk_full_after_the_first)
        stop_at_step(patch, 22)  # epoch 3 of 9-step epochs: epochs 1 and 2 released
        assert main(["train", "tiny", "--dataset", "digits", "--image-size", "16", "--epochs", "3",
                     "--batch-size", "128", "--physical-batch-size", "128", "--out", str(out), "--quiet"]) == 130
    assert [h["epoch"] for h in json.loads(out.read_text())["history"]] == [1, 2]
    captured = capsys.readouterr()
    assert "cannot write the resume state" in captured.err and "--resume" not in captured.out
    assert not state_file.exists()  # epoch 1's state, continued, would release epoch 2 again


def test_a_finished_run_leaves_no_resume_state(tmp_path):
    out = tmp_path / "run.json"
    assert main(["train", "tiny", "--dataset", "digits", "--image-size", "16", "--epochs", "1", "--batch-size", "256",
                 "--out", str(out), "--quiet"]) == 0
    assert json.loads(out.read_text())["resumed_at_steps"] == []
    assert list(tmp_path.iterdir()) == [out]


def test_a_stopped_reproduction_keeps_its_finished_run_and_resumes_the_stopped_one(monkeypatch, tmp_path):
    from dpnas.reproduce import run_reproduction

    def reproduce(**changes):
        return run_reproduction("resnet9-scalenorm", quick=True, data_dir=tmp_path / "none", out_dir=tmp_path,
                                progress=False, device="cpu", **changes)

    with monkeypatch.context() as patch:
        stop_at_step(patch, 8 + 3)  # inside the second run's third step (each quick run takes 8)
        stopped = reproduce()
    assert [r["status"] for r in stopped] == ["finished", "interrupted"]
    state_file = tmp_path / "reproduce-resnet9-scalenorm-cifar10-quick-resnet9.resume.pt"
    assert state_file.is_file()
    calls = stop_at_step(monkeypatch, 10**9)
    # other settings (here: more epochs) are not the run that stopped: refused before any run trains, the state kept
    with monkeypatch.context() as patch:
        patch.setattr(reproduce_module, "QUICK_EPOCHS", 3)
        with pytest.raises(ResumeError, match="other settings or data"):
            reproduce()
    assert state_file.is_file() and calls == []

    again = reproduce()
    assert len(calls) == 8 - 3  # the finished run is not trained again; the stopped one only takes its last steps
    assert again[0] == stopped[0]
    assert again[1]["status"] == "finished" and again[1]["epochs"] == 2
    result = json.loads(Path(again[1]["result_path"]).read_text())
    assert result["resumed_at_steps"] == [3] and result["steps"] == result["planned_steps"] == 8
    assert 0.99 * 8 <= result["epsilon_spent"] <= 8
    # the continued run's result replaces its stopped part's: one file a run, none left saying "interrupted"
    assert again[1]["result_path"] == stopped[1]["result_path"]
    assert len(list(tmp_path.glob("reproduce-resnet9_scalenorm-resnet9-digits-quick-*.json"))) == 1
    assert not state_file.exists()
    assert not (tmp_path / "reproduce-resnet9-scalenorm-cifar10-quick.progress.json").exists()
    # finished as a whole: the same command is a new reproduction
    calls.clear()
    reproduce()
    assert len(calls) == 16


def test_the_resume_state_benchmark_writes_a_row_a_network(tmp_path):
    import importlib.util

    spec = importlib.util.spec_from_file_location("resume_state", Path(__file__).parents[1] / "benchmarks" /
                                                  "resume_state.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    out = tmp_path / "resume_state.json"
    assert module.main(["--repeats", "1", "--dir", str(tmp_path), "--json", str(out)]) == 0
    rows = json.loads(out.read_text())["rows"]
    assert [r["network"] for r in rows] == list(module.NETWORKS)
    for row in rows:  # the weights and NAdam's two moments, in float32: at least 12 bytes a parameter
        assert row["megabytes"] * 1e6 >= 12 * row["params"] and row["median_ms"] > 0
    assert sorted(p.name for p in tmp_path.iterdir()) == ["resume_state.json"]  # its scratch folder is gone


def test_a_search_trial_stopped_by_sigterm_is_continued_by_its_retry_and_charged_once(tmp_path, monkeypatch):
    """A preempted trial's retry trained the point again from the start: a second run on the same records,
    charged again. Its retry now continues the stopped run (its state in the study's artifact store), under the
    plan the stopped trial recorded: one run, charged once, and for a reproducible study the very run an
    uninterrupted search trains."""
    import optuna

    from dpnas.search.runner import search
    from dpnas.search.storage import open_storage
    from dpnas.search.study_privacy import study_privacy

    spec = small_study(tmp_path, reproducible=True)
    whole_url, stopped_url = str(tmp_path / "whole.journal"), str(tmp_path / "stopped.journal")
    calls = stop_at_step(monkeypatch, 10**9)
    whole = search(spec, storage_url=whole_url, progress=False)
    preflight = 1  # the search's one step before its first trial
    per_trial = (len(calls) - preflight) // 2  # 3 epochs of round(1152 / 256) steps
    assert per_trial == 12

    calls = stop_at_step(monkeypatch, preflight + 6, signal.SIGTERM)  # inside the first trial's second epoch
    with pytest.raises(KeyboardInterrupt):
        search(spec, storage_url=stopped_url, progress=False)
    states = list((tmp_path / "stopped.journal.artifacts").glob("dpnas-resume-*"))
    assert len(states) == 1

    calls = stop_at_step(monkeypatch, 10**9)
    search(spec, storage_url=stopped_url, progress=False)
    # the stopped run's last steps, then the second trial
    assert len(calls) == preflight + (per_trial - 6) + per_trial
    assert not list((tmp_path / "stopped.journal.artifacts").glob("dpnas-resume-*"))

    study = optuna.load_study(study_name=spec.name, storage=open_storage(stopped_url))
    stopped, retry = study.trials[0], next(t for t in study.trials if t.system_attrs.get("retry_history") == [0])
    assert stopped.state == optuna.trial.TrialState.FAIL and retry.state == optuna.trial.TrialState.COMPLETE
    assert retry.user_attrs["continues_run_of"] == 0 and retry.params == stopped.params
    # one run for the stopped trial and its retry: the study's guarantee is the uninterrupted search's
    report, uninterrupted = study_privacy(study), study_privacy(whole)
    assert report.runs == uninterrupted.runs == 2
    assert report.epsilon == uninterrupted.epsilon
    # the same run, bit for bit: the uninterrupted search's first trial, at its point
    first = whole.trials[0]
    assert first.params == retry.params and first.values == retry.values
    assert first.intermediate_values == retry.intermediate_values


def test_a_trial_keeps_its_state_when_stopped_and_at_most_every_minute_while_it_trains(tmp_path, digits):
    """A quickstart trial of a second never pays for a state it will not need; a stopped one always leaves it."""
    from optuna.artifacts import FileSystemArtifactStore

    from dpnas.search.trial_resume import RunRecord, TrialStateKeeper, forget, stopped_run

    store = FileSystemArtifactStore(str(tmp_path))
    record = RunRecord({"arch": TINY.to_dict()}, digits)
    keeper = TrialStateKeeper(store, "state.pt", record)
    keeper({"stopped": False, "progress": {"steps": 3}})
    assert stopped_run(store, "state.pt", record) is None  # an epoch's end within the minute: not written
    keeper({"stopped": True, "progress": {"steps": 4}})
    assert stopped_run(store, "state.pt", record)["progress"] == {"steps": 4}
    other = RunRecord({"arch": TINY.replace(activation="relu").to_dict()}, digits)
    assert stopped_run(store, "state.pt", other) is None  # another point's run is never continued
    (tmp_path / "state.pt").write_bytes(b"half a file")  # a worker killed while writing it
    assert stopped_run(store, "state.pt", record) is None
    TrialStateKeeper(store, "state.pt", record, every_s=0)({"stopped": False, "progress": {"steps": 5}})
    assert stopped_run(store, "state.pt", record)["progress"] == {"steps": 5}
    forget(store, "state.pt")
    forget(store, "state.pt")  # gone already: nothing to do
    assert list(tmp_path.iterdir()) == []


def test_a_half_written_resume_file_is_refused_in_one_line(tmp_path):
    path = tmp_path / "run.resume.pt"
    path.write_bytes(b"half a file")  # torch's reader raises KeyError on these bytes
    with pytest.raises(ResumeError, match="not a readable dpnas resume state"):
        load_state(path)


@pytest.mark.parametrize("stop, continued", [(6, True), (10, False)],
                         ids=["no score since the state", "a score released past the state"])
def test_a_killed_trial_is_continued_only_from_a_state_that_holds_every_score_it_released(tmp_path, monkeypatch,
                                                                                         stop, continued):
    """A worker killed (no state written as it died) after its last state may have reported scores past it: continued
    from that state, those epochs would be trained and released again from another branch of the run, which the
    one plan charged does not cover. Such a retry trains afresh, charged as its own run."""
    import optuna

    import dpnas.search.runner as runner_module
    from dpnas.search.runner import search
    from dpnas.search.storage import open_storage
    from dpnas.search.study_privacy import study_privacy

    spec = small_study(tmp_path)
    url = str(tmp_path / "study.journal")
    preflight, per_epoch = 1, 4
    with monkeypatch.context() as patch:
        patch.setattr(runner_module, "TrialStateKeeper", FirstEpochOnly)
        stop_at_step(patch, preflight + stop, signal.SIGTERM)  # epoch 2's second step, or epoch 3's second
        with pytest.raises(KeyboardInterrupt):
            search(spec, storage_url=url, progress=False)
    calls = stop_at_step(monkeypatch, 10**9)
    search(spec, storage_url=url, progress=False)
    study = optuna.load_study(study_name=spec.name, storage=open_storage(url))
    retry = next(t for t in study.trials if t.system_attrs.get("retry_history") == [0])
    assert retry.state == optuna.trial.TrialState.COMPLETE
    if continued:
        assert len(calls) == preflight + (3 * per_epoch - per_epoch) + 3 * per_epoch
        assert retry.user_attrs["continues_run_of"] == 0 and study_privacy(study).runs == 2
    else:
        assert len(calls) == preflight + 2 * 3 * per_epoch
        assert "continues_run_of" not in retry.user_attrs and study_privacy(study).runs == 3


def test_each_epoch_s_state_is_kept_before_its_score_is_reported(digits):
    """A run resumed from a state older than a score it reported would release that epoch again, from another
    branch: the state that holds an epoch's score is handed over before the score leaves the run."""
    events = []
    train(TINY, digits, train_cfg=recipe(epochs=2), privacy=PrivacyConfig(epsilon=4.0), progress=False,
          keep_state=lambda state: events.append(("kept", [h["epoch"] for h in state["progress"]["history"]])),
          on_epoch=lambda record: events.append(("reported", record["epoch"])))
    assert events == [("kept", [1]), ("reported", 1), ("kept", [1, 2]), ("reported", 2)]


def test_a_running_retry_that_continues_a_run_is_not_counted_as_another_run():
    """While a retry continues a stopped run, the budget check of the other workers counts that run once (the
    stopped trial's plan), not once more for the running retry: the last run of a total-ε study is not refused."""
    import optuna

    from dpnas.search.checks import runs_charged

    study = optuna.create_study()
    plan = {"trial": 0, "noise_multiplier": 1.0, "sample_rate": 0.1, "steps": 10, "val_noise": 0.0, "val_releases": 1}
    stopped = study.ask()
    stopped.set_user_attr("privacy_plan", plan)
    study.tell(stopped, state=optuna.trial.TrialState.FAIL)
    retry = study.ask()
    study._storage.set_trial_system_attr(retry._trial_id, "retry_history", [0])
    retry.set_user_attr("privacy_plan", plan)  # Optuna's copy of the stopped trial's attributes
    assert runs_charged(study) == 2  # not yet known to continue: counted, as any running trial
    retry.set_user_attr("continues_run_of", 0)
    assert runs_charged(study) == 1


def test_a_retry_that_trained_afresh_is_never_continued_from_the_older_run_s_state(tmp_path, monkeypatch):
    """A chain 0 -> 1 -> 2: trial 0 killed a while after its first epoch's state (scores of epoch 2 reported past it),
    so retry 1 trains afresh (its own plan) and is killed before it writes a state or reports a score. Trial 0's
    state was still in the store, and retry 2 (a copy of trial 1's plan) checked only trial 1's scores: it continued
    trial 0's run from epoch 1, released epoch 2 a second time from another branch, and said it continued trial 1's
    run. A state now names the run it is of: retry 2 trains afresh, charged as its own run."""
    import optuna

    import dpnas.search.runner as runner_module
    from dpnas.search.runner import search
    from dpnas.search.storage import open_storage
    from dpnas.search.study_privacy import study_privacy

    spec = small_study(tmp_path)
    url = str(tmp_path / "study.journal")
    preflight, per_epoch = 1, 4
    for stop in (10, 2):  # trial 0: epoch 3's second step; retry 1 (afresh): its first epoch's second step
        with monkeypatch.context() as patch:
            patch.setattr(runner_module, "TrialStateKeeper", FirstEpochOnly)
            stop_at_step(patch, preflight + stop, signal.SIGTERM)
            with pytest.raises(KeyboardInterrupt):
                search(spec, storage_url=url, progress=False)
    study = optuna.load_study(study_name=spec.name, storage=open_storage(url))
    assert "continues_run_of" not in study.trials[1].user_attrs and not study.trials[1].intermediate_values
    calls = stop_at_step(monkeypatch, 10**9)
    search(spec, storage_url=url, progress=False)
    study = optuna.load_study(study_name=spec.name, storage=open_storage(url))
    retry = next(t for t in study.trials if t.system_attrs.get("retry_history") == [0, 1])
    assert retry.state == optuna.trial.TrialState.COMPLETE
    assert "continues_run_of" not in retry.user_attrs
    assert len(calls) == preflight + 2 * 3 * per_epoch  # retry 2 and the second point, each from the start
    assert study_privacy(study).runs == 4  # trial 0's run, retry 1's, retry 2's and the second point's


def test_the_printed_resume_command_run_from_another_folder_writes_where_the_run_did(monkeypatch, tmp_path, capsys):
    """Relative --out and --weights are recorded absolute: the resume command, run from elsewhere, finishes the
    stopped run's own files (before, it wrote a second result and model beside the new cwd). --out and --weights
    may move the outputs, the run itself unchanged."""
    start, elsewhere = tmp_path / "start here", tmp_path / "elsewhere"
    start.mkdir(), elsewhere.mkdir()
    monkeypatch.chdir(start)
    args = ["train", "tiny", "--dataset", "digits", "--image-size", "16", "--epochs", "2", "--batch-size", "128",
            "--physical-batch-size", "128", "--out", "out dir/run.json", "--weights", "w/run.pt", "--quiet"]
    with monkeypatch.context() as patch:
        stop_at_step(patch, 5)
        assert main(args) == 130
    assert "dpnas train --resume 'out dir/run.resume.pt'" in capsys.readouterr().out
    monkeypatch.chdir(elsewhere)
    state = "../start here/out dir/run.resume.pt"
    (start / "w").rename(start / "gone")
    (start / "w").write_text("a file where the weights' folder was")
    assert main(["train", "--resume", state, "--quiet"]) == 2
    assert "choose another path" in capsys.readouterr().err  # which --weights now may
    assert main(["train", "--resume", state, "--weights", "moved.pt", "--quiet"]) == 0
    finished = json.loads((start / "out dir" / "run.json").read_text())
    assert not finished["interrupted"] and finished["resumed_at_steps"] == [5]
    assert (elsewhere / "moved.pt").is_file() and list(elsewhere.iterdir()) == [elsewhere / "moved.pt"]


def test_a_reproduce_state_or_a_result_given_to_train_resume_is_refused_in_one_line(tmp_path, capsys):
    record = {"arch": TINY.to_dict(), "train_config": recipe().to_dict(), "privacy_config": PrivacyConfig().to_dict(),
              "data_fingerprint": "0" * 32}  # what `dpnas reproduce` records in its states
    state = {"plan": {}, "progress": {}, "model": {}, "optimizer": {}, "accountant": {}, "generators": {},
             "device_type": "cpu", "run": record}
    path = save_state(state, tmp_path / "reproduce-x-cifar10-quick-tiny.resume.pt")
    assert main(["train", "--resume", str(path)]) == 2  # was a KeyError's traceback
    assert "the same `dpnas reproduce` command" in capsys.readouterr().err
    # the result JSON for its resume state: pointed at the state, not at torch's weights_only=False advice
    save_state(state, tmp_path / "run.resume.pt")
    (tmp_path / "run.json").write_text("{}")
    assert main(["train", "--resume", str(tmp_path / "run.json")]) == 2
    err = capsys.readouterr().err
    assert f"the run's resume state is {tmp_path / 'run.resume.pt'}" in err and "weights_only" not in err


def test_a_reproduction_s_finished_runs_are_found_from_another_folder_and_a_damaged_ledger_is_refused(
        tmp_path, monkeypatch):
    from dpnas.reproduce import StoppedReproduction

    monkeypatch.chdir(tmp_path)
    ledger = StoppedReproduction(Path("runs/x.progress.json"), fingerprint="f")
    record = ledger.record(TINY, recipe(), PrivacyConfig())
    result = Path("runs/x-tiny.json")
    result.parent.mkdir()
    result.write_text(json.dumps({"reproduction": {"model": "tiny", "result_path": str(result)}}))
    ledger.finish("tiny", record, result)
    (tmp_path / "elsewhere").mkdir()
    monkeypatch.chdir(tmp_path / "elsewhere")  # the same --out-dir, named from another folder
    again = StoppedReproduction(Path("../runs/x.progress.json"), fingerprint="f")
    assert again.finished_row("tiny", record) == {"model": "tiny", "result_path": "../runs/x-tiny.json"}
    # a damaged ledger would train its finished runs again, spending their epsilon twice: refused
    Path("../runs/x.progress.json").write_text('{"finished": ')
    with pytest.raises(ResumeError, match="damaged progress file"):
        StoppedReproduction(Path("../runs/x.progress.json"), fingerprint="f")


def test_a_new_run_does_not_replace_a_stopped_run_s_state(monkeypatch, tmp_path, capsys):
    """The first command run again (not --resume) replaced the stopped run's state and trained afresh: the stopped
    run could no longer be continued, and its records were charged a second run. Refused before anything loads."""
    out = tmp_path / "run.json"
    args = ["train", "tiny", "--dataset", "digits", "--image-size", "16", "--epochs", "2", "--batch-size", "128",
            "--out", str(out), "--quiet"]
    with monkeypatch.context() as patch:
        stop_at_step(patch, 3)
        assert main(args) == 130
    state = resume_path(out)
    before = state.read_bytes()
    calls = stop_at_step(monkeypatch, 10**9)
    assert main(args) == 2
    assert "dpnas train --resume" in capsys.readouterr().err
    assert state.read_bytes() == before and calls == []


def test_a_diverged_run_leaves_no_state_to_refuse_the_next_try(monkeypatch, tmp_path):
    import dpnas.dp.train as train_module

    checks = []
    monkeypatch.setattr(train_module, "parameters_finite", lambda model: checks.append(1) or len(checks) < 2)
    out = tmp_path / "run.json"
    args = ["train", "tiny", "--dataset", "digits", "--image-size", "16", "--epochs", "3", "--batch-size", "256",
            "--out", str(out), "--quiet"]
    assert main(args) == 2  # diverged in epoch 2, after epoch 1's state was kept
    assert len(checks) == 2 and not resume_path(out).exists()


# --- guards found unguarded by mutation testing: each test fails if its guard is removed


def test_a_state_planned_with_any_other_plan_field_is_refused():
    """Every field the accounting composes or the epochs end by is compared, not only the noise and the rate."""
    import dataclasses

    from dpnas.dp.privacy import PrivacyPlan
    from dpnas.dp.resume import PLAN_FIELDS, check_plan, plan_record

    plan = PrivacyPlan(sample_rate=0.1, steps=30, noise_multiplier=1.5, expected_batch_size=100.0, dataset_size=1000,
                       val_noise=4.0, val_releases=3, epoch_steps=10, periods=3)
    check_plan({"plan": plan_record(plan)}, plan)
    for name in PLAN_FIELDS:
        other = dataclasses.replace(plan, **{name: getattr(plan, name) * 2})
        with pytest.raises(ResumeError, match=name):
            check_plan({"plan": plan_record(other)}, plan)


def test_a_reproducible_run_s_state_from_another_device_type_is_refused_before_it_is_planned(digits, monkeypatch,
                                                                                              tmp_path):
    """A reproducible run's sampling and noise generators are its device type's own: on another they would restart
    from fresh seeds (not the same run) or fail; refused before the run is planned."""
    _, state = stopped_state(digits, PrivacyConfig(epsilon=4.0, reproducible=True), monkeypatch, tmp_path, 5)
    state["device_type"] = "cuda"
    planned = []
    with pytest.raises(ResumeError, match="resume it on a cuda device"):
        train(TINY, digits, train_cfg=recipe(), privacy=PrivacyConfig(epsilon=4.0, reproducible=True), progress=False,
              device="cpu", resume=state, on_plan=planned.append)
    assert planned == []


def test_restoring_generators_never_sets_a_secret_one_of_a_secret_run():
    from dpnas.dp.resume import restore_generators

    stored = {name: torch.Generator().manual_seed(7).get_state() for name in ("sampling", "noise", "val_noise",
                                                                               "augment")}
    generators = {name: torch.Generator().manual_seed(1) for name in stored}
    fresh = {name: g.get_state() for name, g in generators.items()}
    restore_generators(generators, stored, stored_on="cpu", device_type="cpu", secret=True)
    for name in ("sampling", "noise", "val_noise"):  # stays freshly (secretly) seeded
        assert torch.equal(generators[name].get_state(), fresh[name]), name
    assert torch.equal(generators["augment"].get_state(), stored["augment"])


def _changed(data, split: str, what: str):
    import dataclasses

    from dpnas.data.datasets import ImageData

    part = getattr(data, split)
    images, labels = part.images.clone(), part.labels.clone()
    if what == "labels":
        labels[0] = (labels[0] + 1) % data.num_classes
    else:
        images[0, 0, 0, 0] ^= 1
    return dataclasses.replace(data, **{split: ImageData(images, labels)})


@pytest.mark.parametrize("split", ["train", "val", "test"])
@pytest.mark.parametrize("what", ["images", "labels"])
def test_the_data_fingerprint_changes_with_any_split_s_images_or_labels(digits, split, what):
    """A run continued on relabelled records, or with other validation records (whose noisy scores it releases),
    is a run on other records than the ones its accounting covers."""
    from dpnas.dp.resume import data_fingerprint

    assert data_fingerprint(_changed(digits, split, what)) != data_fingerprint(digits)


def test_a_stop_while_writing_a_state_leaves_the_previous_state_whole(tmp_path, monkeypatch):
    """A second Ctrl-C, or a kill, while the state is written must not leave half a file where the last state was:
    the run could then not be continued at all, and would be trained (and charged) afresh."""
    path = save_state({"plan": {"steps": 1}}, tmp_path / "run.resume.pt")

    def half_written(obj, target, *args, **kwargs):
        Path(target).write_bytes(b"PK\x03\x04 half a zip")
        raise KeyboardInterrupt

    monkeypatch.setattr(torch, "save", half_written)
    with pytest.raises(KeyboardInterrupt):
        save_state({"plan": {"steps": 2}}, path)
    monkeypatch.undo()
    assert torch.load(path, weights_only=True)["plan"] == {"steps": 1}
    assert sorted(p.name for p in tmp_path.iterdir()) == ["run.resume.pt"]  # no scratch file left behind


def test_a_state_of_another_format_version_is_refused(tmp_path):
    from dpnas.dp.resume import stamped

    path = tmp_path / "run.resume.pt"
    torch.save({**stamped({"plan": {}, "progress": {}, "model": {}, "optimizer": {}, "accountant": {},
                           "generators": {}, "device_type": "cpu"}), "format_version": 2}, path)
    with pytest.raises(ResumeError, match="version 2"):
        load_state(path)


_FLAG_ARGS = {"arch": ["tiny"], "recipe": ["--recipe", "quick"], "dataset": ["--dataset", "digits"],
              "data_dir": ["--data-dir", "d"], "image_size": ["--image-size", "8"], "epsilon": ["--epsilon", "1"],
              "no_dp": ["--no-dp"], "delta": ["--delta", "1e-6"], "max_grad_norm": ["--max-grad-norm", "2"],
              "accountant": ["--accountant", "prv"], "epochs": ["--epochs", "2"], "batch_size": ["--batch-size", "8"],
              "physical_batch_size": ["--physical-batch-size", "8"], "lr": ["--lr", "0.1"], "seed": ["--seed", "1"],
              "val_fraction": ["--val-fraction", "0.1"], "assignments": ["--set", "lr=0.1"]}


@pytest.mark.parametrize("name", sorted(_FLAG_ARGS))
def test_every_flag_that_defines_a_run_is_refused_with_resume(tmp_path, capsys, name):
    """Given with --resume, a flag that would change the run (another epsilon, more epochs) was silently ignored
    where it was not listed: the user believed the run had another budget than the one it spent."""
    from dpnas.cli import _RUN_FLAGS

    assert set(_RUN_FLAGS) == set(_FLAG_ARGS)
    flag = _FLAG_ARGS[name]
    assert main(["train", "--resume", str(tmp_path / "missing.resume.pt"), *flag]) == 2
    shown = "ARCH_OR_RECIPE" if name == "arch" else flag[0]
    assert f"drop {shown}" in capsys.readouterr().err


def test_a_run_resumed_with_another_out_removes_the_state_it_continued(monkeypatch, tmp_path, capsys):
    """--out may move a resumed run's result; the state it was continued from must still go when it finishes (left,
    it would be continued a second time: another branch of the run, whose scores its epsilon does not cover)."""
    out, moved = tmp_path / "run.json", tmp_path / "moved" / "run.json"
    args = ["train", "tiny", "--dataset", "digits", "--image-size", "16", "--epochs", "2", "--batch-size", "256",
            "--physical-batch-size", "256", "--out", str(out), "--quiet"]
    with monkeypatch.context() as patch:
        stop_at_step(patch, 3)
        assert main(args) == 130
    assert main(["train", "--resume", str(resume_path(out)), "--out", str(moved), "--quiet"]) == 0
    finished = json.loads(moved.read_text())
    assert not finished["interrupted"] and finished["resumed_at_steps"] == [3]
    assert not resume_path(out).exists() and not resume_path(moved).exists()


def test_a_trial_s_state_is_not_continued_on_other_records_and_a_failed_write_does_not_fail_the_trial(tmp_path,
                                                                                                      digits):
    from optuna.artifacts import FileSystemArtifactStore

    from dpnas.search.trial_resume import RunRecord, stopped_run

    store = FileSystemArtifactStore(str(tmp_path))
    configs = {"arch": TINY.to_dict()}
    TrialStateKeeper(store, "state.pt", RunRecord(configs, digits))({"stopped": True, "progress": {"steps": 4}})
    assert stopped_run(store, "state.pt", RunRecord(configs, digits)) is not None
    # the same point on relabelled records (a changed dataset folder): another run's state
    assert stopped_run(store, "state.pt", RunRecord(configs, _changed(digits, "train", "labels"))) is None

    class FullDisk:
        def write(self, name, content):
            raise OSError(28, "No space left on device")

    # the trial goes on (its retry trains afresh, as without a store): a full store must not fail a trained run
    TrialStateKeeper(FullDisk(), "state.pt", RunRecord(configs, digits))({"stopped": True, "progress": {}})


def test_a_reproduction_s_ledger_keeps_a_run_finished_only_for_the_same_settings_and_records(tmp_path):
    """A finished run is taken from its result only when it is the run asked for, on the same records; a stopped
    run's state likewise. Else the result of another run (other settings, a changed dataset folder) would stand for
    this one."""
    from dpnas.reproduce import StoppedReproduction

    path = tmp_path / "x.progress.json"
    ledger = StoppedReproduction(path, fingerprint="f")
    record = ledger.record(TINY, recipe(), PrivacyConfig())
    result = tmp_path / "x-tiny.json"
    result.write_text(json.dumps({"reproduction": {"model": "tiny"}}))
    ledger.finish("tiny", record, result)
    state = save_state({"run": record, "plan": {}, "progress": {}, "model": {}, "optimizer": {}, "accountant": {},
                        "generators": {}, "device_type": "cpu"}, tmp_path / "x-tiny.resume.pt")
    same = StoppedReproduction(path, fingerprint="f")
    assert same.finished_row("tiny", record) == {"model": "tiny", "result_path": str(result)}
    assert same.stopped_state(state, record) is not None
    assert same.finished_row("tiny", same.record(TINY, recipe(epochs=4), PrivacyConfig())) is None
    other_data = StoppedReproduction(path, fingerprint="g")
    other = other_data.record(TINY, recipe(), PrivacyConfig())
    assert other_data.finished_row("tiny", other) is None
    with pytest.raises(ResumeError, match="other settings or data"):
        other_data.stopped_state(state, other)


def one_point_study(tmp_path):
    """One trial of 3 epochs of 4 steps (digits at 16 px)."""
    from search_helpers import write_study

    from dpnas.search.study_file import load_study_file

    path = write_study(tmp_path, n_trials=1, sampler="random", epochs=3)
    path.write_text(path.read_text().replace("val_fraction = 0.2\n", "val_fraction = 0.2\nimage_size = 16\n"))
    return load_study_file(path)


def test_a_continued_run_stopped_again_is_continued_again_and_charged_once(tmp_path, monkeypatch):
    """A chain 0 -> 1 -> 2 of one run: trial 0 is stopped, retry 1 continues its run and is stopped too, retry 2
    continues the same run from retry 1's stop (the chain's first trial names its state; the states retry 1 wrote
    stay trial 0's run). Trained afresh, the preempted run cost a second run of privacy."""
    import optuna

    from dpnas.search.runner import search
    from dpnas.search.storage import open_storage
    from dpnas.search.study_privacy import study_privacy

    spec = one_point_study(tmp_path)
    url = str(tmp_path / "study.journal")
    preflight = 1
    for stop in (6, 3):  # trial 0: epoch 2's second step; retry 1: its third step, the run's ninth (epoch 3's first)
        with monkeypatch.context() as patch:
            stop_at_step(patch, preflight + stop, signal.SIGTERM)
            with pytest.raises(KeyboardInterrupt):
                search(spec, storage_url=url, progress=False)
    calls = stop_at_step(monkeypatch, 10**9)
    search(spec, storage_url=url, progress=False)
    assert len(calls) == preflight + 12 - 9  # the run's last three steps, not a run afresh
    study = optuna.load_study(study_name=spec.name, storage=open_storage(url))
    retry = next(t for t in study.trials if t.system_attrs.get("retry_history") == [0, 1])
    assert retry.state == optuna.trial.TrialState.COMPLETE and retry.user_attrs["continues_run_of"] == 0
    assert sorted(retry.intermediate_values) == [1, 2, 3] and study_privacy(study).runs == 1


def test_a_retry_s_own_stopped_run_is_continued_whatever_an_earlier_run_of_the_chain_released(tmp_path,
                                                                                            monkeypatch):
    """Trial 0 is killed a while after its first state (epoch 2's score released past it), so retry 1 trains its own
    run, and is stopped in its second epoch. Retry 2 continues retry 1's run: the scores trial 0's run released are
    another run's, charged apart, and never in retry 1's state; checked against it, retry 2 trained a third run."""
    import optuna

    import dpnas.search.runner as runner_module
    from dpnas.search.runner import search
    from dpnas.search.storage import open_storage
    from dpnas.search.study_privacy import study_privacy

    spec = one_point_study(tmp_path)
    url = str(tmp_path / "study.journal")
    preflight = 1
    with monkeypatch.context() as patch:  # trial 0: killed in epoch 3, its last state epoch 1's
        patch.setattr(runner_module, "TrialStateKeeper", FirstEpochOnly)
        stop_at_step(patch, preflight + 10, signal.SIGTERM)
        with pytest.raises(KeyboardInterrupt):
            search(spec, storage_url=url, progress=False)
    with monkeypatch.context() as patch:  # retry 1, afresh: stopped at its sixth step (epoch 2's second)
        stop_at_step(patch, preflight + 6, signal.SIGTERM)
        with pytest.raises(KeyboardInterrupt):
            search(spec, storage_url=url, progress=False)
    calls = stop_at_step(monkeypatch, 10**9)
    search(spec, storage_url=url, progress=False)
    assert len(calls) == preflight + 12 - 6
    study = optuna.load_study(study_name=spec.name, storage=open_storage(url))
    retry = next(t for t in study.trials if t.system_attrs.get("retry_history") == [0, 1])
    assert retry.state == optuna.trial.TrialState.COMPLETE and retry.user_attrs["continues_run_of"] == 1
    assert study_privacy(study).runs == 2  # trial 0's run and retry 1's


def test_a_resumed_run_goes_on_with_its_learning_rate_schedule(digits, monkeypatch, tmp_path):
    """The schedule is part of the run: a cosine schedule restarted at the resume would take the rest of the steps at
    other learning rates than the run it continues (the plateau schedule of the tests above hides it: its state
    rarely changes in three epochs)."""
    privacy = PrivacyConfig(epsilon=4.0, reproducible=True)
    cfg = recipe(schedule="cosine", ema_decay=0.0, augment=False)
    whole, whole_weights = run(digits, privacy, cfg=cfg)
    kept = []
    with monkeypatch.context() as patch:
        stop_at_step(patch, 13)
        run(digits, privacy, keep=kept.append, cfg=cfg)
    resumed, resumed_weights = run(digits, privacy, resume=kept[-1], cfg=cfg)
    assert [h["lr"] for h in resumed["history"]] == [h["lr"] for h in whole["history"]]
    assert all(torch.equal(resumed_weights[k], whole_weights[k]) for k in whole_weights)


def test_a_reproduction_goes_on_when_its_state_cannot_be_written_and_a_finished_run_leaves_no_state(
        monkeypatch, tmp_path, capsys):
    """A full disk cost a reproduction its run (a traceback) where `dpnas train` warns and goes on; and a stop
    between the ledger's record of a finished run and the removal of its state left a state that a later, new
    reproduction would have continued as if it were its own run."""
    import dpnas.dp.resume as resume_module
    from dpnas.reproduce import StoppedReproduction, run_reproduction

    def reproduce():
        return run_reproduction("smoothnet", quick=True, data_dir=tmp_path / "none", out_dir=tmp_path,
                                progress=False, device="cpu")

    state_file = tmp_path / "reproduce-smoothnet-cifar10-quick-smoothnet.resume.pt"
    ledger = tmp_path / "reproduce-smoothnet-cifar10-quick.progress.json"
    with monkeypatch.context() as patch:
        patch.setattr(resume_module, "save_state", lambda *_: (_ for _ in ()).throw(OSError(28, "No space left")))
        rows = reproduce()
    assert [r["status"] for r in rows] == ["finished"] and not state_file.exists()
    assert capsys.readouterr().err.count("cannot write the resume state") == 1  # said once, not every epoch

    original_finish = StoppedReproduction.finish

    def stopped_after_the_ledger(self, *args):
        original_finish(self, *args)
        raise KeyboardInterrupt

    with monkeypatch.context() as patch:
        patch.setattr(StoppedReproduction, "finish", stopped_after_the_ledger)
        with pytest.raises(KeyboardInterrupt):
            reproduce()
    assert state_file.is_file() and ledger.is_file()
    calls = stop_at_step(monkeypatch, 10**9)
    again = reproduce()  # the same command: the finished run is taken from its result
    assert calls == [] and again[0]["status"] == "finished"
    assert not state_file.exists() and not ledger.exists()  # nothing a new reproduction would continue
def test_a_run_stopped_before_its_first_score_and_a_finished_run_s_state_say_so(monkeypatch, tmp_path, capsys):
    # stopped in its first epoch it printed "val accuracy nan (noisy: ..., epsilon 0.000 for the validation
    # records)"; the printed --resume run a second time after it finished said only "no such resume state"
    out = tmp_path / "run.json"
    state_file = resume_path(out)
    args = ["train", "tiny", "--dataset", "digits", "--image-size", "16", "--epochs", "1", "--batch-size", "128",
            "--physical-batch-size", "128", "--out", str(out), "--quiet"]
    with monkeypatch.context() as patch:
        stop_at_step(patch, 2)
        assert main(args) == 130
    said = capsys.readouterr().out
    assert "interrupted after 2 steps: no validation score released yet, test accuracy" in said and "nan" not in said
    assert main(["train", "--resume", str(state_file), "--quiet"]) == 0
    assert "finished 9 steps: val accuracy" in capsys.readouterr().out
    assert main(["train", "--resume", str(state_file), "--quiet"]) == 2
    err = capsys.readouterr().err
    assert f"the run finished and removed it: its result is {out}" in err and err.count("\n") == 1


def test_a_total_epsilon_study_s_last_run_stopped_is_continued_not_lost(tmp_path, monkeypatch):
    """A total-ε study whose K-th run is preempted has charged all K runs: its resume used to end at once ("total_epsilon
    is spent"), the stopped run's finished steps lost with its slot. Its retry continues that run, charged once; a
    retry that would train afresh is still refused the run its total has no room for."""
    import optuna

    import dpnas.search.runner as runner_module
    from dpnas.search.runner import search
    from dpnas.search.storage import open_storage
    from dpnas.search.study_file import load_study_file
    from dpnas.search.study_privacy import study_privacy

    path = small_study(tmp_path).path
    path.write_text(path.read_text().replace("epsilon = 4.0\n", "total_epsilon = 8.0\n"))
    spec = load_study_file(path)
    preflight, per_trial = 1, 12  # the search's one step before its first trial; 3 epochs of 4 steps

    def open_(url):
        return optuna.load_study(study_name=spec.name, storage=open_storage(url))

    calls = stop_at_step(monkeypatch, preflight + per_trial + 6, signal.SIGTERM)  # the 2nd (last) run, 2nd epoch
    url = str(tmp_path / "stopped.journal")
    with pytest.raises(KeyboardInterrupt):
        search(spec, storage_url=url, progress=False)
    assert runner_module.runs_charged(open_(url)) == 2  # both runs have touched the data

    calls = stop_at_step(monkeypatch, 10**9)
    search(spec, storage_url=url, progress=False)
    assert len(calls) == preflight + (per_trial - 6)  # the stopped run's last steps, nothing afresh
    study = open_(url)
    assert runner_module.exhausted_message(study) is None
    assert sum(t.state == optuna.trial.TrialState.COMPLETE for t in study.trials) == 2
    assert study_privacy(study).runs == 2 and study_privacy(study).epsilon <= 8.0

    # the same stop, where the state is not the retry's run (here: gone from the store): nothing trains
    other = str(tmp_path / "other.journal")
    calls = stop_at_step(monkeypatch, preflight + per_trial + 6, signal.SIGTERM)
    with pytest.raises(KeyboardInterrupt):
        search(spec, storage_url=other, progress=False)
    monkeypatch.setattr(runner_module, "stopped_run", lambda *args: None)
    calls = stop_at_step(monkeypatch, 10**9)
    search(spec, storage_url=other, progress=False)
    assert len(calls) == 0 or len(calls) == preflight  # no run beyond the two the total was split over
    study = open_(other)
    assert runner_module.runs_charged(study) == 2 and study_privacy(study).epsilon <= 8.0
    assert sum(t.state == optuna.trial.TrialState.COMPLETE for t in study.trials) == 1
    # and it ends saying why (it used to end without its "spent" line)
    assert "total_epsilon = 8 is spent: 2 runs" in runner_module.exhausted_message(study)


def _total_epsilon_study(tmp_path):
    """small_study's two runs under one total_epsilon = 8 (each run a half)."""
    from dpnas.search.study_file import load_study_file

    path = small_study(tmp_path).path
    path.write_text(path.read_text().replace("epsilon = 4.0\n", "total_epsilon = 8.0\n"))
    return load_study_file(path)


def test_a_spent_study_s_retry_whose_state_train_refuses_trains_nothing(tmp_path, monkeypatch):
    """A total-ε study's last run is stopped; its retry is let in to continue it (the runs are all spent), and
    `train` refuses the state before a step (here: a reproducible run's generators on another device type). The
    retry used to fall back to training afresh: a third run of a total split over two."""
    import optuna

    import dpnas.dp.train as train_module
    import dpnas.search.runner as runner_module
    from dpnas.search.runner import search
    from dpnas.search.storage import open_storage
    from dpnas.search.study_privacy import study_privacy

    spec = _total_epsilon_study(tmp_path)
    url, preflight, per_trial = str(tmp_path / "study.journal"), 1, 12
    with monkeypatch.context() as patch:
        stop_at_step(patch, preflight + per_trial + 6, signal.SIGTERM)  # the 2nd (last) run, 2nd epoch
        with pytest.raises(KeyboardInterrupt):
            search(spec, storage_url=url, progress=False)

    def refused(*args, **kwargs):
        raise ResumeError("this run started on cuda and continues its generators there")

    monkeypatch.setattr(train_module, "check_generators", refused)
    calls = stop_at_step(monkeypatch, 10**9)
    search(spec, storage_url=url, progress=False)
    study = optuna.load_study(study_name=spec.name, storage=open_storage(url))
    assert len(calls) <= preflight  # nothing trained afresh
    assert runner_module.runs_charged(study) == 2 and study_privacy(study).runs == 2
    assert study_privacy(study).epsilon <= 8.0
    assert "is spent: 2 runs" in runner_module.exhausted_message(study)  # and the study says why it ended


def test_a_running_retry_of_a_continued_run_is_counted_until_it_continues(tmp_path, monkeypatch):
    """Chain 0 -> 1 -> 2: retry 1 continued trial 0's run and was stopped; Optuna's retry 2 arrives with a copy of
    retry 1's `continues_run_of`. Running, before it knows whether it continues, it was not counted: a second worker
    then started the total's last run, and retry 2, whose state turned out unusable, trained afresh a third."""
    import optuna

    import dpnas.search.runner as runner_module
    from dpnas.search.runner import run_worker, search
    from dpnas.search.storage import open_storage
    from dpnas.search.study_privacy import study_privacy

    spec = _total_epsilon_study(tmp_path)
    url, preflight = str(tmp_path / "study.journal"), 1
    for stop in (6, 3):  # trial 0 in its 2nd epoch; retry 1 continues it and is stopped 3 steps later
        with monkeypatch.context() as patch:
            stop_at_step(patch, preflight + stop, signal.SIGTERM)
            with pytest.raises(KeyboardInterrupt):
                search(spec, storage_url=url, progress=False)
    study = optuna.load_study(study_name=spec.name, storage=open_storage(url))
    assert study.trials[1].user_attrs["continues_run_of"] == 0

    real_run_trial, seen = runner_module.run_trial, []

    def with_another_worker(study, trial, spec, data, *args, **kwargs):
        if not seen:  # retry 2, asked and not yet planned: a second worker takes its turn now
            seen.append(runner_module.runs_charged(study))
            run_worker(spec, url, worker_index=1, progress=False, data=data)
        return real_run_trial(study, trial, spec, data, *args, **kwargs)

    monkeypatch.setattr(runner_module, "run_trial", with_another_worker)
    monkeypatch.setattr(runner_module, "stopped_run", lambda *args: None)  # retry 2 cannot continue: afresh
    stop_at_step(monkeypatch, 10**9)
    search(spec, storage_url=url, progress=False)
    study = optuna.load_study(study_name=spec.name, storage=open_storage(url))
    assert seen == [2]  # trial 0's run and the running retry 2
    assert runner_module.runs_charged(study) == 2 and study_privacy(study).epsilon <= 8.0


def test_a_spent_study_continues_a_stopped_run_queued_behind_a_killed_run_s_retry(tmp_path, monkeypatch):
    """Worker A's trial 0 and worker B's trial 1 are the total's two runs. A is killed before a state (worker C
    finds it dead: retry 2, nothing to continue), then B is stopped (retry 3, its state). Resumed, the study only
    looked at the lowest-numbered waiting trial (retry 2, which cannot train), said the total was spent, and lost
    B's stopped run. It continues retry 3; retry 2 trains nothing."""
    import optuna

    import dpnas.search.runner as runner_module
    from dpnas.search.runner import run_worker, search
    from dpnas.search.storage import open_storage
    from dpnas.search.study_privacy import study_privacy

    spec = _total_epsilon_study(tmp_path)
    url, preflight = str(tmp_path / "study.journal"), 1

    def load():
        return optuna.load_study(study_name=spec.name, storage=open_storage(url))

    class Killed(BaseException):
        pass

    real_train, calls = runner_module.train, []

    def staged(arch, data, *args, on_plan, **kwargs):
        calls.append(1)

        def worker_a_planned(plan):  # trial 0 has touched the data; worker B takes the last run meanwhile
            on_plan(plan)
            run_worker(spec, url, worker_index=1, progress=False, data=data)
            raise Killed  # and worker A dies: trial 0 stays RUNNING, with no state

        def worker_b_planned(plan):  # trial 1 planned: worker C finds worker A dead (retry 2) and has no run left
            on_plan(plan)
            study = load()
            study._storage.set_trial_user_attr(study.trials[0]._trial_id, "worker_process", "gone:0")
            assert run_worker(spec, url, worker_index=2, progress=False, data=data).exhausted

        planned = {1: worker_a_planned, 2: worker_b_planned}.get(len(calls), on_plan)
        return real_train(arch, data, *args, on_plan=planned, **kwargs)  # B: stopped at its 6th step

    with monkeypatch.context() as patch:
        patch.setattr(runner_module, "train", staged)
        stop_at_step(patch, preflight + 6, signal.SIGTERM)
        with pytest.raises(Killed):
            search(spec, storage_url=url, progress=False)
    study = load()
    assert [t.system_attrs.get("retry_history") for t in study.trials[2:]] == [[0], [1]]
    assert runner_module.runs_charged(study) == 2

    calls = stop_at_step(monkeypatch, 10**9)
    search(spec, storage_url=url, progress=False)
    study = load()
    assert len(calls) == preflight + 12 - 6  # B's run goes on from its stop, nothing afresh
    assert study.trials[3].state == optuna.trial.TrialState.COMPLETE
    assert study.trials[3].user_attrs["continues_run_of"] == 1
    assert study.trials[2].state == optuna.trial.TrialState.WAITING  # never trained
    assert runner_module.runs_charged(study) == 2 and study_privacy(study).epsilon <= 8.0
