"""Train one architecture with DP-SGD at a fixed (ε, δ) and report what it cost.

A thin orchestrator: the model comes from :mod:`dpnas.arch.models`, the data from
:mod:`dpnas.data.datasets`, the noise and accounting from :mod:`dpnas.dp.privacy`, the step from
:mod:`dpnas.dp.engine`.  Selection signals (validation accuracy per epoch) come from the
validation split held out of the training set, released through the Gaussian mechanism on the correct count
(``[privacy] val_noise``); the test set is evaluated once, at the end.
"""

from __future__ import annotations

import math
import secrets
import time
from dataclasses import dataclass, field
from typing import Any, Callable

import torch
import torch.nn.functional as F
from torch import nn
from torch.optim.swa_utils import AveragedModel, get_ema_multi_avg_fn
from tqdm.auto import tqdm

from dpnas.arch.models import build_model, count_parameters
from dpnas.arch.space import ArchConfig, ConfigError
from dpnas.data.augment import random_crop_flip
from dpnas.data.datasets import DatasetSplits, ImageData, normalise
from dpnas.dp.config import PrivacyConfig, TrainConfig
from dpnas.dp.engine import DPSGDEngine
from dpnas.dp.interrupts import interrupts_held
from dpnas.dp.privacy import (
    PrivacyPlan,
    epsilon_spent,
    make_accountant,
    noisy_accuracy,
    plan_privacy,
    poisson_sample,
    steps_per_epoch,
    validation_epsilon,
)
from dpnas.dp.resume import (
    check_generators,
    check_plan,
    generator_states,
    plan_record,
    progress_record,
    restore_generators,
)

EpochCallback = Callable[[dict[str, Any]], None]


class DivergedError(RuntimeError):
    """The model's parameters became NaN or infinite."""


def parameters_finite(model: nn.Module) -> bool:
    """No parameter holds a NaN or an infinity (one host sync). From the parameters' norms, in one call (0.07 ms
    against 0.19 ms element-wise for the quickstart's 11 tensors): a norm is not finite when an element is not,
    or when a tensor's values pass about 1e19 (float32's square root of its largest), diverged all the same."""
    return bool(torch.stack(torch._foreach_norm([p.detach() for p in model.parameters()])).isfinite().all())


def release_seeds(seed: int, privacy: PrivacyConfig) -> tuple[int, int, int]:
    """Seeds of the Poisson-sampling, gradient-noise and validation-noise generators: secret for a private run
    unless it asks to be reproducible.

    The secret ones come from the OS's CSPRNG (`secrets`) and live only in this call's caller; a non-private run has
    nothing to protect and stays seeded.
    """
    if privacy.private and not privacy.reproducible:
        return secrets.randbits(63), secrets.randbits(63), secrets.randbits(63)
    return seed + 1, seed + 3, seed + 4


def default_device() -> torch.device:
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def check_device(name: torch.device | str | None, *, what: str = "--device") -> torch.device:
    """The device `name` means, if this machine has it (None: :func:`default_device`); else a ConfigError.

    Checked before data is loaded or a model built: torch only notices a mistyped name, a missing driver or a GPU
    index past the last one when the first tensor moves there, with a traceback, after the dataset is loaded.
    """
    if name is None:
        return default_device()
    try:
        device = torch.device(name)
    except (RuntimeError, TypeError, ValueError):
        raise ConfigError(f"{what} {name!r}: not a device; expected cpu, cuda or cuda:N") from None
    if device.type == "cpu":
        return device
    if device.type != "cuda":
        raise ConfigError(f"{what} {name!r}: dpnas trains on cpu or cuda (cuda:N), not {device.type}")
    if not torch.cuda.is_available():
        raise ConfigError(f"{what} {name!r}: CUDA is not available here (no NVIDIA GPU or driver, or a torch "
                          f"{torch.__version__} built without CUDA); use --device cpu")
    count = torch.cuda.device_count()
    if device.index is not None and device.index >= count:
        raise ConfigError(f"{what} {name!r}: this machine has {count} CUDA device(s), cuda:0 to cuda:{count - 1}")
    return device


