"""Training end to end on real (digits) data: budget met, results complete, selection on validation only."""

import json
import math
from pathlib import Path

import pytest
import torch

import dpnas.dp.train as train_module
from dpnas import MODELS, ArchConfig, build_model
from dpnas.arch.space import ConfigError
from dpnas.cli import main
from dpnas.data.augment import random_crop_flip
from dpnas.data.datasets import load_dataset
from dpnas.dp.config import PrivacyConfig, TrainConfig
from dpnas.dp.recipes import RECIPES, split_overrides
from dpnas.dp.train import DivergedError, train
from dpnas.results import json_safe

TINY = MODELS["tiny"].arch
REQUIRED = {"config", "dataset", "epsilon_target", "epsilon_spent", "delta", "noise_multiplier", "sample_rate", "steps",
            "max_grad_norm", "val_accuracy", "test_accuracy", "samples_per_second", "wall_seconds", "device", "history"}


@pytest.fixture(scope="module")
def digits():
    return load_dataset("digits", val_fraction=0.2, seed=0)


def quick(**changes):
    base = dict(epochs=2, batch_size=128, physical_batch_size=64, optimizer="nadam", lr=2e-3)
    return TrainConfig(**{**base, **changes})


def test_private_training_meets_the_budget_and_reports_it(digits):
    result = train(TINY, digits, train_cfg=quick(), privacy=PrivacyConfig(epsilon=4.0), progress=False)
    assert REQUIRED <= set(result)
    assert result["epsilon_spent"] <= 4.0 and result["epsilon_spent"] >= 0.99 * 4.0
    assert result["steps"] == result["planned_steps"] == 2 * round(len(digits.train) / 128)
    assert result["sample_rate"] == 128 / len(digits.train)
    assert result["noise_multiplier"] > 0.5
    assert [h["epoch"] for h in result["history"]] == [1, 2]
    assert result["history"][0]["epsilon_spent"] < result["history"][1]["epsilon_spent"] == result["epsilon_spent"]
    assert result["train_size"] + result["val_size"] + result["test_size"] == 1797
    assert 0 <= result["test_accuracy"] <= 1 and result["samples_per_second"] > 0
    assert not result["interrupted"] and not result["synthetic_data"]
    # which exact method each trainable layer's per-sample gradients came from: every layer is counted
    model = build_model(TINY, num_classes=10, in_channels=digits.in_channels)
    trainable = [m for m in model.modules() if any(True for _ in m.parameters(recurse=False))]
    assert result["per_sample"] == "dpnas" and sum(result["per_sample_methods"].values()) == len(trainable)


def test_training_is_reproducible_for_a_seed_when_asked(digits):
    privacy = PrivacyConfig(reproducible=True)
    a = train(TINY, digits, train_cfg=quick(epochs=1), privacy=privacy, progress=False)
    b = train(TINY, digits, train_cfg=quick(epochs=1), privacy=privacy, progress=False)
    c = train(TINY, digits, train_cfg=quick(epochs=1, seed=1), privacy=privacy, progress=False)
    assert a["history"][0]["train_loss"] == b["history"][0]["train_loss"]
    assert a["test_accuracy"] == b["test_accuracy"]
    assert a["history"][0]["train_loss"] != c["history"][0]["train_loss"]
    assert a["reproducible"] is True


def test_default_private_runs_draw_secret_batches_and_noise(digits, monkeypatch):
    # Two private runs with the same seed: same initialisation, but different Poisson batches and noise, from
    # seeds that nothing recorded holds (DP-SGD's guarantee assumes the adversary knows neither).
    drawn, batches, weights = [], [], []
    real_seeds, real_sample = train_module.release_seeds, train_module.poisson_sample

    def spy_seeds(seed, privacy):
        drawn.append(real_seeds(seed, privacy))
        return drawn[-1]

    def spy_sample(*args, **kwargs):
        idx = real_sample(*args, **kwargs)
        batches.append(idx.tolist())
        return idx

    monkeypatch.setattr(train_module, "release_seeds", spy_seeds)
    monkeypatch.setattr(train_module, "poisson_sample", spy_sample)
    results = []
    for _ in range(2):
        batches.clear()
        results.append(train(TINY, digits, train_cfg=quick(epochs=1), privacy=PrivacyConfig(), progress=False,
                             on_trained=lambda m: weights.append([p.detach().clone() for p in m.parameters()])))
        results[-1]["batches"] = list(batches)
    assert drawn[0] != drawn[1] and all(s not in (1, 3) for pair in drawn for s in pair)  # not seed + 1 / + 3
    assert results[0]["batches"] != results[1]["batches"]  # different Poisson draws
    assert any(not torch.equal(a, b) for a, b in zip(*weights))  # different noise (and batches)
    for result, seeds in zip(results, drawn):
        assert result["reproducible"] is False
        recorded = json.dumps(json_safe({k: v for k, v in result.items() if k != "batches"}))
        assert all(str(s) not in recorded for s in seeds)
    # a non-private run has nothing to protect and stays seeded
    assert real_seeds(5, PrivacyConfig(epsilon=float("inf"))) == (6, 8, 9)


