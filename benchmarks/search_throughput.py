"""Search throughput: trials per hour of `dpnas search` with several worker processes sharing one device.

A short-budget version of studies/smoothnet_cifar10.toml (its privacy budget, recipe and base architecture;
`--epochs` per trial; a grid of small SmoothNet points; no pruning) runs once per arm through dpnas's own
`dpnas.search.runner.search(spec, workers=N, device=...)`: workers=1 takes the trials one after another, workers=N
starts N processes that share the device. Every arm runs the same trials (the first `--trials` points of the
same grid) in a fresh journal in a temp dir, in a fresh Python process of its own (so no arm inherits another's
caches: the tuned per-sample methods, the noise calibration). Wall time is the whole search call, as a user waits
for it: worker start-up and data loading included. Axes of the source study outside the grid are fixed at the
middle of their range (the geometric middle of a log range) or their first choice.

`--baseline` adds the arm a user would write without dpnas: the same trials (the sequential arm's configs, each at
the ε its dpnas trial was given) trained one after another by a plain loop: Opacus's Poisson DataLoader over host
memory, at the dpnas trial's sample rate B / n and round(n / B) steps an epoch (Opacus's own loader from a
DataLoader of batch B would take ceil(n / B) steps, more work for the same trial), its noise for that ε from
Opacus's `get_noise_multiplier` (what `make_private_with_epsilon` calls), `make_private` with hooks, fp32, exact
validation accuracy each epoch. Both report the mean test accuracy of their trials, so that speed is compared at
equal accuracy, and their steps; "mean_trial_s" is each side's training batches alone.

`--floor` adds what these trials cost without privacy, two ways. The non-private floor: the sequential arm's
trials by dpnas's own training loop at epsilon = inf (no per-sample gradients, clipping or noise; exact validation
scores), one after another in one process, without Optuna or storage: the model's forward, backward and optimizer
steps at the same batch sizes, with the same validation and test passes. And the non-private search: the same
study at epsilon = inf, run by `dpnas search` with the largest `--workers` count. A DP step can undercut a
non-private one only by the few percent that skipping the batch weight gradients saves, so floor / user loop (in
trials per hour) is about the most that any private search of these trials can gain over the user loop on this
machine, and non-private search / user loop the most that dpnas's search can, however cheap its privacy gets.
The table's "start s" is how long after the call its first trial started, "end s" how long the call took to
return after its last trial ended. Prints a table and writes JSON (compare the ratio, measured in the same run, not absolute numbers across machines).

    uv run python benchmarks/search_throughput.py --trials 6 --epochs 1 --workers 1,2
    uv run python benchmarks/search_throughput.py --study studies/quickstart.toml --dataset digits --epochs 8 \
        --trials 6 --workers 1,2 --baseline                  # at the quickstart's 16 px (--image-size 32: as before)
    uv run python benchmarks/search_throughput.py --study studies/quickstart.toml --dataset digits --epochs 8 \
        --trials 6 --workers 1,2 --baseline --floor          # and the ceiling: floor / user loop
    uv run python benchmarks/search_throughput.py --device cuda --synthetic-size 50000 --trials 16 --workers 1,2,4
    uv run python benchmarks/search_throughput.py --study studies/quickstart.toml --dataset digits --storage sqlite
    uv run python benchmarks/search_throughput.py --study studies/quickstart.toml --dataset digits --bar  # as on a tty
    uv run python benchmarks/search_throughput.py --dataset cifar10 --data-dir ~/data --device cuda --workers 1,4
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import json
import math
import os
import platform
import shlex
import subprocess
import sys
import tempfile
import time
import tomllib
from pathlib import Path

import optuna
import torch
from optuna.trial import TrialState

from dpnas import __version__ as dpnas_version
from dpnas.data.datasets import DEFAULT_SYNTHETIC_SIZE, load_dataset
from dpnas.dp.recipe_file import toml_value
from dpnas.results import writable_file, write_json
from dpnas.search.runner import search
from dpnas.search.study_file import load_study_file

DEFAULT_STUDY = Path(__file__).resolve().parents[1] / "studies" / "smoothnet_cifar10.toml"
# Two components of the study's space at its smallest widths and depths: cheap trials that still differ.
GRID_COMPONENTS = {"activation": ["selu", "relu"], "pool": ["max_smooth", "none"]}


def positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a whole number, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be >= 1, got {value}")
    return value


def positive_list(kind):  # noqa: ANN001, ANN201
    """A comma-separated list of positive numbers, e.g. "1,2,4"."""

    def parse(text: str) -> list:
        try:
            values = [kind(part) for part in text.split(",") if part.strip()]
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected comma-separated numbers, got {text!r}") from None
        if not values or any(v <= 0 for v in values):
            raise argparse.ArgumentTypeError(f"expected positive numbers, got {text!r}")
        return list(dict.fromkeys(values))  # in order, without repeats

    return parse


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--study", type=Path, default=DEFAULT_STUDY, help="study file to derive the short study from")
    parser.add_argument("--trials", type=positive_int, default=8, help="trials per arm (default 8)")
    parser.add_argument("--epochs", type=positive_int, default=1, help="epochs per trial (default 1)")
    parser.add_argument("--workers", type=positive_list(int), default=[1, 2],
                        help="worker counts to compare, e.g. 1,2,4 (the 1-worker arm always runs, first)")
    parser.add_argument("--widths", type=positive_list(float), default=[1.0, 2.0], help="grid of width multipliers")
    parser.add_argument("--depths", type=positive_list(float), default=[1.0, 2.0], help="grid of depth multipliers")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--dataset", choices=("synthetic", "cifar10", "digits"), default="synthetic")
    parser.add_argument("--data-dir", help="where cifar10 is (or is downloaded to)")
    parser.add_argument("--synthetic-size", type=positive_int,
                        help=f"samples of the synthetic CIFAR-shaped data (default {DEFAULT_SYNTHETIC_SIZE}; CIFAR-10 has 50000)")
    parser.add_argument("--image-size", type=positive_int, help="resize images (default: the study's own, else the "
                                                                "dataset's default)")
    parser.add_argument("--baseline", action="store_true",
                        help="add the arm a user would write: a plain Opacus loop over the sequential arm's trials")
    parser.add_argument("--floor", action="store_true",
                        help="add the non-private floor: the sequential arm's trials by dpnas's loop without privacy")
    parser.add_argument("--bar", action="store_true",
                        help="the dpnas arms draw the search's progress bar (to stderr), as on a terminal")
    parser.add_argument("--storage", choices=("journal", "sqlite"), default="journal",
                        help="each arm's fresh storage: a journal file (default) or an SQLite file (heartbeats)")
    parser.add_argument("--json", type=writable_file, default=Path("benchmarks/search_throughput.json"))
    args = parser.parse_args(argv)
    if args.data_dir and args.dataset != "cifar10":
        parser.error("--data-dir is only for --dataset cifar10")
    if args.synthetic_size and args.dataset != "synthetic":
        parser.error("--synthetic-size is only for --dataset synthetic")
    if args.dataset == "synthetic":
        args.synthetic_size = args.synthetic_size or DEFAULT_SYNTHETIC_SIZE
    grid_size = math.prod(len(v) for v in GRID_COMPONENTS.values()) * len(args.widths) * len(args.depths)
    if args.trials > grid_size:
        # beyond the grid Optuna re-runs random points, and the arms would no longer run the same trials
        parser.error(f"--trials {args.trials} exceeds the grid of {grid_size} points; give more --widths or --depths")
    if not args.study.is_file():
        parser.error(f"--study {args.study}: no such file")
    args.workers = [1] + [w for w in args.workers if w != 1]  # the sequential baseline first
    return args


def derive_study(args: argparse.Namespace, directory: Path) -> Path:
    """The short-budget study file: the source study's privacy and recipe, a small fixed grid, no pruning."""
    document = tomllib.loads(args.study.read_text(encoding="utf-8-sig"))
    study = document.setdefault("study", {})
    study.update(
        name=f"{study.get('name', args.study.stem)}_throughput",
        description=f"short-budget copy of {args.study.name} for benchmarks/search_throughput.py",
        # grid: trial k is grid point k in every arm; no pruning: a trial's cost must not depend on which
        # trials happened to finish before it (that order differs between arms)
        sampler="grid", pruner="none", n_trials=args.trials,
    )
    data = document.setdefault("data", {})
    data["dataset"] = args.dataset
    for key in ("data_dir", "synthetic_size"):  # the study's image_size stays, unless --image-size overrides it
        data.pop(key, None)
    if args.dataset == "cifar10" and args.data_dir:
        data["data_dir"] = str(Path(args.data_dir).expanduser())
    if args.dataset == "synthetic":
        data["synthetic_size"] = args.synthetic_size
    if args.image_size:
        data["image_size"] = args.image_size
    document.setdefault("train", {})["epochs"] = args.epochs
    grid = {**GRID_COMPONENTS, "width": args.widths, "depth": args.depths}
    for name, axis in document.get("search", {}).items():
        if name not in grid:  # the study's other axes, fixed: e.g. the quickstart's learning rate
            document.setdefault(_section_of(name), {})[name] = fixed_value(axis)
    document["search"] = grid
    path = directory / "study.toml"
    path.write_text(to_toml(document))
    load_study_file(path)  # checked here, with the file's own error messages, before any arm starts
    return path


