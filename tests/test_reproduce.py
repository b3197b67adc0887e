"""`dpnas.reproduce`: the papers' networks and recipes against the published numbers.

Quick runs train for real (offline, on the digits stand-in); full runs are only checked up to the
point where a missing dataset must be explained.
"""

import contextlib
import dataclasses
import io
import json

import pytest
import torch

import dpnas.reproduce as reproduce
from dpnas import MODELS, build_model, count_parameters
from dpnas.arch.space import ConfigError
from dpnas.data.datasets import DataError, load_dataset
from dpnas.reproduce import (
    QUICK_LABEL,
    QUICK_TRAIN_SIZE,
    REPRODUCTIONS,
    DatasetUnavailableError,
    format_comparison,
    run_reproduction,
)


@pytest.fixture(scope="module")
def smoothnet_quick(tmp_path_factory):
    out_dir = tmp_path_factory.mktemp("runs")
    empty = tmp_path_factory.mktemp("no-data")
    stderr = io.StringIO()
    with contextlib.redirect_stderr(stderr):
        rows = run_reproduction("smoothnet", quick=True, data_dir=empty, out_dir=out_dir, progress=False, device="cpu")
    return rows, out_dir, stderr.getvalue()


def test_smoothnet_quick_runs_offline_on_the_digits_stand_in(smoothnet_quick):
    rows, out_dir, stderr = smoothnet_quick
    assert len(rows) == 1
    row = rows[0]
    assert row["reproduction"] == "smoothnet" and row["model"] == "smoothnet"
    assert row["quick"] and row["label"] == QUICK_LABEL and not row["comparable"]
    assert row["dataset"] == "digits (stand-in for cifar10)" and row["stand_in"]
    assert "digits" in stderr and "stand-in" in stderr and "cifar10" in stderr  # said loudly, not only in the row
    assert row["status"] == "finished" and not row["interrupted"]
    assert 0.0 <= row["accuracy_percent"] <= 100.0
    # the budget of the recipe, spent (almost) fully and never exceeded
    assert row["epsilon"] == 7.0 and row["delta"] == 1e-5
    assert 0.99 * 7.0 <= row["epsilon_spent"] <= 7.0
    assert row["published_accuracy_percent"] == 73.5 and row["published_epsilon"] == 7.0
    assert row["params_paper"] == row["params_full"] == 3_391_853
    trained = build_model(MODELS["smoothnet"].arch.replace(width=1.0, depth=1.0), num_classes=10, in_channels=1)
    assert row["params_trained"] == count_parameters(trained) < 3_391_853
    assert row["epochs"] == row["epochs_planned"] == 2 and row["epochs_recipe"] == 90
    assert row["train_size"] <= QUICK_TRAIN_SIZE + 5 * 18  # about 512 (a hash keeps each record on its own)


def test_each_run_writes_its_full_result(smoothnet_quick):
    rows, out_dir, _ = smoothnet_quick
    path = rows[0]["result_path"]
    assert path.startswith(str(out_dir)) and list(out_dir.iterdir())
    record = json.loads(open(path).read())
    assert record["dataset"] == "digits" and record["recipe"] == "smoothnet"
    assert record["test_accuracy"] * 100 == pytest.approx(rows[0]["accuracy_percent"])
    assert record["epsilon_spent"] == rows[0]["epsilon_spent"] and len(record["history"]) == 2
    assert record["config"]["width"] == 1.0 and record["config"]["depth"] == 1.0  # what was actually trained
    assert record["train_config"]["lr"] == 2e-3 and record["max_grad_norm"] == 6.83  # the recipe's, unchanged
    assert record["reproduction"]["label"] == QUICK_LABEL and record["reproduction"]["published_accuracy_percent"] == 73.5


def test_comparison_table_shows_this_run_against_the_paper(smoothnet_quick):
    rows, _, _ = smoothnet_quick
    table = format_comparison(rows)
    assert QUICK_LABEL in table
    assert "73.5 %" in table and f"{rows[0]['accuracy_percent']:.1f} %" in table
    assert "digits (stand-in for cifar10)" in table
    assert "3,391,853" in table and f"{rows[0]['params_trained']:,}" in table
    assert f"{rows[0]['epsilon_spent']:.3f} / 7" in table and "2/90" in table