def test_test_set_is_evaluated_once_after_training(digits, monkeypatch):
    calls = []
    real = train_module.count_correct

    def spy(model, split, data, **kw):
        calls.append("test" if split is data.test else "val" if split is data.val else "other")
        return real(model, split, data, **kw)

    monkeypatch.setattr(train_module, "count_correct", spy)
    train(TINY, digits, train_cfg=quick(epochs=3), privacy=PrivacyConfig(), progress=False)
    assert calls == ["val", "val", "val", "test"]


def test_interrupt_keeps_what_was_finished(digits):
    def stop(record):
        raise KeyboardInterrupt

    result = train(TINY, digits, train_cfg=quick(epochs=5), privacy=PrivacyConfig(), progress=False, on_epoch=stop)
    assert result["interrupted"] and len(result["history"]) == 1
    assert result["steps"] < result["planned_steps"]
    assert 0 < result["epsilon_spent"] < 8.0  # what was actually spent, not the target
    with pytest.raises(KeyboardInterrupt):
        train(TINY, digits, train_cfg=quick(), privacy=PrivacyConfig(), progress=False, on_epoch=stop,
              catch_interrupt=False)


def test_non_private_mode_uses_no_noise(digits):
    result = train(TINY, digits, train_cfg=quick(epochs=1), privacy=PrivacyConfig(epsilon=math.inf), progress=False)
    assert result["private"] is False and result["noise_multiplier"] == 0.0
    assert math.isinf(result["epsilon_spent"])


def test_divergence_is_reported(digits):
    with pytest.raises(DivergedError, match="parameters became NaN or infinite in epoch 1"):
        train(TINY, digits, train_cfg=quick(epochs=1, optimizer="sgd", lr=1e30), privacy=PrivacyConfig(epsilon=math.inf),
              progress=False)


def test_divergence_is_judged_from_the_private_parameters_not_the_exact_training_loss(digits, monkeypatch):
    """The training loss is an exact statistic of the batches: a search that pruned a trial for it would release
    whether it was finite. Divergence is read from the parameters (DP-SGD's output) instead."""
    real_step = train_module.DPSGDEngine.step

    def exact_loss_not_finite(self, *args, **kwargs):
        real_step(self, *args, **kwargs)
        return torch.tensor(math.nan)

    monkeypatch.setattr(train_module.DPSGDEngine, "step", exact_loss_not_finite)
    result = train(TINY, digits, train_cfg=quick(epochs=2), privacy=PrivacyConfig(epsilon=4.0), progress=False)
    assert len(result["history"]) == 2 and math.isnan(result["history"][0]["train_loss"])
    assert train_module.parameters_finite(torch.nn.Linear(2, 2))
    broken = torch.nn.Linear(2, 2)
    with torch.no_grad():
        broken.bias[1] = math.inf
    assert not train_module.parameters_finite(broken)


@pytest.mark.parametrize("name", list(RECIPES))
def test_every_recipe_trains(digits, name):
    recipe = RECIPES[name]
    cfg = recipe.train.replace(epochs=1, batch_size=128, physical_batch_size=64,
                               aug_multiplicity=min(recipe.train.aug_multiplicity, 2), lr=min(recipe.train.lr, 0.5))
    result = train(TINY, digits, train_cfg=cfg, privacy=recipe.privacy, progress=False)
    assert result["epsilon_spent"] <= recipe.privacy.epsilon
    assert math.isfinite(result["history"][0]["train_loss"])