def derive_nonprivate_study(study_path: Path) -> Path:
    """The derived study at epsilon = inf: the same grid, recipe and data, trained without privacy."""
    document = tomllib.loads(study_path.read_text(encoding="utf-8-sig"))
    document["study"]["name"] += "_nonprivate"
    privacy = {key: value for key, value in document.get("privacy", {}).items()
               if key not in ("epsilon", "total_epsilon", "noise_multiplier", "val_noise")}
    document["privacy"] = privacy | {"epsilon": math.inf}
    path = study_path.with_name("study_nonprivate.toml")
    path.write_text(to_toml(document))
    load_study_file(path)
    return path


def fixed_value(axis):  # noqa: ANN001, ANN201
    """One value for an axis left out of the grid: its first choice, or the middle of its range."""
    if isinstance(axis, list):
        return axis[0]
    low, high = axis["low"], axis["high"]
    middle = math.sqrt(low * high) if axis.get("log") else (low + high) / 2
    if axis.get("step"):
        middle = low + round((middle - low) / axis["step"]) * axis["step"]
    return type(low)(middle) if isinstance(low, int) and isinstance(high, int) else float(f"{middle:.4g}")


def _section_of(field: str) -> str:
    from dpnas.arch.space import ArchConfig
    from dpnas.dp.config import PrivacyConfig, TrainConfig

    for section, cls in (("arch", ArchConfig), ("train", TrainConfig), ("privacy", PrivacyConfig)):
        if field in cls.__dataclass_fields__:
            return section
    raise ValueError(f"search.{field}: not a field of any config")