def test_published_numbers_are_the_reference_ones():
    def published(name, dataset):
        return [(run.model, run.published[dataset].accuracy) for run in REPRODUCTIONS[name].runs]

    assert published("smoothnet", "cifar10") == [("smoothnet", 73.5)]
    assert published("smoothnet", "imagenette") == [("smoothnet", 69.2)]
    assert published("resnet9-scalenorm", "cifar10") == [("resnet9_scalenorm", 82.5), ("resnet9", None)]
    assert published("de-wrn", "cifar10") == [("wrn16_4", 81.4)]
    assert REPRODUCTIONS["de-wrn"].runs[0].published["cifar10"].model == "WRN-40-4"
    for repro in REPRODUCTIONS.values():
        for run in repro.runs:
            for pub in run.published.values():
                assert (pub.epsilon, pub.delta) == (repro.recipe_obj.privacy.epsilon, repro.recipe_obj.privacy.delta)


def test_resnet9_quick_trains_with_and_without_scalenorm(tmp_path):
    rows = run_reproduction("resnet9-scalenorm", quick=True, data_dir=tmp_path / "none", out_dir=tmp_path,
                            progress=False, device="cpu")
    assert [r["model"] for r in rows] == ["resnet9_scalenorm", "resnet9"]
    assert [r["published_accuracy_percent"] for r in rows] == [82.5, None]
    assert [r["params_full"] for r in rows] == [2_448_714, 2_447_946] == [r["params_paper"] for r in rows]
    configs = [json.loads(open(r["result_path"]).read())["config"] for r in rows]
    assert [c["scalenorm"] for c in configs] == ["after_add", "none"]
    for row in rows:
        assert row["label"] == QUICK_LABEL and 0.99 * 8 <= row["epsilon_spent"] <= 8
        assert 0 <= row["accuracy_percent"] <= 100
    table = format_comparison(rows)
    lines = {name: next(line for line in table.splitlines() if line.startswith(name))
             for name in ("ResNet-9 + ScaleNorm", "ResNet-9 (no ScaleNorm)")}
    assert "82.5 %" in lines["ResNet-9 + ScaleNorm"] and "n/a" in lines["ResNet-9 (no ScaleNorm)"]
    assert "82.5" not in lines["ResNet-9 (no ScaleNorm)"]


def test_quick_uses_a_dataset_that_is_present_without_downloading(tmp_path, monkeypatch):
    calls = []

    def fake_load(name, **kwargs):  # a CIFAR-shaped stand-in for a local CIFAR-10 copy
        calls.append((name, kwargs))
        data = load_dataset("synthetic", val_fraction=kwargs["val_fraction"], seed=kwargs["seed"], synthetic_size=1600)
        return dataclasses.replace(data, name=name, synthetic=False)

    monkeypatch.setattr(reproduce, "load_dataset", fake_load)
    rows = run_reproduction("de-wrn", quick=True, out_dir=tmp_path, progress=False, device="cpu")
    assert [(name, kw["download"]) for name, kw in calls] == [("cifar10", False)]
    (row,) = rows
    assert row["dataset"] == "cifar10" and not row["stand_in"] and row["label"] == QUICK_LABEL
    # shrunk from 1440 by a hash of each record's id: Binomial(1440, 512 / 1440), sd 18
    assert abs(row["train_size"] - QUICK_TRAIN_SIZE) < 5 * 18
    assert row["published_accuracy_percent"] == 81.4 and row["params_paper"] is None
    table = format_comparison(rows)
    assert "81.4 % (WRN-40-4)" in table and "WRN-40-4, a deeper network" in table
    record = json.loads(open(row["result_path"]).read())
    assert record["train_config"]["aug_multiplicity"] == 2 and record["train_config"]["lr"] == 4.0