def test_recipes_match_the_reference():
    smooth = RECIPES["smoothnet"]
    assert (smooth.train.optimizer, smooth.train.lr, smooth.train.momentum, smooth.train.weight_decay) == ("sgd", 2e-3, 0.9, 2e-4)
    assert (smooth.train.schedule, smooth.train.step_size, smooth.train.gamma) == ("step", 5, 0.9)
    assert (smooth.train.batch_size, smooth.train.physical_batch_size, smooth.train.val_fraction) == (256, 64, 0.2)
    assert (smooth.privacy.epsilon, smooth.privacy.delta, smooth.privacy.max_grad_norm) == (7.0, 1e-5, 6.83)
    r9 = RECIPES["resnet9-scalenorm"]
    assert (r9.train.optimizer, r9.train.lr, r9.train.schedule, r9.train.batch_size) == ("nadam", 1e-3, "plateau", 1024)
    assert (r9.privacy.epsilon, r9.privacy.max_grad_norm) == (8.0, 1.5)
    de = RECIPES["de-wrn"]
    assert (de.train.batch_size, de.train.aug_multiplicity, de.train.ema_decay, de.privacy.max_grad_norm) == (4096, 16, 0.9999, 1.0)


def test_the_quick_recipe_and_the_digits_studies_take_each_poisson_batch_in_one_pass(digits):
    """A batch larger than the physical batch takes a second pass of a few rows, which costs a whole pass (1.03-1.14x
    a quickstart step at a physical batch of 256, benchmarks/poisson_chunks.py): the CPU settings leave room for the
    Poisson batch's tail, on digits and on a CIFAR-sized training set."""
    from scipy.stats import binom

    from dpnas.search.study_file import load_study_file

    studies = Path(__file__).resolve().parents[1] / "studies"
    configs = [RECIPES["quick"].train] + [load_study_file(studies / f).train
                                          for f in ("quickstart.toml", "ablation_digits.toml")]
    for cfg in configs:
        for n in (len(digits.train), 45_000):
            assert binom.sf(cfg.physical_batch_size, n, cfg.batch_size / n) < 1e-4, (cfg, n)


def test_overrides_route_to_the_right_config():
    arch, train_cfg, privacy = split_overrides(["activation=relu", "epochs=3", "epsilon=2", "accountant=prv"])
    assert arch == {"activation": "relu"} and train_cfg == {"epochs": 3} and privacy == {"epsilon": 2, "accountant": "prv"}
    with pytest.raises(ConfigError, match="unknown field 'colour'"):
        split_overrides(["colour=red"])


def test_train_config_checks():
    with pytest.raises(ConfigError, match="optimizer: unknown value 'lbfgs'"):
        TrainConfig(optimizer="lbfgs")
    with pytest.raises(ConfigError, match="epochs: must be >= 1"):
        TrainConfig(epochs=0)
    with pytest.raises(ConfigError, match="aug_multiplicity"):
        TrainConfig(aug_multiplicity=4)
    with pytest.raises(ConfigError, match="val_fraction"):
        TrainConfig(val_fraction=1.0)


def test_random_crop_flip_returns_shifted_or_flipped_crops():
    g = torch.Generator().manual_seed(0)
    x = torch.arange(2 * 3 * 8 * 8, dtype=torch.float).view(2, 3, 8, 8) + 1
    out = random_crop_flip(x, generator=g, padding=2)
    assert out.shape == x.shape
    padded = torch.nn.functional.pad(x, (2, 2, 2, 2))
    for i in range(2):
        candidates = [padded[i, :, dy : dy + 8, dx : dx + 8] for dy in range(5) for dx in range(5)]
        assert any(torch.equal(out[i], c) or torch.equal(out[i], c.flip(2)) for c in candidates)


def test_cli_train_writes_the_result_json(tmp_path, capsys):
    out = tmp_path / "result.json"
    code = main(["train", "tiny", "--dataset", "digits", "--epochs", "1", "--batch-size", "128", "--epsilon", "3",
                 "--set", "activation=elu", "--quiet", "--out", str(out)])
    assert code == 0
    result = json.loads(out.read_text())
    assert REQUIRED <= set(result)
    assert result["config"]["activation"] == "elu" and result["epsilon_target"] == 3.0
    assert result["epsilon_spent"] <= 3.0 and result["recipe"] == "quick"
    assert "result written to" in capsys.readouterr().out


