"""The search's output, whole: the best trial's recipe file, its stored weights, and scoring them again."""

import json
import re
import shutil
from pathlib import Path

import optuna
import pytest
import torch
from optuna.trial import TrialState
from search_helpers import write_study

from dpnas.arch.space import ConfigError
from dpnas.cli import main
from dpnas.data.datasets import DEFAULT_IMAGE_SIZE
from dpnas.dp.checkpoint import load_checkpoint
from dpnas.dp.recipe_file import load_recipe_file
from dpnas.search.runner import best_trials
from dpnas.search.storage import open_storage
from dpnas.search.study_file import load_study_file
from dpnas.search.study_privacy import study_privacy
from dpnas.search.weights import weights_available


def _load(spec):
    return optuna.load_study(study_name=spec.name, storage=open_storage(spec.default_storage()))


@pytest.fixture(scope="module")
def searched(tmp_path_factory):
    """A 2-trial study that also searches the learning rate and clip norm, with the top 1 weights kept."""
    directory = tmp_path_factory.mktemp("recipe")
    path = write_study(directory, n_trials=2, epochs=2, sampler="random", extra="keep_weights = 1")
    # reproducible = true: the retrain test regenerates the trial's batches and noise from its seed
    text = path.read_text().replace("delta = 1e-5", "delta = 1e-5\nreproducible = true").replace("width = { low = 0.5, high = 1.0, step = 0.5 }",
                                    "width = [0.5]\nlr = { low = 1e-3, high = 1e-2, log = true }\n"
                                    "max_grad_norm = { low = 0.5, high = 3.0, log = true }")
    path.write_text(text)
    assert main(["search", str(path), "--quiet"]) == 0
    spec = load_study_file(path)
    return directory, path, spec, _load(spec)


def test_best_writes_a_complete_recipe_with_provenance(searched, capsys):
    directory, path, spec, study = searched
    out = directory / "best.toml"
    assert main(["best", str(path), "--out", str(out)]) == 0
    best = best_trials(study)[0]
    recipe = load_recipe_file(out)
    assert recipe.complete and recipe.data is not None
    # the searched DP hyperparameters are in the recipe, not the recipe's defaults
    assert recipe.train.lr == best.params["lr"] and recipe.privacy.max_grad_norm == best.params["max_grad_norm"]
    assert recipe.arch.to_dict() == best.user_attrs["config"]
    assert recipe.data.dataset == "digits" and recipe.data.val_fraction == spec.val_fraction
    assert recipe.provenance["trial"] == best.number and recipe.provenance["study"] == spec.name
    assert recipe.provenance["epsilon_spent"] == pytest.approx(best.user_attrs["epsilon_spent"])
    # a run's own ε is not what releasing the model costs: the search's ε is written next to it
    search = study_privacy(study)
    assert recipe.provenance["search_epsilon"] == pytest.approx(search.epsilon) and search.epsilon > 0
    assert recipe.provenance["search_delta"] == search.delta
    header = out.read_text().splitlines()[:3]
    assert header[0].startswith("# dpnas: best recipe of study") and "epsilon spent" in header[1]
    assert f"whole search's epsilon {search.epsilon:.3f}" in header[1]
    capsys.readouterr()
    assert main(["describe", str(out), "--json"]) == 0  # describe takes it too, at the shape the recipe trains at
    described = json.loads(capsys.readouterr().out)
    assert described["params"] == best.user_attrs["params"]
    size = recipe.data.image_size or DEFAULT_IMAGE_SIZE["digits"]
    assert described["input_shape"] == [1, size, size]  # digits: one channel, not describe's default 3


def test_training_the_exported_recipe_reproduces_the_trial(searched, capsys):
    directory, path, spec, study = searched
    out = directory / "best-repro.toml"
    assert main(["best", str(path), "--out", str(out)]) == 0
    result_path = directory / "retrained.json"
    assert main(["train", str(out), "--out", str(result_path), "--quiet"]) == 0
    result = json.loads(result_path.read_text())
    best = best_trials(study)[0]
    assert result["train_config"] == best.user_attrs["train_config"]
    assert result["max_grad_norm"] == best.params["max_grad_norm"]
    assert result["reproducible"] is True
    # Same seed, same device, same split, reproducible mode: the same run. The per-layer method tuner may pick another exact
    # per-sample method (they agree to 1e-4), which can move a borderline prediction: bounded by one record.
    assert abs(result["val_accuracy"] - best.values[0]) <= 1 / result["val_size"] + 1e-12
    assert abs(result["test_accuracy"] - best.user_attrs["test_accuracy"]) <= 1 / result["test_size"] + 1e-12
    # flags still override the file
    assert main(["train", str(out), "--epochs", "1", "--out", str(directory / "one.json"), "--quiet"]) == 0
    assert json.loads((directory / "one.json").read_text())["train_config"]["epochs"] == 1