def to_toml(document: dict) -> str:
    lines = []
    for section, table in document.items():
        lines.append(f"[{section}]")
        for key, value in table.items():
            if isinstance(value, dict):
                raise ValueError(f"[{section}] {key}: tables are not written here")
            lines.append(f"{key} = {toml_value(value)}")
        lines.append("")
    return "\n".join(lines)


@contextlib.contextmanager
def stdout_to_stderr():
    """Trial lines go to stderr, with the progress, so that stdout holds only the table.

    At the file-descriptor level too: the spawned worker processes inherit fd 1 and print there.
    """
    sys.stdout.flush()
    saved = os.dup(1)
    os.dup2(2, 1)
    try:
        with contextlib.redirect_stdout(sys.stderr):
            yield
    finally:
        sys.stdout.flush()
        os.dup2(saved, 1)
        os.close(saved)


def in_fresh_process(arm: dict) -> dict:
    """Run one arm (see arm_main) in a new Python process: nothing one arm cached can speed up another."""
    result = subprocess.run([sys.executable, str(Path(__file__).resolve()), "--run-arm", json.dumps(arm)],
                            stdout=subprocess.PIPE, text=True, check=False)
    if result.returncode != 0:
        raise RuntimeError(f"arm {arm} failed with exit status {result.returncode} (its output is above)")
    return json.loads(result.stdout.strip().splitlines()[-1])


