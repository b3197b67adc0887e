"""The `dpnas` command line: parsing and dispatch only; the work lives in the library.

Each command is a small class whose docstring is its help.  A user error (bad name,
bad value, unreadable file) prints one line and exits with status 2; a traceback means
a bug in dpnas.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import shlex
import sys
import warnings
from contextlib import contextmanager
from dataclasses import dataclass, replace
from pathlib import Path
from typing import TYPE_CHECKING

from dpnas.arch.describe import describe, format_description
from dpnas.arch.models import build_model, count_parameters
from dpnas.arch.registry import MODELS, get_arch
from dpnas.arch.space import ArchConfig, ConfigError, load_arch_file, parse_assignment
from dpnas.data.datasets import DATASETS, DataError, dataset_key
from dpnas.results import OutputError, json_safe

if TYPE_CHECKING:  # imported where used: `dpnas --help` stays quick
    from dpnas.dp.config import PrivacyConfig, TrainConfig
    from dpnas.dp.recipe_file import DataSettings


class UsageError(Exception):
    """A mistake in what the user asked for; printed as one line, exit status 2."""


def resolve_arch(name_or_file: str, assignments: list[str] | None = None) -> ArchConfig:
    """A registry name or a .json/.toml file, with `field=value` overrides applied."""
    changes = dict(parse_assignment(a) for a in assignments or [])
    return load_arch(name_or_file, changes)


def study_name(value: str) -> str:
    """--study-name: a name, never blank (an empty one would silently mean the file's default), and printable (a NUL
    or a zero-width space makes a name no one can type back)."""
    if not value.strip():
        raise argparse.ArgumentTypeError("must not be empty")
    if not value.isprintable():
        raise argparse.ArgumentTypeError(f"must be printable characters, got {value!r}")
    return value


def non_empty(value: str) -> str:
    """A file, directory or storage flag: never blank (an empty one would silently mean the default)."""
    if not value.strip():
        raise argparse.ArgumentTypeError("must not be empty")
    return value


def load_arch(name_or_file: str, changes: dict | None = None) -> ArchConfig:
    if name_or_file in MODELS:
        arch = MODELS[name_or_file].arch
    elif Path(name_or_file).suffix in (".json", ".toml") or Path(name_or_file).exists():
        arch = load_arch_file(name_or_file)
    else:
        arch = get_arch(name_or_file)  # raises with the list of known names
    return arch.replace(**changes) if changes else arch


class Command:
    name: str

    def add_arguments(self, parser: argparse.ArgumentParser) -> None:
        pass

    def run(self, args: argparse.Namespace) -> int:
        raise NotImplementedError


class Describe(Command):
    """Build an architecture and print its config, parameter count, output shape and Opacus compatibility."""

    name = "describe"

    def add_arguments(self, parser: argparse.ArgumentParser) -> None:
        parser.add_argument("arch", metavar="NAME_OR_CONFIG_FILE", help="a name from `dpnas models`, or a .json/.toml ArchConfig")
        parser.add_argument("--set", dest="assignments", action="append", default=[], metavar="FIELD=VALUE",
                            help="override one ArchConfig field (repeatable), e.g. --set activation=relu")
        parser.add_argument("--num-classes", type=int, default=10, metavar="N")
        parser.add_argument("--in-channels", type=int, metavar="C",
                            help="input channels (default: a recipe's dataset's, else 3)")
        parser.add_argument("--image-size", type=int, metavar="S",
                            help="square input size in pixels (default: a recipe's data size, else 32)")
        parser.add_argument("--json", action="store_true", help="print one JSON object instead of text")

    def run(self, args: argparse.Namespace) -> int:
        arch = resolve_arch(args.arch, args.assignments)
        from dpnas.bench import resolve_model

        shape = resolve_model(args.arch)  # a recipe's data shape, else 3 x 32 x 32
        channels, size = shape.in_channels, shape.image_size
        info = describe(arch, num_classes=args.num_classes,
                        in_channels=channels if args.in_channels is None else args.in_channels,
                        image_size=size if args.image_size is None else args.image_size)
        name = args.arch if args.arch in MODELS else None
        if args.json:
            print(json.dumps({"name": name, **info}, indent=2))
        else:
            print(format_description(info, name=name or args.arch))
        return 0 if info["dp_compatible"] else 1


class Models(Command):
    """List the named architectures with their parameter counts (10 classes, 32x32 inputs)."""

    name = "models"

    def add_arguments(self, parser: argparse.ArgumentParser) -> None:
        parser.add_argument("--num-classes", type=int, default=10, metavar="N")
        parser.add_argument("--json", action="store_true")

    def run(self, args: argparse.Namespace) -> int:
        rows = []
        for entry in MODELS.values():
            model = build_model(entry.arch, num_classes=args.num_classes, in_channels=3)
            rows.append({"name": entry.name, "params": count_parameters(model), "source": entry.source})
        if args.json:
            print(json.dumps(rows, indent=2))
            return 0
        width = max(len(r["name"]) for r in rows)
        print(f"{'name':<{width}}  {'params':>11}  source")
        for r in rows:
            print(f"{r['name']:<{width}}  {r['params']:>11,}  {r['source']}")
        return 0


# the flags that define a run: a resumed run takes them all from its state (--device and --quiet may change, and
# --out and --weights, which only say where it writes: a recorded folder now unwritable would leave a stopped run
# that nothing can continue)
_RUN_FLAGS = ("arch", "recipe", "dataset", "data_dir", "image_size", "epsilon", "no_dp", "delta", "max_grad_norm",
              "accountant", "epochs", "batch_size", "physical_batch_size", "lr", "seed", "val_fraction",
              "assignments")


class Train(Command):
    """Train an architecture with Opacus DP-SGD at a fixed privacy budget and write the result as JSON.

    The recipe (default: quick) gives every training and privacy setting; the flags below and
    --set FIELD=VALUE (any ArchConfig, TrainConfig or PrivacyConfig field) override it.
    Ctrl-C (or SIGTERM) stops after the current step and still writes what was finished; `dpnas train --resume
    FILE` continues the stopped run as the same run (its finished steps' ε is not spent again).
    """

    name = "train"

    def add_arguments(self, parser: argparse.ArgumentParser) -> None:
        from dpnas.dp.recipes import DEFAULT_RECIPE, RECIPES

        parser.add_argument("arch", metavar="ARCH_OR_RECIPE", nargs="?",
                            help="a name from `dpnas models`, a .json/.toml ArchConfig, or a recipe file from `dpnas best`")
        parser.add_argument("--recipe", help=f"one of: {', '.join(RECIPES)} (default: the recipe file's own settings, "
                                             f"else {DEFAULT_RECIPE})")
        parser.add_argument("--dataset", help=f"one of: {', '.join(DATASETS)} (default: the recipe file's, else digits)")
        parser.add_argument("--data-dir", metavar="DIR", help="where the dataset is (or is downloaded to)")
        parser.add_argument("--image-size", type=int, metavar="S", help="resize images to S x S")
        parser.add_argument("--epsilon", type=float, metavar="E", help="privacy budget; inf trains without DP")
        parser.add_argument("--no-dp", action="store_true", help="non-private training on the same code path (epsilon = inf)")
        parser.add_argument("--delta", type=float, metavar="D")
        parser.add_argument("--max-grad-norm", type=float, metavar="C", help="per-sample clip norm")
        parser.add_argument("--accountant", choices=["rdp", "prv"])
        parser.add_argument("--epochs", type=int, metavar="N")
        parser.add_argument("--batch-size", type=int, metavar="B", help="expected logical (Poisson) batch size")
        parser.add_argument("--physical-batch-size", type=int, metavar="P", help="largest chunk that goes through the model at once")
        parser.add_argument("--lr", type=float, metavar="LR")
        parser.add_argument("--seed", type=int, metavar="S")
        parser.add_argument("--val-fraction", type=float, metavar="F", help="share of the training set held out for validation")
        parser.add_argument("--set", dest="assignments", action="append", default=[], metavar="FIELD=VALUE",
                            help="override any ArchConfig/TrainConfig/PrivacyConfig field (repeatable)")
        parser.add_argument("--device", help="cpu, cuda, cuda:1, ... (default: cuda when available)")
        parser.add_argument("--out", metavar="FILE", type=non_empty, help="result JSON (default runs/train-ARCH-DATASET-TIME.json)")
        parser.add_argument("--weights", metavar="FILE", type=non_empty, help="also save the trained model as a dpnas checkpoint "
                                                              "(`dpnas evaluate` scores it)")
        parser.add_argument("--resume", metavar="FILE", type=non_empty,
                            help="continue a stopped run from the resume state it wrote (OUT.resume.pt, kept while it "
                                 "trains and removed when it finishes); takes every setting from it, where --out and "
                                 "--weights may move its outputs")
        parser.add_argument("--quiet", action="store_true", help="no progress bar")

    def run(self, args: argparse.Namespace) -> int:
        from dpnas.data.datasets import load_dataset
        from dpnas.dp.checkpoint import checkpoint_dict, save_checkpoint
        from dpnas.dp.interrupts import terminate_as_interrupt
        from dpnas.dp.memory import check_training_fits
        from dpnas.dp.resume import FileKeeper, ResumeError, data_fingerprint, load_state, resume_path
        from dpnas.dp.train import DivergedError, check_device, train
        from dpnas.results import check_distinct, check_writable, write_json

        # Everything that can be refused is, before the data is loaded: a run refused after training has spent ε
        device = check_device(args.device)
        resume = None
        if args.resume is not None:
            given = [{"arch": "ARCH_OR_RECIPE", "assignments": "--set"}.get(name, f"--{name.replace('_', '-')}")
                     for name in _RUN_FLAGS if getattr(args, name) not in (None, False, [])]
            if given:
                raise UsageError(f"--resume continues a run with the settings it started with: drop {', '.join(given)}")
            resume = load_state(args.resume)
            try:
                run = TrainRun.from_record(resume.get("run"))
            except ResumeError as err:
                raise ResumeError(f"{args.resume}: {err}") from None
            run = replace(run, out=Path(args.out) if args.out else run.out,
                          weights=Path(args.weights) if args.weights else run.weights)
            state_path = Path(args.resume)
        elif args.arch is None:
            raise UsageError("give ARCH_OR_RECIPE (a name from `dpnas models`, an ArchConfig or a recipe file), or "
                             "--resume FILE to continue a stopped run")
        else:
            run = TrainRun.from_args(args)
            state_path = resume_path(run.out)
            if state_path.exists():
                # a stopped run's state: a new run here would replace it, and train afresh on records that run has
                # spent its steps' epsilon on
                raise UsageError(f"--out {run.out}: a stopped run left its resume state {state_path}: `dpnas train "
                                 f"--resume {shlex.quote(str(state_path))}` continues it; remove the file (or choose "
                                 "another --out) to train a new run")
        arch, train_cfg, privacy, data_settings = run.arch, run.train_cfg, run.privacy, run.data_settings
        check_training_fits(arch, train_cfg, dataset=data_settings.dataset, image_size=data_settings.image_size,
                            device=device, synthetic_size=data_settings.synthetic_size)
        check_writable(run.out, what="--out")
        weights = check_writable(run.weights, what="--weights") if run.weights else None
        check_writable(state_path, what="--resume")
        check_distinct(out=run.out, weights=weights, resume=state_path,
                       inputs={"recipe or architecture file": run.source})
        data = load_dataset(data_settings.dataset, data_dir=data_settings.data_dir,
                            val_fraction=data_settings.val_fraction, seed=data_settings.split_seed,
                            image_size=data_settings.image_size, synthetic_size=data_settings.synthetic_size)
        fingerprint = data_fingerprint(data)
        if resume is not None and resume.get("data_fingerprint") != fingerprint:
            raise UsageError(f"--resume: the {data_settings.dataset} data differ from the records this run started on "
                             "(its folder changed?): the same run must continue on the same records")
        keep_state = FileKeeper(state_path, {"run": run.to_record(), "data_fingerprint": fingerprint})

        trained = []
        try:
            with terminate_as_interrupt():  # a cluster's SIGTERM before its SIGKILL: stop after the step, as Ctrl-C
                result = train(arch, data, train_cfg=train_cfg, privacy=privacy, device=device,
                               progress=not args.quiet, on_trained=trained.append, resume=resume,
                               keep_state=keep_state)
        except DivergedError as err:
            state_path.unlink(missing_ok=True)  # nothing to continue: the next try changes the run
            raise UsageError(f"{err}; try a smaller --lr or --max-grad-norm") from err
        result["recipe"] = run.recipe
        result["data"] = data_settings.to_dict()
        write_json(run.out, result)
        # where the recipe came from: a search's export records its study, its ε and the data it searched on
        recorded, searched_on = run.provenance, run.searched_on
        same_records = searched_on in (None, result["dataset"])
        if weights is not None:
            scores = {k: result[k] for k in ("val_accuracy", "test_accuracy", "epsilon_spent", "delta", "params")}
            made = {"trained_by": "dpnas train", "source": run.source}
            if "search_epsilon" in recorded and same_records:
                # the search that chose this recipe spent its ε on these records: the model's cost includes it
                made.update({k: recorded[k] for k in ("study", "trial", "search_epsilon", "search_delta")
                             if k in recorded}, recipe_of_search=True)
            save_checkpoint(checkpoint_dict(trained[0], arch=arch, train_cfg=train_cfg, privacy=privacy, data=data,
                                            data_settings=data_settings, results=scores, provenance=made), weights)
            print(f"weights written to {weights}")
        eps = "non-private" if not result["private"] else f"epsilon spent {result['epsilon_spent']:.3f} of {privacy.epsilon:g} (delta {privacy.delta:g})"
        status = "interrupted after" if result["interrupted"] else "finished"
        val = (f"noisy: std {result['val_noise']:.3g} on the correct count, epsilon "
               f"{result['validation_epsilon']:.3f} for the validation records" if result["val_noise"] else
               "exact: the validation records are not protected" if result["private"] else "exact")
        score = result["val_accuracy"]
        if score is not None and math.isfinite(score):
            shown = f"val accuracy {score:.4f} ({val})"
        else:  # stopped before its first validation (was "val accuracy nan (noisy: ..., epsilon 0.000 ...)")
            shown = "no validation split" if not result.get("val_size") else "no validation score released yet"
        print(f"{status} {result['steps']} steps: {shown}, test accuracy {result['test_accuracy']:.4f}, {eps}")
        print(f"result written to {run.out}")
        if result["private"] and recorded.get("searched_on_public_data"):
            print(f"note: the search that chose this recipe trained on public data "
                  f"({recorded['searched_on_public_data']}) and spent no private budget: this run's epsilon is "
                  f"the whole cost to the {result['dataset']} records it trained on")
        elif result["private"] and recorded.get("study"):
            if not same_records:
                print(f"note: study {recorded['study']!r} chose this recipe on {searched_on}; this run trained on "
                      f"{result['dataset']}, other records, so its epsilon is the whole cost to them")
            else:
                print(f"note: study {recorded['study']!r} chose this recipe on its own data; on the same records "
                      "this run's epsilon adds to the search's (`dpnas privacy` states the search's)")
        if result["private"] and result["reproducible"]:
            print("note: reproducible = true: whoever has the seed can regenerate this run's batches and noise; "
                  "retrain without it before releasing the model")
        if result["interrupted"]:
            if keep_state.current:
                spent = (f"the same run: its {result['steps']} steps' epsilon is not spent again" if result["private"]
                         else "the same run, from its step " + str(result["steps"]))
                print(f"continue this run ({spent}): "
                      f"dpnas train --resume {shlex.quote(str(state_path))}")
            return 130
        state_path.unlink(missing_ok=True)  # finished: nothing is left to continue
        return 0


@dataclass(frozen=True)
class TrainRun:
    """What one `dpnas train` trains and where it writes, resolved from its flags, or recorded in a resume state."""

    arch: ArchConfig
    train_cfg: TrainConfig
    privacy: PrivacyConfig
    data_settings: DataSettings
    out: Path
    weights: Path | None
    source: str  # ARCH_OR_RECIPE as given
    recipe: str  # the result's "recipe": the recipe file's path, or the named recipe's name
    provenance: dict  # a recipe file's record of the search that chose it
    searched_on: str | None

    @classmethod
    def from_args(cls, args: argparse.Namespace) -> TrainRun:
        from dpnas.dp.recipe_file import check_recipe_budget, load_recipe_file, retrain_data_settings
        from dpnas.dp.recipes import DEFAULT_RECIPE, get_recipe, split_overrides
        from dpnas.results import default_result_path

        if args.dataset is not None:
            # the name a recipe file records: "Digits" would lose its recorded split, and escape the --data-dir check
            args.dataset = dataset_key(args.dataset)
        if args.image_size is not None and args.image_size < 1:
            raise UsageError(f"--image-size: must be >= 1 (pixels), got {args.image_size}")
        recipe_file = None
        if args.arch not in MODELS and Path(args.arch).suffix in (".json", ".toml"):
            recipe_file = load_recipe_file(args.arch)
        recipe = get_recipe(args.recipe or DEFAULT_RECIPE)
        base_train, base_privacy = recipe.train, recipe.privacy
        if recipe_file is not None and args.recipe is None:  # the file's sections, over the default recipe's
            base_train, base_privacy = recipe_file.train or base_train, recipe_file.privacy or base_privacy
        settings = recipe_file.data if recipe_file is not None else None
        arch_changes, train_changes, privacy_changes = split_overrides(args.assignments)
        flags = {"epochs": args.epochs, "batch_size": args.batch_size, "physical_batch_size": args.physical_batch_size,
                 "lr": args.lr, "seed": args.seed, "val_fraction": args.val_fraction}
        train_changes.update({k: v for k, v in flags.items() if v is not None})
        flags = {"epsilon": math.inf if args.no_dp else args.epsilon, "delta": args.delta,
                 "max_grad_norm": args.max_grad_norm, "accountant": args.accountant}
        privacy_changes.update({k: v for k, v in flags.items() if v is not None})
        arch = recipe_file.arch.replace(**arch_changes) if recipe_file is not None else load_arch(args.arch, arch_changes)
        if base_privacy.private and privacy_changes.get("epsilon") == math.inf:
            # --no-dp (or epsilon = inf) on a private recipe: a search's export fixes the validation noise its study
            # derived for a private run, which would blur this run's scores and print an epsilon for the validation
            # records of a run that is not private. No noise at all, as `dpnas train ARCH --no-dp` (the DP gap's
            # other side); an explicit --set val_noise= still stands.
            privacy_changes.setdefault("val_noise", "auto")  # "auto" is 0 for a non-private run
        train_cfg = base_train.replace(**train_changes)
        privacy = base_privacy.replace(**privacy_changes)
        check_recipe_budget(base_privacy, privacy, privacy_changes, epochs=train_cfg.epochs,
                            recipe_epochs=base_train.epochs)
        data_settings = retrain_data_settings(
            settings, dataset=args.dataset, train_seed=train_cfg.seed, val_fraction=train_cfg.val_fraction,
            keep_split_seed="seed" not in train_changes,  # --seed and --set seed= alike
            keep_val_fraction=args.val_fraction is None and "val_fraction" not in train_changes,
            image_size=args.image_size, data_dir=args.data_dir)
        train_cfg = train_cfg.replace(val_fraction=data_settings.val_fraction)
        if args.data_dir and data_settings.dataset in ("digits", "synthetic"):
            raise UsageError(f"--data-dir: {data_settings.dataset} needs no files (bundled with scikit-learn, or "
                             "generated); --data-dir is for cifar10 and imagenette")
        out = Path(args.out) if args.out else default_result_path("train", Path(args.arch).stem, data_settings.dataset)
        from_file = recipe_file is not None and args.recipe is None and (recipe_file.train or recipe_file.privacy)
        return cls(arch=arch, train_cfg=train_cfg, privacy=privacy, data_settings=data_settings, out=out,
                   weights=Path(args.weights) if args.weights else None, source=args.arch,
                   recipe=args.arch if from_file else recipe.name,
                   provenance=recipe_file.provenance if recipe_file is not None else {},
                   searched_on=(recipe_file.data.dataset if recipe_file is not None and recipe_file.data is not None
                                else None))

    def to_record(self) -> dict:
        # Absolute: the printed `--resume` command may run from another folder, and a relative --out, --weights or
        # --data-dir would then write the result beside the wrong cwd, or look for other data
        data = self.data_settings.to_dict()
        if "data_dir" in data:
            data["data_dir"] = str(Path(data["data_dir"]).expanduser().absolute())
        return {"arch": self.arch.to_dict(), "train_config": self.train_cfg.to_dict(),
                "privacy_config": self.privacy.to_dict(), "data": data, "out": str(self.out.absolute()),
                "weights": str(self.weights.absolute()) if self.weights else None, "source": self.source,
                "recipe": self.recipe, "provenance": dict(self.provenance),
                "searched_on": self.searched_on}

    @classmethod
    def from_record(cls, record: dict) -> TrainRun:
        from dpnas.dp.config import PrivacyConfig, TrainConfig
        from dpnas.dp.recipe_file import DataSettings
        from dpnas.dp.resume import ResumeError

        missing = [key for key in ("arch", "train_config", "privacy_config", "data", "out", "weights", "source",
                                   "recipe", "provenance", "searched_on") if key not in (record or {})]
        if missing:
            # `dpnas reproduce` keeps its stopped runs' states too, recording its own settings, not these
            raise ResumeError("this resume state was not written by `dpnas train` (a stopped `dpnas reproduce` "
                              "run continues when the same `dpnas reproduce` command runs again)"
                              if record and "data_fingerprint" in record else
                              f"a damaged resume state (no run's {', '.join(missing)})")
        return cls(arch=ArchConfig.from_dict(record["arch"]), train_cfg=TrainConfig.from_dict(record["train_config"]),
                   privacy=PrivacyConfig.from_dict(record["privacy_config"]),
                   data_settings=DataSettings(**record["data"]), out=Path(record["out"]),
                   weights=Path(record["weights"]) if record["weights"] else None, source=record["source"],
                   recipe=record["recipe"], provenance=record["provenance"], searched_on=record["searched_on"])


class Bench(Command):
    """Measure time per training step, samples/s and peak memory: nonprivate vs Opacus's default vs dpnas.

    Each case runs in its own process on synthetic data of the model's input shape (CIFAR's, or a study's or a
    recipe's dataset); compare ratios within one run only. --interleave runs a model's modes in one process,
    their steps taking turns (steadier ratios on a shared machine, no peak memory).
    """

    name = "bench"

    def add_arguments(self, parser: argparse.ArgumentParser) -> None:
        from dpnas.bench import DEFAULT_MODELS, DEFAULT_MODES, MODES

        parser.add_argument("--models", help="comma-separated names from `dpnas models`, ArchConfig files or recipe "
                                             f"files (default {','.join(DEFAULT_MODELS)}, or none with --points)")
        parser.add_argument("--points", metavar="STUDY_FILE",
                            help="also time --n seeded random points of this study's space, at its data shape and "
                                 "physical batch size")
        parser.add_argument("--n", type=int, default=5, metavar="K", help="points of --points (default 5)")
        parser.add_argument("--points-seed", type=int, default=0, metavar="S", help="seed of --points (default 0)")
        parser.add_argument("--modes", default=",".join(DEFAULT_MODES), help=f"comma-separated subset of {','.join(MODES)} (default {','.join(DEFAULT_MODES)})")
        parser.add_argument("--batch-size", type=int, default=32, metavar="B",
                            help="physical batch of named models (default 32); points and recipe files use their own")
        parser.add_argument("--steps", type=int, default=5, metavar="N", help="timed steps per case (median reported)")
        parser.add_argument("--warmup", type=int, default=1, metavar="N")
        parser.add_argument("--repeats", type=int, default=1, metavar="R",
                            help="run every case R times in turn and report each case's median (steadier ratios "
                                 "on a shared machine)")
        parser.add_argument("--interleave", action="store_true",
                            help="run the modes of each model in one process, their steps taking turns: ratios "
                                 "free of one process's drift against another's, no peak memory")
        parser.add_argument("--variants", default="fp32", metavar="V,...",
                            help="comma-separated: fp32, or a '+'-joined set of bf16, channels_last, cudnn_benchmark "
                                 "(e.g. fp32,bf16+channels_last); Opacus's modes run in fp32 only")
        parser.add_argument("--device", help="cpu or cuda (default: cuda when available)")
        parser.add_argument("--json", dest="json_file", metavar="FILE", help="also write the rows as JSON")

    def run(self, args: argparse.Namespace) -> int:
        from dpnas.bench import DEFAULT_MODELS, bench_models, format_table, run_benchmark
        from dpnas.results import check_writable, write_json

        if args.batch_size < 1 or args.steps < 1 or args.repeats < 1 or args.warmup < 0 or args.n < 1:
            raise UsageError("--batch-size, --steps, --repeats and --n must be >= 1 and --warmup >= 0")
        if args.device is not None:
            from dpnas.dp.train import check_device

            check_device(args.device)  # one line for a device this machine lacks, not a traceback mid-run
        names = args.models if args.models is not None else ("" if args.points else ",".join(DEFAULT_MODELS))
        try:  # every name, file and point is resolved before the first case runs
            models = bench_models(names, args.points, args.n, seed=args.points_seed)
        except (ValueError, OSError) as err:
            raise UsageError(str(err)) from err
        modes = [m.strip() for m in args.modes.split(",") if m.strip()]
        variants = [v.strip() for v in args.variants.split(",") if v.strip()]
        if not modes or not variants:
            raise UsageError("--modes and --variants must each name at least one")
        if set(modes) <= {"opacus", "dpnas_opacus_hooks"} and "fp32" not in variants:
            raise UsageError("--variants: Opacus's modes run in fp32 only; add --modes nonprivate or dpnas, or fp32")
        if args.json_file:
            check_writable(args.json_file, what="--json")  # before the first case, not after the last
        # --json: rewritten after every case, so that a run stopped by a time limit keeps what it measured
        keep = (lambda rows: write_json(args.json_file, rows)) if args.json_file else None
        try:
            rows = run_benchmark(models=models, modes=modes, batch_size=args.batch_size, steps=args.steps,
                                 warmup=args.warmup, device=args.device, variants=variants, repeats=args.repeats,
                                 interleave=args.interleave, on_case=keep)
        except ValueError as err:
            raise UsageError(str(err)) from err
        print(format_table(rows))
        if args.json_file:
            write_json(args.json_file, rows)
            print(f"rows written to {args.json_file}")
        return 1 if any(r.get("error") for r in rows) else 0  # the other cases measured, but not all


class Search(Command):
    """Run (or continue) an architecture search described by a study file; every trial trains with DP-SGD.

    Results go to the study's storage (default: a journal file next to the study file), which
    `optuna-dashboard`, `dpnas best`, `dpnas privacy` and `dpnas plot` read.  Ctrl-C (or SIGTERM) finishes the
    current trial's bookkeeping; running the same command again continues the study.
    """

    name = "search"

    def add_arguments(self, parser: argparse.ArgumentParser) -> None:
        parser.add_argument("study", metavar="STUDY", help="a study file (studies/*.toml)")
        parser.add_argument("--storage", metavar="URL", type=non_empty, help="journal file (*.journal), sqlite:///FILE.db or postgresql://... (default: STUDY with .journal)")
        parser.add_argument("--study-name", metavar="NAME", type=study_name, help="default: [study] name in the file, or its file name")
        parser.add_argument("--n-trials", type=int, metavar="N", help="the study's total number of trials (overrides the file)")
        parser.add_argument("--timeout", type=float, metavar="S", help="stop taking new trials after S seconds")
        parser.add_argument("--workers", type=int, default=1, metavar="K", help="trials run in parallel on this machine")
        parser.add_argument("--device", help="cpu, cuda, cuda:1 ... (default: cuda when available; one GPU per worker where there are several)")
        parser.add_argument("--artifacts", metavar="DIR_OR_S3", type=non_empty,
                            help="where trained weights are kept (default: STORAGE.artifacts beside a journal or SQLite "
                                 "file; needed for a server storage: a directory every worker reaches, or s3://BUCKET)")
        parser.add_argument("--check", action="store_true",
                            help="only check the study (device, budget against the real split, stored study, one "
                                 "DP-SGD step on random data) and exit: nothing trained, no epsilon spent")
        parser.add_argument("--quiet", action="store_true")

    def run(self, args: argparse.Namespace) -> int:
        from dpnas.search.runner import WorkersFailed, check_search, exhausted_message, search, trial_budget
        from dpnas.search.storage import command_url, dashboard_command
        from dpnas.search.study_file import load_study_file
        from dpnas.search.study_report import runs_count, save_study_note
        from dpnas.search.weights import study_location

        spec = load_study_file(args.study)
        if args.n_trials is not None and args.n_trials < 1:
            raise UsageError(f"--n-trials: must be >= 1, got {args.n_trials}")
        url = args.storage or spec.default_storage()
        timeout = args.timeout if args.timeout is not None else spec.timeout
        if args.check:
            report = check_search(spec, url, study_name=args.study_name, n_trials=args.n_trials, timeout=timeout,
                                  workers=args.workers, device=args.device, progress=not args.quiet)
            for line in report.lines:
                print(line)
            done = _trials_done(spec, url, args.study_name, args.n_trials)
            if done is not None:  # "ready to search" read as if the search would train; it trains nothing
                print(f"{args.study}: study {done[0]!r} has run all {done[1]} trials of its budget: a search trains "
                      "nothing more (nothing trained, no epsilon spent)")
                return 0
            print(f"{args.study}: ready to search (nothing trained, no epsilon spent)")
            return 0
        interrupted, failed = False, None
        try:
            study = search(spec, storage_url=url, study_name=args.study_name, n_trials=args.n_trials,
                           timeout=timeout, workers=args.workers, device=args.device,
                           progress=not args.quiet, artifacts=args.artifacts)
        except WorkersFailed as err:
            failed = err
            from dpnas.search.study_report import resolve_study

            study, _ = resolve_study(url, args.study_name or spec.name)
        except KeyboardInterrupt:
            interrupted = True
            from dpnas.search.study_report import resolve_study

            try:
                study, _ = resolve_study(url, args.study_name or spec.name)
            except ConfigError:  # stopped before the study was created: nothing to say about it
                raise KeyboardInterrupt from None
        from dpnas.search.runner import best_trials
        from dpnas.search.study_privacy import study_privacy

        target, used, waiting, running = trial_budget(study)
        save_study_note(study, url)
        repeats = sum(1 for t in study.get_trials(deepcopy=False) if "duplicate_of" in t.user_attrs)
        # the slots that finished (a failed trial that was retried gives its slot to its retry)
        # a random number of trials (Papernot & Steinke) must stay secret: its target is not printed
        budget = "" if spec.trial_count != "fixed" else f" of a budget of {target}"
        print(f"study {study.study_name!r}: {used - waiting - running} trials finished{budget} "
              f"({waiting} waiting" + (f"; {repeats} repeated proposals skipped, untrained" if repeats else "") + ")")
        if exhausted_message(study):
            print(exhausted_message(study))
        best = best_trials(study)
        for trial in best:
            print(f"best: trial {trial.number}, {dict(zip(study.metric_names or ['value'], trial.values))}, {trial.params}")
        report = study_privacy(study)
        # the study named wherever it is not the file's own (--study-name), or the storage may hold others
        name_flag = f" --study-name {shlex.quote(study.study_name)}" if args.study_name or args.storage else ""
        where = shlex.quote(command_url(args.storage) if args.storage else args.study) + name_flag  # pasted into a shell
        if report.headline():
            print(report.headline())
        print(f"privacy of releasing the best trial: epsilon {report.epsilon:.3f} for the whole dataset (training "
              f"records {report.training_epsilon:.3f}, validation records {report.validation_epsilon:.3f}), delta "
              f"{report.delta:g} ({report.mode}; {runs_count(report.runs)}; `dpnas privacy {where}` explains)")
        for line in report.not_covered:
            print(f"not covered: {line}")
        for line in report.notes:  # what `dpnas privacy` and the dashboard note say too
            print(f"note: {line}")
        if interrupted:
            print("interrupted: run the same command again to continue the study")
        if failed is not None:
            print(f"dpnas search: error: {failed}", file=sys.stderr)
        if best:
            print(f"export the best recipe and its weights: dpnas best {where} --out best.toml --weights best.pt")
        else:  # `dpnas best` would refuse: "has no completed trial yet"
            print("no completed trial yet: nothing to export (`dpnas best` needs one)")
        print(f"open it with: {dashboard_command(url, study_location(study, url, args.artifacts))}")
        return 130 if interrupted else 1 if failed is not None else 0


def _trials_done(spec, url: str, study_name: str | None, n_trials: int | None) -> tuple[str, int] | None:
    """(name, target) of a stored study with a fixed trial count whose every trial has run, else None."""
    from dpnas.search.runner import existing_study, trial_budget

    stored = existing_study(spec, url, study_name)
    if stored is None or spec.trial_count != "fixed":
        return None
    target, used, waiting, running = trial_budget(stored)
    target = n_trials or target
    return (stored.study_name, target) if target and used >= target and not waiting and not running else None


class Best(Command):
    """Write the best trial's recipe (architecture, training, privacy and data settings, with provenance) as a
    file `dpnas train` and `dpnas describe` take, and with --weights fetch its trained model.

    For a Pareto set, one file per trial (FILE-trialN).
    """

    name = "best"

    def add_arguments(self, parser: argparse.ArgumentParser) -> None:
        parser.add_argument("study", metavar="STUDY_OR_STORAGE", help="a study file, or a storage URL")
        parser.add_argument("--study-name", metavar="NAME", type=study_name)
        parser.add_argument("--out", metavar="FILE", type=non_empty, help="a .toml or .json file (default runs/best-STUDY.toml)")
        parser.add_argument("--weights", metavar="FILE", type=non_empty, help="also fetch the best trial's trained weights (a dpnas "
                                                              "checkpoint that `dpnas evaluate` takes)")
        parser.add_argument("--artifacts", metavar="DIR_OR_S3", type=non_empty, help="where the weights are, if not where the study says")

    def run(self, args: argparse.Namespace) -> int:
        from dpnas.results import check_distinct, check_writable
        from dpnas.search.storage import storage_file
        from dpnas.search.study_report import export_best, export_best_weights, resolve_study, search_epsilon

        study, url = resolve_study(args.study, args.study_name)
        out = Path(args.out) if args.out else Path("runs") / f"best-{study.study_name}.toml"
        check_writable(out, what="--out")  # both before either is written
        if args.weights:
            check_writable(args.weights, what="--weights")
        check_distinct(out=out, weights=args.weights,
                       inputs={"study file": args.study if args.study.endswith(".toml") else None,
                               "study's storage": storage_file(url)})
        search = search_epsilon(study)  # one privacy account for the recipe and the weights
        for path in export_best(study, out, search=search):
            print(f"wrote {path}")
        if args.weights:
            for path in export_best_weights(study, url, Path(args.weights), artifacts=args.artifacts, search=search):
                print(f"wrote {path} (the trained weights; `dpnas evaluate {shlex.quote(str(path))}` scores them on "
                      "the test split)")
        return 0


class Evaluate(Command):
    """Score a dpnas checkpoint (from `dpnas best --weights` or `dpnas train --weights`) on a test split.

    The data is split as it was when the model was trained, so the test records are the same ones.
    """

    name = "evaluate"

    def add_arguments(self, parser: argparse.ArgumentParser) -> None:
        parser.add_argument("weights", metavar="WEIGHTS", help="a dpnas checkpoint file")
        parser.add_argument("--dataset", help=f"one of: {', '.join(DATASETS)} (default: the one it was trained on)")
        parser.add_argument("--data-dir", metavar="DIR")
        parser.add_argument("--device", help="cpu, cuda, ... (default: cuda when available)")
        parser.add_argument("--json", action="store_true", help="print one JSON object")

    def run(self, args: argparse.Namespace) -> int:
        from dpnas.dp.checkpoint import evaluate_checkpoint
        from dpnas.dp.train import check_device

        check_device(args.device)  # before the checkpoint and its data are read
        if args.dataset is not None:
            args.dataset = dataset_key(args.dataset)  # as `dpnas train` takes it: "Digits" is digits
        report = evaluate_checkpoint(args.weights, dataset=args.dataset, data_dir=args.data_dir, device=args.device)
        if args.json:
            print(json.dumps(json_safe(report), indent=2))
        else:
            from dpnas.search.study_report import search_words

            spent = report["epsilon_spent"]
            search = search_words(report["provenance"])
            print(f"{args.weights}: test accuracy {report['test_accuracy']:.4f} on {report['test_size']} "
                  f"{report['dataset']} test images, {report['params']:,} params, epsilon spent "
                  f"{f'{spent:.3f}' if isinstance(spent, (int, float)) else spent} by its run"
                  + (f"; {search}" if search else "")
                  + ("; trained with reproducible = true: whoever has the seed can regenerate its batches and noise, "
                     "so no epsilon holds against them (retrain without it before releasing the model)"
                     if report["reproducible"] else ""))
        return 0


class Privacy(Command):
    """Report what a whole search cost in privacy: the guarantee for releasing its best trial, record by record
    (training, validation, the whole dataset), how the budget was split, and what is not covered.

    Per-trial epsilon is not the cost of a search.  With a random number of trials (Poisson or truncated
    negative binomial) and random search, Papernot & Steinke (ICLR 2022) bound releasing the best run;
    otherwise the runs compose.
    """

    name = "privacy"

    def add_arguments(self, parser: argparse.ArgumentParser) -> None:
        parser.add_argument("study", metavar="STUDY_OR_STORAGE")
        parser.add_argument("--study-name", metavar="NAME", type=study_name)
        parser.add_argument("--json", action="store_true")

    def run(self, args: argparse.Namespace) -> int:
        from dpnas.search.study_privacy import study_privacy
        from dpnas.search.study_report import privacy_statement, resolve_study

        study, _ = resolve_study(args.study, args.study_name)
        report = study_privacy(study)
        if args.json:
            # strict JSON has no infinity: ε = inf is written null, and `protected` says which parts the ε covers
            record = report.to_dict()
            record["reproducible_trials"] = record.pop("reproducible")
            print(json.dumps(json_safe({**record, "protected": report.protected()}), indent=2))
            return 0
        for line in privacy_statement(study, report):
            print(line)
        return 0


class Dashboard(Command):
    """Start optuna-dashboard on a study's storage, on 127.0.0.1 unless --host says otherwise."""

    name = "dashboard"

    def add_arguments(self, parser: argparse.ArgumentParser) -> None:
        parser.add_argument("storage", metavar="STUDY_OR_STORAGE")
        parser.add_argument("--host", default="127.0.0.1", help="interface to listen on (default 127.0.0.1; 0.0.0.0 exposes it to the network)")
        parser.add_argument("--port", type=int, default=8080)
        parser.add_argument("--artifacts", metavar="DIR_OR_S3", type=non_empty,
                            help="where the study's weights are (default: where the study says, else beside it)")

    def run(self, args: argparse.Namespace) -> int:
        from optuna_dashboard import run_server

        from dpnas.search.storage import display_url, open_storage
        from dpnas.search.study_file import load_study_file
        from dpnas.search.weights import open_store, storage_location

        if not 0 <= args.port <= 65535:
            raise UsageError(f"--port: must be from 0 to 65535, got {args.port}")
        url = load_study_file(args.storage).default_storage() if args.storage.endswith(".toml") else args.storage
        storage = open_storage(url, must_exist=True)
        location = args.artifacts or storage_location(storage, url)
        store = open_store(location) if location and (location.startswith("s3://") or Path(location).is_dir()) else None
        check_listen(args.host, args.port)  # before the banner: a port in use was a traceback after it
        print(f"optuna-dashboard on http://{args.host}:{args.port}/ for {display_url(url)} (Ctrl-C to stop)")
        try:
            run_server(storage, host=args.host, port=args.port, artifact_store=store)
        except OSError as err:  # taken between the check and the server's bind
            raise UsageError(_cannot_listen(args.host, args.port, err)) from err
        return 0


def _cannot_listen(host: str, port: int, err: OSError) -> str:
    import socket

    if isinstance(err, socket.gaierror):
        return f"--host {host}: cannot listen there ({err.strerror or err}): give this machine's name or address"
    return (f"--host {host} --port {port}: cannot listen there ({err.strerror or err}); another dashboard or server "
            "may hold the port: stop it or choose another --port")


def check_listen(host: str, port: int) -> None:
    """Bind `host`:`port` as optuna-dashboard's server will (bottle's wsgiref server: IPv6 for a host with a colon,
    SO_REUSEADDR) and let it go, so that a port in use or an unknown host is one line, not a traceback."""
    import socket

    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    try:
        with socket.socket(family, socket.SOCK_STREAM) as sock:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            sock.bind((host, port))
    except OSError as err:
        raise UsageError(_cannot_listen(host, port, err)) from err


def _unwritable(err: OSError) -> str:
    where = f": {err.filename}" if err.filename else ""
    return f"cannot write to its storage ({err.strerror or err}{where}); --no-attach skips attaching"


class Plot(Command):
    """Draw a study's figures: accuracy by component, width x depth, the DP gap, Pareto fronts, accuracy against
    epsilon, and Optuna's history, learning curves and parameter importances.

    HTML (opens offline; the files of one folder share one plotly.min.js beside them), and PNG/SVG with
    --format through kaleido and a Chrome/Chromium.  The figures are also attached to the study, so
    optuna-dashboard shows them.
    """

    name = "plot"

    def add_arguments(self, parser: argparse.ArgumentParser) -> None:
        parser.add_argument("study", metavar="STUDY_OR_STORAGE")
        parser.add_argument("--study-name", metavar="NAME", type=study_name)
        parser.add_argument("--companion", metavar="STUDY_OR_STORAGE", help="another study (e.g. non-private) whose trials join the DP-gap figure")
        parser.add_argument("--companion-name", metavar="NAME")
        parser.add_argument("--out", metavar="DIR", help="default runs/plots-STUDY")
        parser.add_argument("--format", default="html", help="comma-separated: html,png,svg (default html); PNG and "
                                                             "SVG need a Chrome/Chromium (BROWSER_PATH, or on PATH)")
        parser.add_argument("--no-attach", action="store_true", help="do not save the figures into the study")

    def run(self, args: argparse.Namespace) -> int:
        from dpnas.analysis.figures import (
            attach_to_dashboard,
            default_plot_dir,
            parse_formats,
            study_figures,
            write_figures,
        )
        from dpnas.analysis.frame import trials_frame
        from dpnas.analysis.static import STATIC_FORMATS, StaticExportError, check_static_export
        from dpnas.results import check_folder
        from dpnas.search.journal_repair import JournalDamagedInside
        from dpnas.search.study_report import resolve_study

        try:  # refused before the study is read or anything is drawn
            formats = parse_formats(args.format)
            if any(f in STATIC_FORMATS for f in formats):
                check_static_export()
        except (ValueError, StaticExportError) as err:
            raise UsageError(f"--format: {err}") from err
        if args.out and Path(args.out).exists() and not Path(args.out).is_dir():
            raise UsageError(f"--out {args.out}: is a file; give a folder for the figures")
        if args.out:
            check_folder(args.out, what="--out")  # a file above it, a folder not writable: before anything is drawn
        study, _ = resolve_study(args.study, args.study_name)
        frame = trials_frame(study)
        extra = None
        if args.companion:  # its trials join the DP-gap figure only
            companion, _ = resolve_study(args.companion, args.companion_name, flag="--companion-name")
            extra = trials_frame(companion)
            extra["number"] = extra["number"] + 100_000  # keep trial numbers apart
        figures = study_figures(study, frame, companion=extra)
        out = Path(args.out) if args.out else check_folder(default_plot_dir(study), what="the default --out")
        try:
            written = write_figures(figures, out, formats=formats)
            scratch = out / f".trials.csv.{os.getpid()}.partial"  # no half-written table on a full disk
            try:
                frame.to_csv(scratch, index=False)
                os.replace(scratch, out / "trials.csv")
            finally:
                scratch.unlink(missing_ok=True)
        except StaticExportError as err:
            raise UsageError(f"--format: {err}") from err
        except OSError as err:  # a read-only file system, a full disk: one line
            raise OutputError(f"--out {out}: cannot write there ({err.strerror or err}); choose another path") from None
        print(f"wrote {len(written)} files and trials.csv to {out}/")
        if not args.no_attach:
            try:
                attach_to_dashboard(study, figures)
            except JournalDamagedInside as err:  # the files are written; the storage refuses writes until repaired
                print(f"note: the figures are not attached to the study: {err}")
            except OSError as err:  # a study kept where this user cannot write (read-only): the files are written
                print(f"note: the figures are not attached to the study: {_unwritable(err)}")
        return 0


class Report(Command):
    """Write one self-contained HTML page about a study: the question (data, search space, budget), the privacy
    statement of `dpnas privacy`, the best recipe and where its weights are, a sortable table of every trial,
    and every figure of `dpnas plot` with a caption.

    It opens offline (plotly.js is inside, once) and is attached to the study, so optuna-dashboard lists it.
    """

    name = "report"

    def add_arguments(self, parser: argparse.ArgumentParser) -> None:
        parser.add_argument("study", metavar="STUDY_OR_STORAGE", help="a study file, or a storage URL")
        parser.add_argument("--study-name", metavar="NAME", type=study_name)
        parser.add_argument("--out", metavar="FILE", type=non_empty, help="default runs/plots-STUDY/report.html, beside `dpnas plot`'s")
        parser.add_argument("--artifacts", metavar="DIR_OR_S3", type=non_empty,
                            help="the study's artifact store, if not where the study says (a server storage needs it "
                                 "to attach the report)")
        parser.add_argument("--no-attach", action="store_true", help="do not attach the report to the study")

    def run(self, args: argparse.Namespace) -> int:
        from dpnas.analysis.figures import default_plot_dir
        from dpnas.analysis.report import REPORT_FILE, attach_report, write_report
        from dpnas.results import check_writable
        from dpnas.search.journal_repair import JournalDamagedInside
        from dpnas.search.study_report import resolve_study
        from dpnas.search.weights import study_location

        if args.out is not None and Path(args.out).suffix.lower() not in (".html", ".htm"):
            raise UsageError(f"--out {args.out}: the report is an HTML page; give a .html file name")
        study, url = resolve_study(args.study, args.study_name)
        out = check_writable(Path(args.out) if args.out else default_plot_dir(study) / REPORT_FILE, what="--out")
        path = write_report(study, out, storage_url=url, where=args.study, artifacts=args.artifacts,
                            named=bool(args.study_name))
        print(f"wrote {path} ({path.stat().st_size / 1e6:.1f} MB; opens offline in any browser)")
        if not args.no_attach:
            location = study_location(study, url, args.artifacts)
            if location is None:
                print("note: not attached to the study: a server storage needs --artifacts DIR_OR_S3")
            else:
                try:
                    artifact_id = attach_report(study, path, location=location)
                except JournalDamagedInside as err:  # the page is written; the storage refuses writes until repaired
                    print(f"note: not attached to the study: {err}")
                except OSError as err:  # a study kept where this user cannot write (read-only): the page is written
                    print(f"note: not attached to the study: {_unwritable(err)}")
                else:
                    print(f"attached to the study as artifact {artifact_id} in {location} (optuna-dashboard lists it)")
        return 0


class Reproduce(Command):
    """Train a paper's architecture with its recipe and compare with the published numbers.

    smoothnet (CIFAR-10 or ImageNette at eps 7), resnet9-scalenorm (CIFAR-10 at eps 8, with and without
    ScaleNorm), de-wrn (CIFAR-10 at eps 8).  --quick shrinks data, widths and epochs so it finishes on a CPU in
    about a minute (on the bundled digits when the dataset is not here), and labels the result as not comparable.
    Ctrl-C (or SIGTERM) stops after the current step; the same command then continues the stopped run as the same
    run (its finished steps' ε is not spent again) and keeps the runs that had finished.
    """

    name = "reproduce"

    def add_arguments(self, parser: argparse.ArgumentParser) -> None:
        from dpnas.reproduce import REPRODUCTIONS

        parser.add_argument("name", metavar="NAME", help=f"one of: {', '.join(REPRODUCTIONS)}")
        parser.add_argument("--dataset", help="default: the reproduction's first dataset (cifar10)")
        parser.add_argument("--data-dir", metavar="DIR")
        parser.add_argument("--quick", action="store_true", help="a CPU-sized run (about a minute on the bundled digits), not comparable to the paper")
        parser.add_argument("--device")
        parser.add_argument("--out-dir", metavar="DIR", default="runs", help="where the JSON results go (default runs/)")
        parser.add_argument("--no-download", action="store_true", help="never try to download the dataset")
        parser.add_argument("--quiet", action="store_true")

    def run(self, args: argparse.Namespace) -> int:
        from dpnas.dp.interrupts import terminate_as_interrupt
        from dpnas.reproduce import format_comparison, run_reproduction

        with terminate_as_interrupt():  # a cluster's SIGTERM before its SIGKILL: stop after the step, as Ctrl-C
            rows = run_reproduction(args.name, dataset=args.dataset, data_dir=args.data_dir, quick=args.quick,
                                    device=args.device, out_dir=Path(args.out_dir), progress=not args.quiet,
                                    download=not args.no_download)
        print(format_comparison(rows), end="")
        return 130 if any(r["interrupted"] for r in rows) else 0


COMMANDS: list[Command] = [
    Describe(), Models(), Train(), Bench(), Search(), Best(), Evaluate(), Privacy(), Dashboard(), Plot(), Report(),
    Reproduce(),
]


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> None:  # one line, status 2, as every other user error
        self.exit(2, f"{self.prog}: error: {message}\n")


def make_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="dpnas", description="Neural architecture search for differentially private deep learning.")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND", parser_class=_Parser)
    for command in COMMANDS:
        doc = (command.__doc__ or "").strip()
        # the summary: the docstring's first sentence, wrapped over lines there (its first line alone may stop
        # mid-sentence)
        summary = " ".join(doc.split("\n\n")[0].split())
        summary = summary.split(". ")[0].rstrip(".") + "."
        command_parser = sub.add_parser(command.name, help=summary, description=doc)
        command.add_arguments(command_parser)
        command_parser.set_defaults(handler=command)
    return parser