def make_optimizer(model: nn.Module, cfg: TrainConfig) -> torch.optim.Optimizer:
    params = [p for p in model.parameters() if p.requires_grad]
    if cfg.optimizer == "sgd":
        return torch.optim.SGD(params, lr=cfg.lr, momentum=cfg.momentum, weight_decay=cfg.weight_decay)
    if cfg.optimizer == "nadam":
        return torch.optim.NAdam(params, lr=cfg.lr, weight_decay=cfg.weight_decay)
    return torch.optim.Adam(params, lr=cfg.lr, weight_decay=cfg.weight_decay)


def make_scheduler(optimizer: torch.optim.Optimizer, cfg: TrainConfig):
    """An epoch-level schedule; `plateau` watches validation accuracy."""
    if cfg.schedule == "step":
        return torch.optim.lr_scheduler.StepLR(optimizer, step_size=cfg.step_size, gamma=cfg.gamma)
    if cfg.schedule == "plateau":
        return torch.optim.lr_scheduler.ReduceLROnPlateau(
            optimizer, mode="max", factor=cfg.plateau_factor, patience=cfg.plateau_patience
        )
    if cfg.schedule == "cosine":
        return torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=cfg.epochs)
    return None


def evaluate(model: nn.Module, split: ImageData, data: DatasetSplits, *, batch_size: int) -> tuple[float, float]:
    """Exact (accuracy, mean loss) on a split; NaN for an empty split. Never for a score that leaves a private run:
    validation scores go through :func:`dpnas.dp.privacy.noisy_accuracy`."""
    if len(split) == 0:
        return math.nan, math.nan
    correct, loss = count_correct(model, split, data, batch_size=batch_size)
    return float(correct) / len(split), float(loss) / len(split)