def arm_main(arm: dict) -> dict:
    """The body of one arm's process: a dpnas search with `workers`, or the user loop over `trials`."""
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    if arm["kind"] == "user_loop":
        return run_user_loop(Path(arm["study"]), arm["trials"], arm["device"])
    if arm["kind"] == "floor":
        return run_floor(Path(arm["study"]), arm["trials"], arm["device"])
    if arm["kind"] == "nonprivate_search":
        row = run_arm(Path(arm["study"]), arm["workers"], arm["device"], arm.get("storage", "journal"),
                      bar=arm.get("bar", False))
        return row | {"arm": f"non-private search ({arm['workers']} worker{'s' if arm['workers'] > 1 else ''})"}
    return run_arm(Path(arm["study"]), arm["workers"], arm["device"], arm.get("storage", "journal"),
                   bar=arm.get("bar", False))


def run_user_loop(study_path: Path, trials: list[dict], device: str) -> dict:
    """The same trials, trained by the loop a user would write with Opacus alone (see the module docstring)."""
    from dpnas.arch.space import ArchConfig
    from dpnas.dp.config import PrivacyConfig, TrainConfig

    start = time.perf_counter()
    spec = load_study_file(study_path)
    data = load_dataset(spec.dataset, data_dir=spec.data_dir, val_fraction=spec.val_fraction, seed=spec.train.seed,
                        image_size=spec.image_size, synthetic_size=spec.synthetic_size, progress=False)
    results = []
    for trial in trials:
        configs = (ArchConfig.from_dict(trial["config"]), TrainConfig.from_dict(trial["train_config"]),
                   PrivacyConfig.from_dict(trial["privacy_config"]))
        with stdout_to_stderr():
            results.append(user_loop_trial(configs, data, device))
            print(f"user loop: trial {len(results) - 1} done: val accuracy {results[-1]['val_accuracy']:.4f}, "
                  f"test accuracy {results[-1]['test_accuracy']:.4f}, eps {results[-1]['epsilon']:.2f}", flush=True)
    wall = time.perf_counter() - start
    return {"arm": "user loop (Opacus)", "workers": 1, "trials": len(results), "states": {"COMPLETE": len(results)},
            "wall_s": wall, "trials_per_hour": len(results) / wall * 3600,
            # the training batches alone, like the dpnas arms' (their trials' wall_seconds); the whole trial apart
            "mean_trial_s": sum(r["train_seconds"] for r in results) / len(results) if results else None,
            "mean_whole_trial_s": sum(r["seconds"] for r in results) / len(results) if results else None,
            "mean_test_accuracy": sum(r["test_accuracy"] for r in results) / len(results) if results else None,
            "epsilon": [r["epsilon"] for r in results], "steps": [r["steps"] for r in results],
            "configs": sorted(json.dumps(t["params"], sort_keys=True) for t in trials)}