@contextmanager
def one_line_warnings(command: str):
    """Warnings printed as the command's own lines (``dpnas plot: warning: ...``), not as Python's two-line
    ``file:line: UserWarning`` with a source line, which reads like a crash above a one-line error."""
    python_format = warnings.formatwarning
    warnings.formatwarning = lambda message, category, *_, **__: f"dpnas {command}: warning: {message}\n"
    try:
        yield
    finally:
        warnings.formatwarning = python_format


def main(argv: list[str] | None = None) -> int:
    args = make_parser().parse_args(argv)
    with one_line_warnings(args.command):
        try:
            import optuna

            optuna.logging.set_verbosity(optuna.logging.WARNING)  # dpnas prints its own one line per trial
            return args.handler.run(args)
        except (ConfigError, UsageError, DataError, OutputError) as err:
            print(f"dpnas {args.command}: error: {err}", file=sys.stderr)
            return 2
        except KeyboardInterrupt:
            print(f"dpnas {args.command}: interrupted", file=sys.stderr)
            return 130
        except BrokenPipeError:
            if not _stdout_closed():
                raise  # another pipe (a server's socket, a worker's): a real error
            return 141  # `dpnas describe X | head`: the reader left; a shell's status for a SIGPIPE, no traceback


def _stdout_closed() -> bool:
    """Whether the standard output is a pipe whose reader has gone (poll reports an error on it); if so it is pointed
    at /dev/null, so that Python's flush at exit does not print a second BrokenPipeError."""
    import select

    try:
        fd = sys.stdout.fileno()
        poll = select.poll()
        poll.register(fd, select.POLLOUT)
        if not any(events & select.POLLERR for _, events in poll.poll(0)):
            return False
        os.dup2(os.open(os.devnull, os.O_WRONLY), fd)
    except (OSError, ValueError, AttributeError):
        return False
    return True


if __name__ == "__main__":
    sys.exit(main())