@torch.no_grad()
def count_correct(model: nn.Module, split: ImageData, data: DatasetSplits, *,
                  batch_size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(correct predictions, summed loss) on a split, as tensors on its device (no host sync)."""
    was_training = model.training
    model.eval()
    correct = torch.zeros((), device=split.labels.device)
    loss = torch.zeros((), device=split.labels.device)
    for start in range(0, len(split), batch_size):
        x = normalise(split.images[start : start + batch_size], data.mean, data.std)
        y = split.labels[start : start + batch_size]
        logits = model(x).float()
        loss += F.cross_entropy(logits, y, reduction="sum")
        correct += (logits.argmax(1) == y).sum()
    model.train(was_training)
    return correct, loss


def _step_scheduler(scheduler, score: float) -> None:
    """End an epoch of the schedule; `plateau` reads `score` (never NaN: it is refused without one per epoch)."""
    if scheduler is None:
        return
    if isinstance(scheduler, torch.optim.lr_scheduler.ReduceLROnPlateau):
        scheduler.step(score)
    else:
        scheduler.step()


@dataclass
class _Progress:
    """What an interrupted run still reports, and where a resumed one goes on: `epoch` epochs are closed (trained,
    validated where planned, scheduled), and `epoch_steps` steps of the next one are taken."""

    history: list[dict[str, Any]] = field(default_factory=list)
    steps: int = 0
    samples: int = 0
    train_seconds: float = 0.0
    interrupted: bool = False
    epoch: int = 0
    epoch_steps: int = 0
    epoch_loss: float = 0.0  # the epoch in progress's summed loss and samples, where a resumed run goes on
    epoch_samples: int = 0
    resumed_at: list[int] = field(default_factory=list)

    @classmethod
    def from_record(cls, record: dict[str, Any]) -> _Progress:
        return cls(**{k: record[k] for k in ("history", "steps", "samples", "train_seconds", "epoch", "epoch_steps",
                                             "epoch_loss", "epoch_samples")},
                   resumed_at=[*record["resumed_at"], record["steps"]])


def train(
    arch: ArchConfig,
    data: DatasetSplits,
    *,
    train_cfg: TrainConfig,
    privacy: PrivacyConfig,
    device: torch.device | str | None = None,
    progress: bool = True,
    on_epoch: EpochCallback | None = None,
    on_plan: Callable[[PrivacyPlan], None] | None = None,
    catch_interrupt: bool = True,
    on_trained: Callable[[nn.Module], None] | None = None,
    steps: int | None = None,
    validations: int | None = None,
    resume: dict[str, Any] | None = None,
    keep_state: Callable[[dict[str, Any]], None] | None = None,
) -> dict[str, Any]:
    """Train `arch` on `data` with DP-SGD; return the result record (see README for its fields).

    `on_epoch` receives each epoch's record (a search uses it to report and prune); an
    exception it raises stops training and propagates.  `on_plan` receives the privacy plan
    (noise, sample rate, steps) before the first step touches the data.  Ctrl-C stops after the current
    step and still returns the record of what was finished (``interrupted: true``).  `on_trained` receives the
    model that was evaluated (the EMA copy where there is one), to keep its weights.  `steps` fixes the number of
    DP-SGD steps instead of ``epochs`` passes over the data, with ``epochs`` validation releases spread over them
    (a TAN simulation, :mod:`dpnas.search.fidelity`). `validations` releases that many validation scores, evenly
    spaced over the epochs and the last at the end, instead of one per epoch (a search's ``[fidelity]
    validations``); only those epochs are recorded and passed to `on_epoch`.

    `keep_state` receives the run's resume state (:mod:`dpnas.dp.resume`) after each epoch and when Ctrl-C stops
    the run; `resume` (such a state, loaded) continues that run where it stopped, as the same run. Ctrl-C and
    SIGTERM are held while a step is taken, so every stop falls between two whole steps.
    """
    device = check_device(device, what="device")
    data = data.to(device)
    plan = plan_privacy(privacy, dataset_size=len(data.train), batch_size=train_cfg.batch_size, epochs=train_cfg.epochs,
                        steps=steps, releases=validations)
    if train_cfg.schedule == "plateau" and len(data.val) == 0:
        # it would read the training loss, an exact function of the training records outside the accounting
        raise ConfigError("schedule: plateau reads a validation score every epoch, and the validation split is "
                          "empty; use val_fraction > 0 or another schedule")
    if train_cfg.schedule == "plateau" and plan.val_releases < plan.periods:
        raise ConfigError(f"schedule: plateau reads a validation score every epoch, and this run releases "
                          f"{plan.val_releases} of {plan.periods}; use another schedule")
    secret = privacy.private and not privacy.reproducible
    if resume is not None:  # refused before `on_plan`: a search's retry then plans and trains its own run
        check_plan(resume, plan)
        check_generators(resume, device_type=device.type, secret=secret)
    if on_plan is not None:
        on_plan(plan)

    torch.manual_seed(train_cfg.seed)
    model = build_model(arch, num_classes=data.num_classes, in_channels=data.in_channels, image_size=data.image_size)
    if resume is not None:
        model.load_state_dict(resume["model"])
    model.to(device)
    ema = AveragedModel(model, multi_avg_fn=get_ema_multi_avg_fn(train_cfg.ema_decay)) if train_cfg.ema_decay else None
    optimizer = make_optimizer(model, train_cfg)
    scheduler = make_scheduler(optimizer, train_cfg)
    accountant = make_accountant(privacy)
    sampling_seed, noise_seed, val_noise_seed = release_seeds(train_cfg.seed, privacy)
    generators = {
        "sampling": torch.Generator(device).manual_seed(sampling_seed),
        "augment": torch.Generator(device).manual_seed(train_cfg.seed + 2),  # may stay seeded: not the mechanism
        "noise": torch.Generator(device).manual_seed(noise_seed),
        "val_noise": torch.Generator(device).manual_seed(val_noise_seed),
    }
    del sampling_seed, noise_seed, val_noise_seed  # never stored, returned or logged
    state = _Progress()
    if resume is not None:
        if ema is not None:
            ema.load_state_dict(resume["ema"])
        optimizer.load_state_dict(resume["optimizer"])
        if scheduler is not None:
            scheduler.load_state_dict(resume["scheduler"])
        if privacy.private:
            accountant.load_state_dict(resume["accountant"])
        restore_generators(generators, resume["generators"], stored_on=resume["device_type"],
                           device_type=device.type, secret=secret)
        state = _Progress.from_record(resume["progress"])
    engine = DPSGDEngine(
        model,
        optimizer,
        plan=plan,
        max_grad_norm=privacy.max_grad_norm,
        private=privacy.private,
        accountant=accountant,
        physical_batch_size=train_cfg.physical_batch_size,
        aug_multiplicity=train_cfg.aug_multiplicity,
        noise_generator=generators["noise"],
        autocast=train_cfg.amp,
        channels_last=train_cfg.channels_last,
        per_sample=train_cfg.per_sample,
    )
    augment = (lambda x: random_crop_flip(x, generator=generators["augment"])) if train_cfg.augment else None
    eval_model = ema.module if ema is not None else model
    # Without a gradient a pass keeps a few activations alive, not all of them as training does, so twice the
    # physical batch fits wherever training fits; fewer, larger batches make each validation pass 5-15 % cheaper.
    eval_batch = max(2 * train_cfg.physical_batch_size, 256)

    per_epoch = steps_per_epoch(plan)
    validated = plan.validated_periods()

    def resume_state(*, stopped: bool) -> dict[str, Any]:
        return {
            "stopped": stopped,  # written as the run stops (a keeper may write the epochs' states less often)
            "plan": plan_record(plan),
            # the epoch in progress: its loss and sample count so far (host syncs only where the state is kept)
            "progress": progress_record(epoch_loss=float(loss_sum), epoch_samples=int(epoch_samples),
                                        **{k: getattr(state, k) for k in ("epoch", "epoch_steps", "steps", "samples",
                                                                           "train_seconds", "history", "resumed_at")}),
            "model": model.state_dict(),
            "ema": ema.state_dict() if ema is not None else None,
            "optimizer": optimizer.state_dict(),
            "scheduler": scheduler.state_dict() if scheduler is not None else None,
            "accountant": accountant.state_dict(),
            "generators": generator_states(generators, secret=secret),
            "device_type": device.type,
        }

    bar = tqdm(total=plan.steps, initial=state.steps, disable=not progress, unit="step", dynamic_ncols=True,
               leave=True)
    loss_sum = torch.full((), state.epoch_loss, device=device)
    epoch_samples = torch.full((), state.epoch_samples, device=device, dtype=torch.long)
    try:
        # `or state.epoch_steps`: a run stopped after its last step and before that epoch closed still closes it
        while state.steps < plan.steps or state.epoch_steps:
            epoch = state.epoch + 1
            epoch_start = time.perf_counter()
            record = None
            # Held, to take effect between two steps: a stop inside one would leave the model, the optimiser and
            # the accountant apart. Released before `on_epoch`, whose storage writes must stay interruptible.
            with interrupts_held() as stop_here:
                for _ in range(min(per_epoch - state.epoch_steps, plan.steps - state.steps)):
                    idx = poisson_sample(len(data.train), plan.sample_rate, generator=generators["sampling"],
                                         device=device)
                    images = normalise(data.train.images[idx], data.mean, data.std)
                    loss_sum += engine.step(images, data.train.labels[idx], augment=augment)
                    epoch_samples += len(idx)
                    if ema is not None:
                        ema.update_parameters(model)
                    state.steps += 1
                    state.epoch_steps += 1
                    bar.update(1)
                    stop_here()
                n_samples = int(epoch_samples)  # one host sync per epoch
                state.samples += n_samples
                state.train_seconds += time.perf_counter() - epoch_start
                train_loss = float(loss_sum) / max(n_samples, 1)
                # Judged from the parameters, DP-SGD's private output, not from the training loss: an exact
                # statistic of the batches, whose finiteness would be released by the trial a search prunes for it.
                # (A loss that is not finite makes the clipped, noised update, and so the parameters, not finite.)
                if not parameters_finite(model):
                    raise DivergedError(f"the model's parameters became NaN or infinite in epoch {epoch}")
                if epoch not in validated:  # a search's [fidelity] validations: no score released, none recorded
                    _step_scheduler(scheduler, math.nan)
                else:
                    # The validation score is released (history, pruner, plateau schedule, the objective): only its
                    # noisy version exists outside this block; the exact loss is kept only when the scores are
                    # exact anyway.
                    correct, val_loss_sum = count_correct(eval_model, data.val, data, batch_size=eval_batch)
                    val_accuracy = noisy_accuracy(correct, len(data.val), plan.val_noise,
                                                  generator=generators["val_noise"])
                    exact = plan.val_noise == 0 and len(data.val)
                    val_loss = float(val_loss_sum) / len(data.val) if exact else math.nan
                    del correct, val_loss_sum
                    record = {
                        "epoch": epoch,
                        "steps": state.steps,
                        "train_loss": train_loss,
                        "val_accuracy": val_accuracy,
                        "val_loss": val_loss,
                        "epsilon_spent": epsilon_spent(accountant, privacy.delta) if privacy.private else math.inf,
                        "lr": optimizer.param_groups[0]["lr"],
                        "seconds": time.perf_counter() - epoch_start,
                    }
                    state.history.append(record)
                    _step_scheduler(scheduler, val_accuracy)
                state.epoch, state.epoch_steps = epoch, 0
                loss_sum.zero_(), epoch_samples.zero_()
                # Kept before the score is shown or reported: a run killed after a release and resumed from an
                # older state would release that epoch's score again, from another branch of the run.
                if keep_state is not None:
                    keep_state(resume_state(stopped=False))
                if record is not None:
                    bar.set_postfix(epoch=epoch, loss=f"{train_loss:.3f}", val_acc=f"{record['val_accuracy']:.3f}",
                                    eps=f"{record['epsilon_spent']:.2f}")
            if record is not None and on_epoch is not None:
                on_epoch(record)
    except KeyboardInterrupt:
        state.interrupted = True
        if keep_state is not None:
            with interrupts_held():
                keep_state(resume_state(stopped=True))
        if not catch_interrupt:
            raise
    finally:
        bar.close()

    test_accuracy, test_loss = evaluate(eval_model, data.test, data, batch_size=eval_batch)
    if on_trained is not None:
        on_trained(eval_model)
    last = state.history[-1] if state.history else {}
    return {
        "config": arch.to_dict(),
        "train_config": train_cfg.to_dict(),
        "dataset": data.name,
        "synthetic_data": data.synthetic,
        "train_size": len(data.train),
        "val_size": len(data.val),
        "test_size": len(data.test),
        "private": privacy.private,
        "epsilon_target": privacy.epsilon,
        "epsilon_spent": epsilon_spent(accountant, privacy.delta) if privacy.private else math.inf,
        "delta": privacy.delta,
        "accountant": privacy.accountant,
        # false: the batches and noise came from secret seeds; true: `seed` regenerates them (retrain before release)
        "reproducible": privacy.reproducible or not privacy.private,
        "noise_multiplier": plan.noise_multiplier,
        "val_noise": plan.val_noise,
        "val_releases": plan.val_releases,
        # what the noisy validation scores released so far cost the validation records
        "validation_epsilon": (validation_epsilon(plan.val_noise, len(state.history), privacy.delta)
                               if len(data.val) else 0.0),
        "sample_rate": plan.sample_rate,
        "expected_batch_size": plan.expected_batch_size,
        "steps": state.steps,
        "planned_steps": plan.steps,
        "max_grad_norm": privacy.max_grad_norm if privacy.private else math.inf,
        "params": count_parameters(model),
        "val_accuracy": last.get("val_accuracy", math.nan),
        "best_val_accuracy": max((h["val_accuracy"] for h in state.history), default=math.nan),
        "test_accuracy": test_accuracy,
        "test_loss": test_loss,
        "samples_per_second": state.samples / state.train_seconds if state.train_seconds else 0.0,
        "wall_seconds": state.train_seconds,
        "device": str(device),
        "per_sample": engine.per_sample_path,
        "per_sample_methods": engine.clipper.method_counts() if engine.clipper is not None else {},
        "interrupted": state.interrupted,
        "resumed_at_steps": state.resumed_at,
        "history": state.history,
        "not_covered": not_covered(privacy, plan, data, validated=len(state.history)),
    }


def not_covered(privacy: PrivacyConfig, plan: PrivacyPlan, data: DatasetSplits, *, validated: int) -> list[str]:
    """The statistics in a run's result that its epsilon does not cover, in words: the result is the data holder's
    log; what may be released is the model and the noisy validation scores."""
    if not privacy.private:
        return ["everything in it: the run is not private"]
    lines = [f"history's train_loss: each epoch's exact mean loss over its sampled batches of the "
             f"{len(data.train):,} training records"]
    if plan.val_noise == 0 and validated and len(data.val):
        lines.append(f"val_accuracy and val_loss: exact scores of the {len(data.val):,} validation records "
                     "(val_noise = 0)")
    if len(data.test):
        lines.append(f"test_accuracy and test_loss: exact scores of the {len(data.test):,} test records")
    return lines


def check_result_privacy(result: dict[str, Any]) -> None:
    """A private result must not have spent more than its budget (guards against accounting bugs)."""
    if result["private"] and result["epsilon_spent"] > result["epsilon_target"] * (1 + 1e-9):
        raise ConfigError(
            f"epsilon spent {result['epsilon_spent']:.4f} exceeds the target {result['epsilon_target']}"
        )