def run_floor(study_path: Path, trials: list[dict], device: str) -> dict:
    """The same trials by dpnas's training loop without privacy: the compute no private search of them avoids."""
    import dataclasses

    from dpnas.arch.space import ArchConfig
    from dpnas.dp.config import PrivacyConfig, TrainConfig
    from dpnas.dp.train import train

    start = time.perf_counter()  # from the same point as the user loop: the study file and the data included
    spec = load_study_file(study_path)
    data = load_dataset(spec.dataset, data_dir=spec.data_dir, val_fraction=spec.val_fraction, seed=spec.train.seed,
                        image_size=spec.image_size, synthetic_size=spec.synthetic_size, progress=False)
    results = []
    for trial in trials:
        # epsilon = inf: no per-sample gradients, clipping or noise, exact validation scores (val_noise "auto" is 0)
        privacy = dataclasses.replace(PrivacyConfig.from_dict(trial["privacy_config"]), epsilon=math.inf,
                                      noise_multiplier=0.0, val_noise="auto")
        result = train(ArchConfig.from_dict(trial["config"]), data, train_cfg=TrainConfig.from_dict(trial["train_config"]),
                       privacy=privacy, device=device, progress=False)
        results.append(result)
    wall = time.perf_counter() - start
    return {"arm": "non-private floor", "workers": 1, "trials": len(results), "states": {"COMPLETE": len(results)},
            "wall_s": wall, "trials_per_hour": len(results) / wall * 3600,
            "mean_trial_s": sum(r["wall_seconds"] for r in results) / len(results) if results else None,
            "mean_test_accuracy": sum(r["test_accuracy"] for r in results) / len(results) if results else None,
            "steps": [r["steps"] for r in results], "private": [r["private"] for r in results],
            "configs": sorted(json.dumps(t["params"], sort_keys=True) for t in trials)}


def user_loop_trial(configs, data, device: str) -> dict:  # noqa: ANN001
    """One trial as a user writes it with Opacus: its Poisson DataLoader, make_private at the ε's noise, hooks,
    fp32, exact scores; the dpnas trial's sample rate and steps."""
    import warnings

    import torch.nn.functional as F
    from opacus import PrivacyEngine
    from opacus.accountants.utils import get_noise_multiplier
    from opacus.data_loader import DPDataLoader
    from opacus.utils.batch_memory_manager import BatchMemoryManager
    from torch.utils.data import TensorDataset

    from dpnas.arch.models import build_model
    from dpnas.data.datasets import normalise
    from dpnas.dp.train import make_optimizer, make_scheduler

    warnings.filterwarnings("ignore")  # Opacus's notes on secure_mode and the RNG
    arch, train_cfg, privacy = configs
    start = time.perf_counter()
    torch.manual_seed(train_cfg.seed)
    model = build_model(arch, num_classes=data.num_classes, in_channels=data.in_channels,
                        image_size=data.image_size).to(device)
    optimizer = make_optimizer(model, train_cfg)
    train_set = TensorDataset(normalise(data.train.images, data.mean, data.std), data.train.labels)
    # The dpnas trial's batches: sample rate B / n, round(n / B) of them an epoch (dpnas.dp.privacy.plan_privacy).
    # make_private_with_epsilon over DataLoader(batch_size=B) would sample at 1 / ceil(n / B), ceil(n / B) times an
    # epoch: on the quickstart's 1,152 records 5 steps of 230 against dpnas's 4 of 256, 25 % more steps and 12.5 %
    # more samples for the same trial. The same calibration (Opacus's, for this rate and step count) and accounting.
    sample_rate = train_cfg.batch_size / len(train_set)
    epoch_steps = max(1, round(1 / sample_rate))
    loader = DPDataLoader(train_set, sample_rate=sample_rate)
    loader.batch_sampler.steps = epoch_steps
    engine = PrivacyEngine(accountant="rdp")
    noise = get_noise_multiplier(target_epsilon=privacy.epsilon, target_delta=privacy.delta, sample_rate=sample_rate,
                                 steps=train_cfg.epochs * epoch_steps, accountant="rdp")
    model, optimizer, loader = engine.make_private(
        module=model, optimizer=optimizer, data_loader=loader, noise_multiplier=noise,
        max_grad_norm=privacy.max_grad_norm, poisson_sampling=False,  # the loader above is Poisson already
        grad_sample_mode="hooks")
    # make_private reads the rate as 1 / len(loader): average over B and account at B / n, as dpnas does
    optimizer.expected_batch_size = train_cfg.batch_size
    optimizer.attach_step_hook(engine.accountant.get_optimizer_hook_fn(sample_rate=sample_rate))
    scheduler = make_scheduler(optimizer, train_cfg)

    def accuracy(split) -> float:  # noqa: ANN001
        model.eval()
        with torch.no_grad():
            x = normalise(split.images, data.mean, data.std).to(device)
            correct = (model(x).argmax(1) == split.labels.to(device)).sum().item()
        model.train()
        return correct / len(split)

    val = float("nan")
    steps = 0
    train_seconds = 0.0  # the batches alone, as dpnas's trials' wall_seconds (no calibration or evaluation)
    for _ in range(train_cfg.epochs):
        epoch_start = time.perf_counter()
        with BatchMemoryManager(data_loader=loader, max_physical_batch_size=train_cfg.physical_batch_size,
                                optimizer=optimizer) as batches:
            for x, y in batches:
                optimizer.zero_grad()
                F.cross_entropy(model(x.to(device)), y.to(device)).backward()
                optimizer.step()
                steps += not optimizer._is_last_step_skipped  # a logical step, not a physical chunk
        train_seconds += time.perf_counter() - epoch_start
        val = accuracy(data.val)
        if isinstance(scheduler, torch.optim.lr_scheduler.ReduceLROnPlateau):
            scheduler.step(val)
        elif scheduler is not None:
            scheduler.step()
    return {"val_accuracy": val, "test_accuracy": accuracy(data.test), "epsilon": engine.get_epsilon(privacy.delta),
            "steps": steps, "sample_rate": sample_rate, "train_seconds": train_seconds,
            "seconds": time.perf_counter() - start}