def test_cli_train_with_bf16_and_channels_last(tmp_path):
    out = tmp_path / "result.json"
    code = main(["train", "tiny", "--dataset", "digits", "--epochs", "1", "--batch-size", "128", "--epsilon", "3",
                 "--set", "amp=true", "--set", "channels_last=true", "--quiet", "--out", str(out)])
    assert code == 0
    result = json.loads(out.read_text())
    assert result["train_config"]["amp"] is True and result["train_config"]["channels_last"] is True
    assert result["per_sample"] == "dpnas" and 0.99 * 3.0 <= result["epsilon_spent"] <= 3.0
    assert result["test_accuracy"] > 0.2  # 1 epoch of tiny on digits; chance is 0.1


def test_cli_no_dp_writes_strict_json(tmp_path):
    out = tmp_path / "r.json"
    assert main(["train", "tiny", "--no-dp", "--epochs", "1", "--quiet", "--out", str(out)]) == 0
    result = json.loads(out.read_text())  # strict JSON: no Infinity
    assert result["private"] is False and result["epsilon_spent"] is None


@pytest.mark.parametrize(
    "argv,needle",
    [
        (["--dataset", "mnist"], "unknown dataset"),
        (["--epsilon", "0"], "epsilon: must be > 0"),
        (["--epsilon", "1e20"], "epsilon: at most 1e+06"),  # Opacus's noise search never ended
        (["--set", "val_noise=1e308"], "val_noise: must be a number from 0"),  # an OverflowError in the accounting
        (["--delta", "0.01"], "delta: 0.01 >= 1/n"),
        (["--recipe", "fast"], "unknown recipe 'fast'"),
        (["--batch-size", "5000"], "batch_size: 5000 is larger"),
        (["--set", "optimizer=lbfgs"], "optimizer: unknown value"),
        (["--set", "channels_last=true", "--set", "per_sample=opacus"], "channels_last: needs dpnas's per-sample path"),
        (["--set", "amp=true", "--set", "per_sample=opacus"], "amp: needs dpnas's per-sample path"),
    ],
)
def test_cli_train_user_errors_exit_2(capsys, argv, needle):
    assert main(["train", "tiny", "--quiet", *argv]) == 2
    err = capsys.readouterr().err
    assert needle in err and err.count("\n") == 1, err


def test_quick_recipe_reaches_a_useful_accuracy_on_digits(digits):
    """The 'done' bar of the training issue: digits at eps = 8 above 85 % test accuracy on CPU."""
    arch = ArchConfig(width=1.0, depth=1.0, head_hidden=(64,))
    recipe = RECIPES["quick"]
    result = train(arch, digits, train_cfg=recipe.train, privacy=recipe.privacy, progress=False)
    assert result["epsilon_spent"] <= 8.0
    assert result["test_accuracy"] > 0.85, result["test_accuracy"]


def test_a_result_says_which_of_its_statistics_its_epsilon_does_not_cover(digits):
    """The JSON history holds each epoch's exact training loss and the result the exact test scores: the file says
    so itself (README), and names the validation scores too where they are exact (val_noise = 0)."""
    noisy = train(TINY, digits, train_cfg=quick(epochs=1), privacy=PrivacyConfig(epsilon=4.0), progress=False)
    assert [line.split(":")[0] for line in noisy["not_covered"]] == ["history's train_loss", "test_accuracy and test_loss"]
    assert f"{len(digits.train):,} training records" in noisy["not_covered"][0]
    exact = train(TINY, digits, train_cfg=quick(epochs=1), privacy=PrivacyConfig(epsilon=4.0, val_noise=0.0),
                  progress=False)
    assert any(line.startswith("val_accuracy and val_loss") for line in exact["not_covered"])
    open_run = train(TINY, digits, train_cfg=quick(epochs=1), privacy=PrivacyConfig(epsilon=math.inf), progress=False)
    assert open_run["not_covered"] == ["everything in it: the run is not private"]