def test_weights_round_trip_through_the_artifact_store(searched, capsys):
    directory, path, spec, study = searched
    weights = directory / "best.pt"
    assert main(["best", str(path), "--out", str(directory / "b.toml"), "--weights", str(weights)]) == 0
    best = best_trials(study)[0]
    checkpoint = load_checkpoint(weights)
    assert checkpoint["provenance"]["trial"] == best.number
    assert checkpoint["config"] == best.user_attrs["config"]
    # linked to the trial through Optuna's artifact API, so optuna-dashboard lists it
    metas = optuna.artifacts.get_all_artifact_meta(_load(spec).trials[best.number], storage=_load(spec)._storage)
    assert [m.filename for m in metas] == ["weights.pt"]
    capsys.readouterr()
    assert main(["evaluate", str(weights), "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert {"test_accuracy", "params", "config"} <= set(report)
    assert report["test_accuracy"] == pytest.approx(best.user_attrs["test_accuracy"], abs=1e-12)
    assert report["params"] == best.user_attrs["params"]
    # the fetched checkpoint carries what releasing it costs: the search's ε, not only its run's
    search = study_privacy(_load(spec))
    assert checkpoint["provenance"]["search_epsilon"] == pytest.approx(search.epsilon)
    assert main(["evaluate", str(weights)]) == 0
    line = capsys.readouterr().out.strip().splitlines()[-1]
    found = re.search(r"epsilon spent (\d+\.\d{3}) by its run; releasing it costs its whole search's epsilon "
                      r"(\d+\.\d{3})", line)  # rounded like `dpnas train`'s line
    assert found, line
    assert float(found[1]) == pytest.approx(best.user_attrs["epsilon_spent"], abs=5e-4)
    assert float(found[2]) == pytest.approx(search.epsilon, abs=5e-4) and float(found[2]) > float(found[1])


def test_a_weights_download_cut_short_leaves_no_file(searched, monkeypatch, capsys):
    """`dpnas best --weights FILE` writes FILE whole or not at all: a download cut short (a store that went away,
    Ctrl-C) must not leave a truncated checkpoint under the released model's name."""
    import dpnas.search.weights as weights_module

    directory, path, _, _ = searched

    def cut_short(*, artifact_store, file_path, artifact_id):
        Path(file_path).write_bytes(b"PK\x03\x04 half a checkpoint")
        raise ConnectionError("the store went away")

    monkeypatch.setattr(weights_module, "download_artifact", cut_short)
    out = directory / "cut.pt"
    assert main(["best", str(path), "--out", str(directory / "cut.toml"), "--weights", str(out)]) == 2
    assert "the store went away" in capsys.readouterr().err
    assert not out.exists()


def test_a_damaged_download_keeps_the_weights_already_there(searched, monkeypatch, capsys):
    """A stored checkpoint whose bytes fail their checksum is refused before it replaces FILE: `dpnas best
    --weights FILE` run again must not swap a good FILE for a damaged one."""
    import dpnas.search.weights as weights_module

    directory, path, _, _ = searched
    out = directory / "kept.pt"
    assert main(["best", str(path), "--out", str(directory / "kept.toml"), "--weights", str(out)]) == 0
    good = out.read_bytes()
    fetch = weights_module.download_artifact

    def flipped(*, artifact_store, file_path, artifact_id):
        fetch(artifact_store=artifact_store, file_path=file_path, artifact_id=artifact_id)
        data = bytearray(Path(file_path).read_bytes())
        data[len(data) // 2] ^= 0xFF  # inside a tensor's bytes: torch.load alone would read other weights
        Path(file_path).write_bytes(bytes(data))

    monkeypatch.setattr(weights_module, "download_artifact", flipped)
    capsys.readouterr()
    assert main(["best", str(path), "--out", str(directory / "kept.toml"), "--weights", str(out)]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "damaged" in err
    assert out.read_bytes() == good
    assert sorted(p.name for p in directory.glob("kept.pt*")) == ["kept.pt"]


@pytest.mark.parametrize("edit", ["no-config", "no-results", "state-dict-not-a-dict", "not-tensors",
                                  "num-classes-text", "unknown-data-key"])
def test_an_edited_checkpoint_is_refused_in_one_line(searched, tmp_path, capsys, edit):
    directory, path, _, _ = searched
    good = tmp_path / "good.pt"
    assert main(["best", str(path), "--out", str(tmp_path / "good.toml"), "--weights", str(good)]) == 0
    checkpoint = torch.load(good, weights_only=True)
    if edit == "no-config":
        del checkpoint["config"]
    elif edit == "no-results":
        del checkpoint["results"]
    elif edit == "state-dict-not-a-dict":
        checkpoint["state_dict"] = "weights"
    elif edit == "not-tensors":
        checkpoint["state_dict"] = {k: v.tolist() for k, v in checkpoint["state_dict"].items()}
    elif edit == "num-classes-text":
        checkpoint["num_classes"] = "ten"
    else:
        checkpoint["data"] = {**checkpoint["data"], "colour": "blue"}
    edited = tmp_path / "edited.pt"
    torch.save(checkpoint, edited)
    capsys.readouterr()
    assert main(["evaluate", str(edited)]) == 2  # not a KeyError or TypeError from building the model
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and str(edited) in err


def test_keep_weights_bounds_what_is_stored(searched):
    _, _, spec, study = searched
    done = [t for t in study.get_trials() if t.state == TrialState.COMPLETE]
    kept = [t.number for t in done if weights_available(study, t)]
    assert kept == [best_trials(study)[0].number]  # keep_weights = 1: only the best keeps its file
    store_dir = Path(spec.default_storage() + ".artifacts")
    assert len([p for p in store_dir.iterdir() if p.is_file()]) == 1


@pytest.mark.parametrize("content", ["garbage", "torch-dict", "pickled-module", "missing"])
def test_a_file_that_is_not_a_dpnas_checkpoint_is_refused_in_one_line(tmp_path, capsys, content):
    path = tmp_path / "weights.pt"
    if content == "garbage":
        path.write_bytes(b"not a checkpoint at all")
    elif content == "torch-dict":
        torch.save({"state_dict": {}}, path)
    elif content == "pickled-module":
        torch.save(torch.nn.Linear(2, 2), path)  # code, which weights_only=True must never unpickle
    assert main(["evaluate", str(path)]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and str(path) in err
    assert "weights_only=False" not in err  # never advise the unsafe load


def test_a_default_private_trial_is_not_regenerated_by_its_recipe(tmp_path):
    # Without reproducible = true, retraining the exported recipe (same seed, same split) is a new private run:
    # its batches and noise come from fresh secret seeds, so its weights differ from the released trial's.
    path = write_study(tmp_path, n_trials=1, epochs=1, sampler="random")
    assert main(["search", str(path), "--quiet"]) == 0
    out, released, retrained = tmp_path / "best.toml", tmp_path / "best.pt", tmp_path / "again.pt"
    assert main(["best", str(path), "--out", str(out), "--weights", str(released)]) == 0
    assert load_recipe_file(out).privacy.reproducible is False
    assert main(["train", str(out), "--out", str(tmp_path / "r.json"), "--weights", str(retrained), "--quiet"]) == 0
    assert json.loads((tmp_path / "r.json").read_text())["reproducible"] is False
    a, b = load_checkpoint(released)["state_dict"], load_checkpoint(retrained)["state_dict"]
    assert a.keys() == b.keys() and any(not torch.equal(a[k], b[k]) for k in a)


def test_old_architecture_only_files_still_load(tmp_path):
    arch_file = tmp_path / "arch.json"
    arch_file.write_text(json.dumps({"config": {"width": 0.5, "depth": 1.0, "head_hidden": [32]}}))
    flat = tmp_path / "arch.toml"
    flat.write_text('width = 0.5\nactivation = "relu"\n')
    assert not load_recipe_file(arch_file).complete and load_recipe_file(arch_file).arch.width == 0.5
    assert load_recipe_file(flat).arch.activation == "relu" and load_recipe_file(flat).train is None


def test_reproducible_trials_are_listed_as_not_covered_and_unprotected(searched, capsys, tmp_path):
    """A reproducible trial's batches and noise can be regenerated from the stored seed: `dpnas privacy` lists
    those records under "not covered" and its JSON does not call them protected (README)."""
    directory, path, spec, study = searched
    capsys.readouterr()
    assert main(["privacy", str(path), "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    numbers = sorted(t.number for t in study.get_trials() if "privacy_plan" in t.user_attrs)
    assert report["reproducible_trials"] == numbers and "reproducible" not in report
    assert report["protected"] == {"training": False, "validation": False, "dataset": False}
    assert report["epsilon"] is not None  # the ε is finite; what it covers is not the seed's holder
    assert any("reproducible = true" in line for line in report["not_covered"])
    assert main(["privacy", str(path)]) == 0
    text = capsys.readouterr().out
    assert sum("reproducible = true" in line for line in text.splitlines()) == 1  # said once, as not covered
    assert any(line.startswith("not covered:") and "regenerated from the recorded seed" in line
               for line in text.splitlines())
    # a default (secret-seeded) study is protected
    other = write_study(tmp_path, n_trials=1, epochs=1, sampler="random")
    assert main(["search", str(other), "--quiet"]) == 0
    capsys.readouterr()
    assert main(["privacy", str(other), "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["protected"] == {"training": True, "validation": True, "dataset": True}
    assert report["reproducible_trials"] == [] and not any("reproducible" in line for line in report["not_covered"])


def test_a_recipe_trained_on_other_data_says_its_epsilon_is_the_whole_cost_there(searched, capsys):
    directory, path, spec, study = searched
    out = directory / "other-data.toml"
    assert main(["best", str(path), "--out", str(out)]) == 0
    capsys.readouterr()
    assert main(["train", str(out), "--dataset", "synthetic", "--epochs", "1", "--quiet",
                 "--out", str(directory / "other.json")]) == 0
    notes = [line for line in capsys.readouterr().out.splitlines() if line.startswith("note: study")]
    assert len(notes) == 1 and "chose this recipe on digits" in notes[0] and "whole cost" in notes[0]
    assert "adds to the search's" not in notes[0]


def test_a_reproducible_recipe_s_header_does_not_promise_a_new_private_run():
    """The header of a recipe exported from a reproducible = true study said `dpnas train FILE` was "a new private
    run", though the retrain regenerates the trial's batches and noise from the recorded seed (README)."""
    from dpnas.arch.registry import MODELS
    from dpnas.dp.recipe_file import RecipeFile
    from dpnas.dp.recipes import RECIPES
    from dpnas.search.study_report import _what_a_retrain_is

    quick = RECIPES["quick"]
    seeded = RecipeFile(MODELS["tiny"].arch, quick.train, quick.privacy.replace(reproducible=True))
    words = _what_a_retrain_is(seeded)
    assert not words.startswith("a new private run") and "reproducible = true" in words and "seed" in words, words
    assert _what_a_retrain_is(RecipeFile(MODELS["tiny"].arch, quick.train, quick.privacy)) == (
        "a new private run: it spends its own epsilon")


def test_dashboard_serves_the_weights_where_the_search_put_them(tmp_path, monkeypatch):
    """`dpnas search --artifacts DIR` records DIR in the study; `dpnas dashboard` (no --artifacts) must serve it, as
    the `optuna-dashboard ... --artifact-dir DIR` line the search prints does, not the default beside the storage."""
    from dpnas.search.weights import open_store, record_location

    journal, elsewhere = str(tmp_path / "s.journal"), str(tmp_path / "weights_elsewhere")
    study = optuna.create_study(study_name="s", storage=open_storage(journal))
    record_location(study, elsewhere)
    trial = study.ask()
    (tmp_path / "weights.pt").write_bytes(b"the weights")
    artifact_id = optuna.artifacts.upload_artifact(artifact_store=open_store(elsewhere), study_or_trial=trial,
                                                   file_path=str(tmp_path / "weights.pt"))
    served = {}
    monkeypatch.setattr("optuna_dashboard.run_server", lambda storage, host, port, artifact_store: served.update(
        store=artifact_store))
    assert main(["dashboard", journal]) == 0
    assert served["store"] is not None and served["store"].open_reader(artifact_id).read() == b"the weights"


def test_each_worker_s_weights_are_found_from_any_directory(tmp_path, monkeypatch):
    """Two hosts on one storage, each in its own working directory, both given `--artifacts weights`: the study
    recorded the relative name, so each host kept its weights in a folder of its own, and `dpnas best --weights`
    anywhere but in the right host's directory failed ("ArtifactNotFound: not found")."""
    import dpnas.search.study_report as study_report
    from dpnas.search.runner import search

    url = str(tmp_path / "shared.journal")
    for host, n_trials in (("a", 1), ("b", 2)):
        (tmp_path / host).mkdir()
        monkeypatch.chdir(tmp_path / host)
        spec = load_study_file(write_study(tmp_path / host, n_trials=1, extra='keep_weights = "all"'))
        search(spec, storage_url=url, n_trials=n_trials, artifacts="weights", progress=False)
    monkeypatch.chdir(tmp_path)  # where `dpnas best` runs
    study = optuna.load_study(study_name="tiny", storage=open_storage(url))
    done = study.get_trials(states=(TrialState.COMPLETE,))  # (a repeated proposal is a FAIL, untrained)
    assert len(done) == 2
    for trial in done:  # whichever of them is the best
        monkeypatch.setattr(study_report, "best_trials", lambda study, trial=trial: [trial])
        out = tmp_path / f"trial{trial.number}.pt"
        assert study_report.export_best_weights(study, url, out) == [out]
        assert load_checkpoint(out)["provenance"]["trial"] == trial.number
    # seen from a machine without host b's folder: one clear line, and no empty folder left where it was
    shutil.rmtree(tmp_path / "b" / "weights")
    b_trial = next(t for t in done if t.user_attrs["weights_location"] == str(tmp_path / "b" / "weights"))
    monkeypatch.setattr(study_report, "best_trials", lambda study: [b_trial])
    with pytest.raises(ConfigError, match=f"trial {b_trial.number}: .*no such directory.*written by worker"):
        study_report.export_best_weights(study, url, tmp_path / "gone.pt")
    assert not (tmp_path / "b" / "weights").exists()


def test_a_displaced_trial_s_weights_are_removed_where_its_worker_kept_them(tmp_path):
    """Workers on one storage may keep weights in folders of their own (`--artifacts` per host): a worker removed a
    displaced trial's file through its own folder, where it is not, and marked it removed, so it stayed on disk for
    good. It is removed from the trial's folder, or, where that is not reachable here, left unmarked."""
    from dpnas.search.weights import _ARTIFACT, _WHERE, open_store, remove_displaced_weights

    study = optuna.create_study(study_name="s", storage=open_storage(str(tmp_path / "s.journal")),
                                direction="maximize")
    (tmp_path / "weights.pt").write_bytes(b"weights")
    ids = {}
    for host, value in (("a", 0.9), ("b", 0.5)):  # b's trial is displaced by a's
        location = str(tmp_path / host)
        trial = study.ask()
        ids[host] = optuna.artifacts.upload_artifact(artifact_store=open_store(location), study_or_trial=trial,
                                                     file_path=str(tmp_path / "weights.pt"))
        trial.set_user_attr(_ARTIFACT, ids[host])
        trial.set_user_attr(_WHERE, location)
        study.tell(trial, value)
    b_file = tmp_path / "b" / ids["b"]
    shutil.rmtree(tmp_path / "b")  # on another host: not reachable from a
    remove_displaced_weights(study, keep="best", store=open_store(str(tmp_path / "a")), location=str(tmp_path / "a"))
    assert weights_available(study, study.trials[1]) and not (tmp_path / "b").exists()
    b_file.parent.mkdir()
    b_file.write_bytes(b"weights")  # reachable again (a shared folder)
    remove_displaced_weights(study, keep="best", store=open_store(str(tmp_path / "a")), location=str(tmp_path / "a"))
    assert not b_file.exists() and not weights_available(study, study.trials[1])
    assert weights_available(study, study.trials[0]) and (tmp_path / "a" / ids["a"]).exists()