def run_arm(study_path: Path, workers: int, device: str, storage: str = "journal", bar: bool = False) -> dict:
    spec = load_study_file(study_path)
    with tempfile.TemporaryDirectory(prefix=f"search-throughput-w{workers}-") as directory:
        # a fresh storage: no trial of another arm is reused
        url = f"sqlite:///{Path(directory) / 'study.db'}" if storage == "sqlite" else str(Path(directory) / "study.journal")
        started_at, start = datetime.datetime.now(), time.perf_counter()
        with stdout_to_stderr():
            study = search(spec, storage_url=url, workers=workers, device=device, progress=True,
                           progress_bar=bar or None)
        wall = time.perf_counter() - start
        trials = study.get_trials(deepcopy=False)
    ran = [t for t in trials if t.datetime_start is not None and t.datetime_complete is not None]
    complete = [t for t in trials if t.state == TrialState.COMPLETE]
    states = {s.name: sum(t.state == s for t in trials) for s in TrialState if any(t.state == s for t in trials)}
    return {
        "arm": "sequential" if workers == 1 else f"{workers} workers",
        "workers": workers,
        "trials": len(complete),
        "states": states,
        "wall_s": wall,
        # the search's start (checks, data, calibration, workers) and its end after the last trial (idle workers,
        # the parent noticing they exited): Optuna's trial times, against the call's
        "first_trial_after_s": min((t.datetime_start - started_at).total_seconds() for t in ran) if ran else None,
        "after_last_trial_s": wall - max((t.datetime_complete - started_at).total_seconds() for t in ran)
        if ran else None,
        "trials_per_hour": len(complete) / wall * 3600,
        # the busy time inside the trials, without start-up, data loading and waiting for the study lock
        "mean_trial_s": sum(t.user_attrs["wall_seconds"] for t in complete) / len(complete) if complete else None,
        "mean_test_accuracy": sum(t.user_attrs["test_accuracy"] for t in complete) / len(complete) if complete else None,
        "configs": sorted(json.dumps(t.params, sort_keys=True) for t in trials),
        "steps": [t.user_attrs["steps"] for t in sorted(complete, key=lambda t: t.number)],
        # what the user loop needs to train the same trials at the same per-run epsilon
        "trial_configs": [{key: t.user_attrs[key] for key in ("config", "train_config", "privacy_config")}
                          | {"params": t.params} for t in sorted(complete, key=lambda t: t.number)],
    }