def test_full_run_without_cifar10_says_how_to_get_it(tmp_path):
    empty = tmp_path / "data"
    empty.mkdir()
    with pytest.raises(DatasetUnavailableError) as info:
        run_reproduction("smoothnet", data_dir=empty, download=False, out_dir=tmp_path / "runs", progress=False)
    assert isinstance(info.value, DataError)
    message = str(info.value)
    for needle in ("cifar-10-python.tar.gz", "cs.toronto.edu", str(empty / "cifar-10-batches-py"), "--quick"):
        assert needle in message
    assert not (tmp_path / "runs").exists()


def test_full_run_downloads_cifar10_into_the_default_cache(tmp_path, monkeypatch):
    """Without --data-dir, a fresh machine's ~/.cache/dpnas/data was refused as a --data-dir that does not exist
    ("leave --data-dir out"), so `dpnas reproduce` never downloaded CIFAR-10 as it says it does."""
    from torchvision.datasets import CIFAR10

    monkeypatch.setenv("HOME", str(tmp_path))
    tried = []

    def offline(self):
        tried.append(self.root)
        raise OSError("no network")

    monkeypatch.setattr(CIFAR10, "download", offline)
    with pytest.raises(DatasetUnavailableError, match="no network"):
        run_reproduction("smoothnet", out_dir=tmp_path / "runs", progress=False)
    assert tried == [str(tmp_path / ".cache" / "dpnas" / "data")]


def test_full_run_without_imagenette_says_how_to_get_it(tmp_path):
    with pytest.raises(DatasetUnavailableError) as info:
        run_reproduction("smoothnet", dataset="imagenette", data_dir=tmp_path, out_dir=tmp_path, progress=False)
    message = str(info.value)
    for needle in ("imagenette2-160.tgz", "fast.ai", str(tmp_path / "imagenette2-160"), "train/", "val/"):
        assert needle in message


@pytest.mark.parametrize(
    "name, dataset, needle",
    [
        ("smoothnets", None, "smoothnet, resnet9-scalenorm, de-wrn"),
        ("smoothnet", "digits", "cifar10, imagenette"),
        ("resnet9-scalenorm", "imagenette", "cifar10"),
    ],
)
def test_unknown_reproductions_and_datasets_are_refused(tmp_path, name, dataset, needle):
    with pytest.raises(ConfigError, match=needle):
        run_reproduction(name, dataset=dataset, quick=True, data_dir=tmp_path, out_dir=tmp_path, progress=False)
    assert not list(tmp_path.iterdir())


def test_quick_subsets_keep_each_record_by_its_own_id():
    """Quick mode trains on a subset: a stratified draw of exactly 512 made whether a record is in it depend on the
    other records (removing one unused record changed hundreds of others); now each is kept by a hash of its id."""
    from dpnas.reproduce import shrink_splits

    data = load_dataset("digits", val_fraction=0.2, seed=0)
    small = shrink_splits(data, train=300, val=100)
    assert abs(len(small.train) - 300) < 60 and abs(len(small.val) - 100) < 40
    without = dataclasses.replace(data, train=data.train.subset(torch.arange(1, len(data.train))),
                                  train_ids=data.train_ids[1:])
    again = shrink_splits(without, train=300 * (len(data.train) - 1) / len(data.train), val=100)
    assert set(again.train_ids.tolist()) == set(small.train_ids.tolist()) - {int(data.train_ids[0])}
    assert torch.equal(again.val_ids, small.val_ids)


def test_a_quick_stand_in_says_that_it_does_not_use_the_asked_image_size(tmp_path, capsys):
    # the digits stand-in keeps its own resolution: a user who asked for one is told, not left to assume it was used
    data = reproduce._load(REPRODUCTIONS["smoothnet"], "cifar10", data_dir=tmp_path, quick=True, download=False,
                           image_size=24, progress=False)
    assert data.stand_in_reason is not None
    # the loader's "allow the download (without --no-download ...)" does not apply: quick mode never downloads
    assert "never downloads" in data.stand_in_reason and "--no-download" not in data.stand_in_reason
    assert "image_size 24 is not used" in capsys.readouterr().err
    reproduce._load(REPRODUCTIONS["smoothnet"], "cifar10", data_dir=tmp_path, quick=True, download=False,
                    image_size=None, progress=False)
    assert "image_size" not in capsys.readouterr().err