def device_info(device: str) -> dict:
    info = {"device": device, "cpu_count": os.cpu_count()}
    if device.startswith("cuda") and torch.cuda.is_available():
        info["device_name"] = torch.cuda.get_device_name(torch.device(device))
    else:
        info["device_name"] = cpu_name()
    return info


def cpu_name() -> str:
    # platform.processor() is empty on many Linux systems; /proc/cpuinfo names the model
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    return platform.processor() or platform.machine()


def main(argv: list[str] | None = None) -> dict:
    argv_list = sys.argv[1:] if argv is None else argv
    if argv_list[:1] == ["--run-arm"]:  # inside an arm's own process (see in_fresh_process)
        print(json.dumps(arm_main(json.loads(argv_list[1]))))
        return {}
    args = parse_args(argv)
    optuna.logging.set_verbosity(optuna.logging.WARNING)  # dpnas prints one line per trial already
    if args.dataset == "cifar10":
        # once, here: a missing download fails with one message instead of in every worker, and the
        # workers do not race to download into the same directory
        load_dataset("cifar10", data_dir=args.data_dir, image_size=args.image_size, progress=False)
    rows = []
    argv = sys.argv[1:] if argv is None else argv
    with tempfile.TemporaryDirectory(prefix="search-throughput-") as directory:
        study_path = derive_study(args, Path(directory))
        study_text = study_path.read_text()

        def save() -> dict:  # after every arm: a run stopped by a time limit (a GPU session's) keeps its arms
            return write_result(args, argv, study_text, rows)

        for index, workers in enumerate(args.workers, 1):
            print(f"[{index}/{len(args.workers)}] {workers} worker(s) on {args.device}: {args.trials} trials of "
                  f"{args.epochs} epoch(s), {args.dataset} data", file=sys.stderr, flush=True)
            row = in_fresh_process({"kind": "dpnas", "study": str(study_path), "workers": workers,
                                    "device": args.device, "storage": args.storage, "bar": args.bar})
            print(f"[{index}/{len(args.workers)}] {row['trials']} trials in {row['wall_s']:.1f} s",
                  file=sys.stderr, flush=True)
            rows.append(row)
            save()
        if args.baseline:
            print(f"[baseline] the user loop (Opacus) on {args.device}: the sequential arm's {rows[0]['trials']} "
                  "trials", file=sys.stderr, flush=True)
            rows.append(in_fresh_process({"kind": "user_loop", "study": str(study_path),
                                          "trials": rows[0]["trial_configs"], "device": args.device}))
            save()
        if args.floor:
            print(f"[floor] the same {rows[0]['trials']} trials without privacy (dpnas's loop, epsilon = inf) on "
                  f"{args.device}", file=sys.stderr, flush=True)
            rows.append(in_fresh_process({"kind": "floor", "study": str(study_path),
                                          "trials": rows[0]["trial_configs"], "device": args.device}))
            save()
            workers = max(args.workers)
            print(f"[floor] the same study without privacy (epsilon = inf), {workers} worker(s) on {args.device}",
                  file=sys.stderr, flush=True)
            rows.append(in_fresh_process({"kind": "nonprivate_search", "study": str(derive_nonprivate_study(study_path)),
                                          "workers": workers, "device": args.device, "storage": args.storage,
                                          "bar": args.bar}))
        result = save()

    print(f"{args.trials} trials x {args.epochs} epoch(s), {args.dataset} data, device {args.device}")
    print(f"{'arm':<30} {'workers':>7} {'trials':>6} {'wall s':>8} {'start s':>7} {'end s':>6} {'trials/hour':>11} "
          f"{'x sequential':>12} {'test acc':>8}")
    for row in rows:
        ratio = f"{row['x_sequential']:.2f}" if row["x_sequential"] is not None else "-"
        accuracy = f"{row['mean_test_accuracy']:.3f}" if row.get("mean_test_accuracy") is not None else "-"
        start, end = (f"{row[key]:.2f}" if row.get(key) is not None else "-"
                      for key in ("first_trial_after_s", "after_last_trial_s"))
        print(f"{row['arm']:<30} {row['workers']:>7} {row['trials']:>6} {row['wall_s']:>8.1f} {start:>7} {end:>6} "
              f"{row['trials_per_hour']:>11.1f} {ratio:>12} {accuracy:>8}")
    private = rows[:len(args.workers)]
    best = max(private, key=lambda r: r["trials_per_hour"])
    user = next((row for row in rows if row["arm"] == "user loop (Opacus)"), None)
    floor = next((row for row in rows if row["arm"] == "non-private floor"), None)
    free = next((row for row in rows if row["arm"].startswith("non-private search")), None)
    if user and user["trials_per_hour"]:
        print(f"dpnas ({best['arm']}) / user loop: {best['trials_per_hour'] / user['trials_per_hour']:.2f}x the "
              f"trials per hour; sequential dpnas alone {rows[0]['trials_per_hour'] / user['trials_per_hour']:.2f}x")
    for bound, what in ((floor, "any private search of these trials"), (free, "dpnas's search, privacy aside")):
        if bound and bound["trials_per_hour"]:
            line = f"{bound['arm']} / dpnas ({best['arm']}): {bound['trials_per_hour'] / best['trials_per_hour']:.2f}x"
            if user and user["trials_per_hour"]:
                line += (f"; / user loop: {bound['trials_per_hour'] / user['trials_per_hour']:.2f}x (about the most "
                         f"{what} can gain over the user loop)")
            print(line)
    for row in rows:
        if row["trials"] != args.trials:
            print(f"warning: arm {row['arm']!r} completed {row['trials']} of {args.trials} trials "
                  f"(states {row['states']}); see the trial lines above", file=sys.stderr)
        if row["configs"] != rows[0]["configs"]:
            print(f"warning: arm {row['arm']!r} ran other trials than the sequential arm", file=sys.stderr)

    print(f"wrote {args.json}", file=sys.stderr)
    return result


def write_result(args: argparse.Namespace, argv: list[str], study_text: str, rows: list[dict]) -> dict:
    """The JSON of the arms run so far (each with its ratio to the sequential arm), written to --json."""
    sequential = rows[0]["trials_per_hour"]
    for row in rows:
        row["x_sequential"] = row["trials_per_hour"] / sequential if sequential else None
    result = {
        "benchmark": "search_throughput",
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "command": shlex.join(["python", "benchmarks/search_throughput.py", *argv]),
        "machine": {"host": platform.node(), "platform": platform.platform(), **device_info(args.device)},
        "torch": torch.__version__,
        "optuna": optuna.__version__,
        "dpnas": dpnas_version,
        "args": {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()},
        "study": study_text,
        "rows": rows,
    }
    write_json(args.json, result)
    return result


if __name__ == "__main__":
    outcome = main()
    if not outcome:  # an arm's process: its row is printed
        sys.exit(0)
    # a failed or missing trial makes the numbers incomparable: say so in the exit status too
    sys.exit(0 if all(row["trials"] == outcome["args"]["trials"] for row in outcome["rows"]) else 1)
