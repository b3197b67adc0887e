"""`dpnas bench`: time per training step, throughput and peak memory, dpnas against its baselines.

Three modes train the same model on the same CIFAR-shaped synthetic data:

* ``nonprivate``: plain PyTorch SGD on device-resident batches (the floor);
* ``opacus``: Opacus's default path: ``PrivacyEngine.make_private_with_epsilon`` with hooks,
  a DataLoader with Poisson sampling over host memory, fp32;
* ``dpnas``: dpnas's own engine (:class:`dpnas.dp.engine.DPSGDEngine`) with on-device sampling and its own
  per-sample gradients (:mod:`dpnas.dp.per_sample`);
* ``dpnas_opacus_hooks`` (on request): the same engine with Opacus's GradSampleModule instead, which
  isolates what dpnas's per-sample path gives;
* ``dpnas_unfold``, ``dpnas_grouped``, ``dpnas_ghost`` (on request): dpnas's path with one convolution
  method everywhere instead of the fastest per layer, which isolates what each method gives.

Each mode can run in *variants* (``--variants``): ``fp32`` (the default), or any ``+``-joined set of
``bf16`` (autocast of the forward pass), ``channels_last`` (NHWC tensors) and ``cudnn_benchmark`` (cuDNN
times its algorithms per shape).  Ratios to ``nonprivate`` are taken within one variant.  The Opacus
modes are Opacus's default pipeline, fp32 and NCHW, and run in the ``fp32`` variant only (Opacus's hooks
also give wrong per-sample gradients on NHWC tensors and clip in bf16 under autocast; see
:class:`dpnas.dp.engine.DPSGDEngine`).

A *model* is a registered name, an ArchConfig file or a recipe file (``--models``), or one of K seeded random
points of a study's space (``--points STUDY --n K``); a study's points train on its dataset's shape (digits: one
channel) at the search's resolution and physical batch size (a ``[fidelity]`` table's image size and TAN batch
included), which is what the search itself runs.

Each (model, mode, variant) runs in a fresh subprocess, so its peak memory is its own and one
case cannot warm another's caches.  Ratios are only meaningful within one run.  On a shared machine one process
can run 20-40 % slower than the next, and that moves a ratio as much; ``--interleave`` runs the modes of each
model and variant in one process instead, their whole steps taking turns on the same Poisson batch sizes
(:func:`run_interleaved`), which steadies the ratios and gives up the per-mode peak memory.
"""

from __future__ import annotations

import argparse
import json
import resource
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch

from dpnas.arch.registry import MODELS, get_arch
from dpnas.arch.space import ArchConfig, ConfigError

FIXED_METHOD_MODES = {"dpnas_unfold": "unfold", "dpnas_grouped": "grouped", "dpnas_ghost": "ghost"}
MODES = ("nonprivate", "opacus", "dpnas", "dpnas_opacus_hooks", *FIXED_METHOD_MODES)
DEFAULT_MODES = ("nonprivate", "opacus", "dpnas")
DEFAULT_MODELS = ("smoothnet", "resnet9_scalenorm", "tiny")
VARIANT_OPTIONS = ("bf16", "channels_last", "cudnn_benchmark")
OPACUS_MODES = ("opacus", "dpnas_opacus_hooks")  # fp32 variant only


@dataclass(frozen=True)
class BenchModel:
    """One architecture to time, with the input shape and physical batch it trains at."""

    label: str
    arch: dict[str, Any]  # ArchConfig fields: a case process rebuilds the model from them
    in_channels: int = 3
    image_size: int = 32
    batch_size: int | None = None  # None: the run's --batch-size


def resolve_model(name_or_file: str) -> BenchModel:
    """A registered name, an ArchConfig file or a recipe file (its physical batch size and data shape)."""
    from dpnas.data.datasets import DATASET_CHANNELS, DEFAULT_IMAGE_SIZE
    from dpnas.dp.recipe_file import load_recipe_file

    if name_or_file in MODELS:
        return BenchModel(name_or_file, MODELS[name_or_file].arch.to_dict())
    if not Path(name_or_file).exists():
        get_arch(name_or_file)  # raises with the list of known names
    recipe = load_recipe_file(name_or_file)
    label = Path(name_or_file).stem
    if recipe.data is None:
        return BenchModel(label, recipe.arch.to_dict(), batch_size=recipe.train.physical_batch_size
                          if recipe.train else None)
    dataset = recipe.data.dataset
    return BenchModel(label, recipe.arch.to_dict(), in_channels=DATASET_CHANNELS[dataset],
                      image_size=recipe.data.image_size or DEFAULT_IMAGE_SIZE[dataset],
                      batch_size=min(recipe.train.physical_batch_size, recipe.train.batch_size) if recipe.train else None)


def bench_models(names: str, points: str | Path | None = None, n: int = 5, *, seed: int = 0) -> list[BenchModel]:
    """The models of comma-separated `names` (registered names, ArchConfig or recipe files), then `n` seeded random
    points of the study file `points` if given; every one resolved before anything runs (ValueError or OSError)."""
    models = [resolve_model(name.strip()) for name in names.split(",") if name.strip()]
    if points:
        models += study_points(points, n, seed=seed)
    if not models:  # nothing to time: a run would write an empty table over a results file
        raise ValueError(f"--models {names!r} names no model (give names, ArchConfig or recipe files, or --points)")
    return models


def add_model_options(parser: argparse.ArgumentParser, *, default: str, batch_size: bool = True) -> None:
    """The options that pick a per-model benchmark's models: ``--models``, ``--points STUDY --n K`` (what
    :func:`bench_models` takes) and, unless `batch_size` is False, ``--batch-size`` for the named models."""
    parser.add_argument("--models", default=default, help=f"names, ArchConfig or recipe files (default {default})")
    parser.add_argument("--points", metavar="STUDY_FILE", help="also --n seeded random points of this study's space")
    parser.add_argument("--n", type=int, default=5)
    if batch_size:
        parser.add_argument("--batch-size", type=int, default=32, help="of named models; points use their study's")


def models_from_options(parser: argparse.ArgumentParser, args: argparse.Namespace) -> list[BenchModel]:
    """The models :func:`add_model_options`'s options name, all resolved before anything runs; an unknown name or a
    broken file is a usage error (``parser.error``)."""
    try:
        return bench_models(args.models, args.points, args.n)
    except (ValueError, OSError) as err:
        parser.error(str(err))


def study_points(study_file: str | Path, n: int, *, seed: int = 0) -> list[BenchModel]:
    """`n` distinct random points of a study's space (seeded), each at the shape and physical batch its trials train
    at: the search's resolution (``[fidelity] image_size``, else ``[data]``'s) and, under TAN, the TAN batch."""
    import optuna

    from dpnas.data.datasets import DATASET_CHANNELS, DEFAULT_IMAGE_SIZE
    from dpnas.search.fidelity import search_image_size
    from dpnas.search.sampling import config_key, suggest
    from dpnas.search.study_file import load_study_file

    if n < 1:
        raise ValueError(f"--n must be >= 1, got {n}")
    spec = load_study_file(study_file)
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    study = optuna.create_study(sampler=optuna.samplers.RandomSampler(seed=seed))
    points: list[BenchModel] = []
    seen: set[str] = set()
    for _ in range(50 * n):  # a small space may hold fewer than n distinct points
        if len(points) == n:
            break
        trial = study.ask()
        try:
            configs = suggest(trial, spec)
        except ConfigError:
            continue
        finally:
            study.tell(trial, 0.0)
        key = config_key(configs)
        if key in seen:
            continue
        seen.add(key)
        arch, train, _ = configs
        batch = spec.fidelity.tan_batch or train.batch_size  # a TAN trial trains at its own batch
        points.append(BenchModel(f"{spec.name}#{len(points)}", arch.to_dict(),
                                 in_channels=DATASET_CHANNELS[spec.dataset],
                                 image_size=search_image_size(spec) or DEFAULT_IMAGE_SIZE[spec.dataset],
                                 batch_size=min(train.physical_batch_size, batch)))
    if not points:
        raise ValueError(f"{study_file}: no valid point of its space found")
    if len(points) < n:  # a table of fewer rows than asked for says why
        print(f"{study_file}: {len(points)} distinct points found in {50 * n} draws, fewer than --n {n}",
              file=sys.stderr)
    return points


def parse_variant(variant: str) -> frozenset[str]:
    """``fp32`` or a ``+``-joined set of VARIANT_OPTIONS, e.g. ``bf16+channels_last``."""
    if variant == "fp32":
        return frozenset()
    options = variant.split("+")
    unknown = [o for o in options if o not in VARIANT_OPTIONS]
    if unknown or not options:
        raise ValueError(f"unknown variant {variant!r}; expected fp32 or a '+'-joined set of {', '.join(VARIANT_OPTIONS)}")
    return frozenset(options)


def synchronize(device: torch.device) -> None:
    """Waits for the device's queued work, so a timer reads what it ran (a no-op on CPU)."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def run_case(*, model: dict[str, Any], mode: str, batch_size: int, steps: int, warmup: int, device: str,
             variant: str = "fp32") -> dict[str, Any]:
    """Time `steps` training steps of one model (a BenchModel's fields) in one mode and variant (after `warmup`
    untimed ones)."""
    dev = torch.device(device)
    case = _Case(model, mode, batch_size=batch_size, device=dev, variant=variant)
    for _ in range(warmup):
        case.step()
    synchronize(dev)
    for _ in range(steps):
        case.timed_step()
    return case.row(peak_memory=True)


def run_interleaved(*, model: dict[str, Any], modes: list[str], batch_size: int, steps: int, warmup: int,
                    device: str, variant: str = "fp32") -> list[dict[str, Any]]:
    """Time several modes of one model in one process, their steps taking turns (which mode goes first rotates
    from round to round): a machine's drift then reaches every mode alike, where separate processes can differ
    by 20-40 % on a shared machine. The modes sample the same Poisson batch sizes (the same seed), and each
    timed step is a whole one (the optimizer, and the noise where there is some). Peak memory is the process's,
    shared by the modes, so it is not reported (None): separate processes measure it. So is glibc's heap setting:
    once a dpnas or non-private case has set it (:func:`dpnas.dp.host_memory.keep_freed_host_memory`), Opacus's
    mode runs with it too, where in its own process it keeps glibc's default, as a user's script would."""
    dev = torch.device(device)
    cases = [_Case(model, mode, batch_size=batch_size, device=dev, variant=variant) for mode in modes]
    for _ in range(warmup):
        for case in cases:
            case.step()
    synchronize(dev)
    for round_ in range(steps):
        first = round_ % len(cases)
        for case in cases[first:] + cases[:first]:
            case.timed_step()
    return [case.row(peak_memory=False) for case in cases]


class _Case:
    """One model in one mode and variant, with its own data, model, optimizer and Poisson sampler, ready to step."""

    def __init__(self, model: dict[str, Any], mode: str, *, batch_size: int, device: torch.device, variant: str):
        import contextlib
        import warnings

        import torch.nn.functional as F

        from dpnas.arch.models import build_model
        from dpnas.dp.config import PrivacyConfig
        from dpnas.dp.engine import DPSGDEngine
        from dpnas.dp.host_memory import keep_freed_host_memory
        from dpnas.dp.privacy import plan_privacy, poisson_sample

        warnings.filterwarnings("ignore")
        dev = device
        torch.manual_seed(0)
        self.spec = spec = BenchModel(**model)
        self.mode, self.variant, self.device = mode, variant, dev
        self.batch_size = batch_size = spec.batch_size or batch_size
        self.times: list[float] = []
        self.sizes: list[int] = []
        self.dp = None
        n = batch_size * 16  # 16 expected batches per epoch: sample rate 1/16
        images = torch.randn(n, spec.in_channels, spec.image_size, spec.image_size)
        labels = torch.randint(0, 10, (n,))
        model = build_model(ArchConfig.from_dict(spec.arch), num_classes=10, in_channels=spec.in_channels).to(dev)
        optimizer = torch.optim.SGD(model.parameters(), lr=1e-3, momentum=0.9)
        privacy = PrivacyConfig(epsilon=8.0, delta=1e-5, max_grad_norm=1.0)
        options = parse_variant(variant)
        if mode in OPACUS_MODES and options:
            raise ValueError(f"mode {mode} runs in the fp32 variant only, not {variant}")
        torch.backends.cudnn.benchmark = "cudnn_benchmark" in options
        bf16 = "bf16" in options
        channels_last = "channels_last" in options
        if dev.type == "cuda":
            torch.cuda.reset_peak_memory_stats(dev)

        if mode == "opacus":
            from opacus import PrivacyEngine
            from torch.utils.data import DataLoader, TensorDataset

            engine = PrivacyEngine(accountant="rdp")
            loader = DataLoader(TensorDataset(images, labels), batch_size=batch_size)
            model, optimizer, loader = engine.make_private_with_epsilon(
                module=model, optimizer=optimizer, data_loader=loader, target_epsilon=8.0, target_delta=1e-5,
                epochs=1, max_grad_norm=1.0, poisson_sampling=True, grad_sample_mode="hooks",
            )
            batches = iter(())

            def step() -> int:
                nonlocal batches
                try:
                    x, y = next(batches)
                except StopIteration:
                    batches = iter(loader)
                    x, y = next(batches)
                x, y = x.to(dev), y.to(dev)
                optimizer.zero_grad()
                F.cross_entropy(model(x), y).backward()
                optimizer.step()
                return len(y)

        elif mode.startswith("dpnas"):
            images, labels = images.to(dev), labels.to(dev)
            plan = plan_privacy(privacy, dataset_size=n, batch_size=batch_size, epochs=1)
            self.dp = dp = DPSGDEngine(
                model, optimizer, plan=plan, max_grad_norm=1.0, private=True, accountant=None,
                # the whole Poisson batch at once, as Opacus's default mode takes it (no chunking)
                physical_batch_size=n, noise_generator=torch.Generator(dev).manual_seed(0),
                per_sample="opacus" if mode == "dpnas_opacus_hooks" else "auto",
                per_sample_method=FIXED_METHOD_MODES.get(mode, "auto"), autocast=bf16, channels_last=channels_last)
            sampler = torch.Generator(dev).manual_seed(0)

            def step() -> int:
                idx = poisson_sample(n, plan.sample_rate, generator=sampler, device=dev)
                dp.step(images[idx], labels[idx])
                return len(idx)

        elif mode == "nonprivate":
            # dpnas's modes keep freed host memory (their engine sets it); the floor they are compared with does too
            keep_freed_host_memory()
            images, labels = images.to(dev), labels.to(dev)
            sampler = torch.Generator(dev).manual_seed(0)
            layout = torch.channels_last if channels_last else torch.contiguous_format
            model.to(memory_format=layout)

            def step() -> int:
                # the same Poisson batches (same seed, same sizes) as dpnas's modes, so step times compare like
                # with like
                idx = poisson_sample(n, batch_size / n, generator=sampler, device=dev)
                optimizer.zero_grad(set_to_none=True)
                with torch.autocast(dev.type, dtype=torch.bfloat16) if bf16 else contextlib.nullcontext():
                    logits = model(images[idx].contiguous(memory_format=layout))
                F.cross_entropy(logits.float(), labels[idx]).backward()
                optimizer.step()
                return len(idx)

        else:
            raise ValueError(f"unknown mode {mode!r}; expected one of: {', '.join(MODES)}")
        self.step = step

    def timed_step(self) -> None:
        start = time.perf_counter()
        self.sizes.append(self.step())
        synchronize(self.device)
        self.times.append(time.perf_counter() - start)

    def row(self, *, peak_memory: bool) -> dict[str, Any]:
        """The case's row: the median of its timed steps; the process's peak memory if `peak_memory`, else None."""
        step_seconds = statistics.median(self.times)
        # which method each layer ended up with
        methods = self.dp.clipper.method_counts() if self.dp is not None and self.dp.clipper is not None else {}
        peak_mb = None
        if peak_memory and self.device.type == "cuda":
            peak_mb = torch.cuda.max_memory_allocated(self.device) / 2**20
        elif peak_memory:  # ru_maxrss is in KiB on Linux: the whole process, torch itself included
            peak_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
        return {
            "model": self.spec.label,
            "arch": self.spec.arch,
            "input_shape": [self.spec.in_channels, self.spec.image_size, self.spec.image_size],
            "mode": self.mode,
            "variant": self.variant,
            "batch_size": self.batch_size,
            "device": str(self.device),
            "threads": torch.get_num_threads(),  # the case's own process: OMP_NUM_THREADS or torch's default
            "steps": len(self.times),
            "step_seconds": step_seconds,
            "samples_per_second": statistics.mean(self.sizes) / step_seconds,
            "timed_batch_sizes": self.sizes,  # Poisson: the realised size of each timed batch
            "peak_memory_mb": peak_mb,
            "memory_kind": None if peak_mb is None else "cuda_max_allocated" if self.device.type == "cuda"
            else "process_peak_rss",
            "per_sample_methods": methods,
        }


def run_benchmark(
    *, models: list[str | BenchModel], modes: list[str], batch_size: int, steps: int, warmup: int = 1, device: str | None = None,
    variants: list[str] = ("fp32",), repeats: int = 1, progress: bool = True, interleave: bool = False,
    on_case: Callable[[list[dict[str, Any]]], None] | None = None,
) -> list[dict[str, Any]]:
    """One row per (model, variant, mode), each case in its own process; with `interleave`, the modes of one
    model and variant in one process, their steps taking turns (:func:`run_interleaved`: steadier ratios, no
    peak memory).

    With ``repeats`` > 1 the whole list of cases runs that many times in turn, and each row reports the median
    of its repeats: on a shared machine a case's speed drifts from one process to the next (by 20-40 % on the
    2-core development machine), and taking turns spreads the drift over every case instead of a few.
    `on_case` receives the rows of the cases finished so far after each process (``dpnas bench --json`` writes
    them then: a run stopped by a time limit keeps what it measured). A case whose process fails (out of memory, a
    model the device cannot run) is a row with its ``error`` and the run goes on: one case of a GPU session's
    matrix must not cost the others.
    """
    if repeats < 1:
        raise ValueError(f"repeats must be >= 1, got {repeats}")
    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    # unknown names and unreadable files fail before any case runs
    models = [m if isinstance(m, BenchModel) else resolve_model(m) for m in models]
    labels = [m.label for m in models]
    if len(set(labels)) < len(labels):
        raise ValueError(f"two models share a label: {', '.join(labels)}")
    for mode in modes:
        if mode not in MODES:
            raise ValueError(f"unknown mode {mode!r}; expected one of: {', '.join(MODES)}")
    for variant in variants:
        parse_variant(variant)
    cases = [(m, variant, mode) for m in models for variant in variants for mode in modes
             if variant == "fp32" or mode not in OPACUS_MODES]  # Opacus's pipeline is fp32 NCHW
    # the settings that shaped every row's numbers, recorded in each (a row read alone, or a JSON kept from a run
    # that was stopped, must say how it was measured)
    settings = {"warmup": warmup, "repeats": repeats, "interleave": interleave}
    runs: dict[tuple[str, str, str], list[dict[str, Any]]] = {(m.label, v, mode): [] for m, v, mode in cases}
    failed: dict[tuple[str, str, str], dict[str, Any]] = {}  # the cases whose process failed, as rows
    # what each process runs: one case, or with `interleave` every mode of one model and variant
    processes: dict[tuple[str, str, str], tuple[BenchModel, str, list[str]]] = {}
    for model, variant, mode in cases:
        key = (model.label, variant, "" if interleave else mode)
        processes.setdefault(key, (model, variant, []))[2].append(mode)
    for repeat in range(repeats):
        for model, variant, process_modes in processes.values():
            name, what = model.label, "+".join(process_modes)
            if progress:
                of = f" (repeat {repeat + 1}/{repeats})" if repeats > 1 else ""
                print(f"  running {name} / {what} / {variant}{of} ...", file=sys.stderr, flush=True)
            args = dict(model=asdict(model), batch_size=batch_size, steps=steps, warmup=warmup, device=device,
                        variant=variant, **({"modes": process_modes} if interleave else {"mode": process_modes[0]}))
            try:
                result = run_in_own_process(args, label=f"{name}/{what}/{variant}")
            except CaseFailed as err:
                print(f"  {err}", file=sys.stderr, flush=True)
                for mode in process_modes:
                    failed[(name, variant, mode)] = {
                        "model": name, "mode": mode, "variant": variant, "batch_size": model.batch_size or batch_size,
                        "device": device, "step_seconds": None, "samples_per_second": None,
                        "peak_memory_mb": None, "error": err.reason}
                result = []
            for row in result if interleave else [result] if result else []:
                runs[(name, variant, row["mode"])].append(row)
            if on_case is not None:
                on_case(_rows(runs, failed, settings))
    return _rows(runs, failed, settings)


def _rows(runs: dict[tuple[str, str, str], list[dict[str, Any]]],
          failed: dict[tuple[str, str, str], dict[str, Any]] | None = None,
          settings: dict[str, Any] | None = None) -> list[dict[str, Any]]:
    """One row per case that has run at least once, with its ratio to the non-private step where that ran; a case
    that never ran without failing, its failure. Each row carries the run's `settings` (warmup, repeats, ...)."""
    failed = failed or {}
    rows = [{**(_median_of_repeats(repeated) if repeated else failed[key]), **(settings or {})}
            for key, repeated in runs.items() if repeated or key in failed]
    _add_ratios(rows)
    return rows


class CaseFailed(RuntimeError):
    """A benchmark case's process failed; `reason` is the last line it wrote (the exception)."""

    def __init__(self, label: str, stderr: str):
        lines = [line for line in stderr.strip().splitlines() if line.strip()]
        self.reason = lines[-1].strip() if lines else "no error output"
        super().__init__(f"benchmark case {label} failed: {self.reason}")


def run_in_own_process(args: dict[str, Any], *, label: str) -> dict[str, Any] | list[dict[str, Any]]:
    """One case (:func:`run_case`), or with ``modes`` in `args` several taking turns (:func:`run_interleaved`), in
    a fresh interpreter: no tuned per-sample methods, caches or allocator state carried over from another
    process, and its own peak memory."""
    result = subprocess.run([sys.executable, "-m", "dpnas.bench", json.dumps(args)], capture_output=True, text=True,
                            check=False)
    if result.returncode != 0:
        raise CaseFailed(label, result.stderr)
    return json.loads(result.stdout.strip().splitlines()[-1])


def _median_of_repeats(repeats: list[dict[str, Any]]) -> dict[str, Any]:
    """The repeat with the median step time (the lower middle one for an even count), with every repeat's
    step time and the highest peak memory of all of them."""
    ranked = sorted(repeats, key=lambda r: r["step_seconds"])
    row = dict(ranked[(len(ranked) - 1) // 2])
    row["repeat_step_seconds"] = [r["step_seconds"] for r in repeats]
    peaks = [r["peak_memory_mb"] for r in repeats if r["peak_memory_mb"] is not None]
    row["peak_memory_mb"] = max(peaks) if peaks else None  # None: interleaved modes share one process
    return row


def _add_ratios(rows: list[dict[str, Any]]) -> None:
    """Step time relative to the non-private step of the same model and variant, measured in the same run."""
    floor = {(r["model"], r.get("variant", "fp32")): r["step_seconds"] for r in rows if r["mode"] == "nonprivate"}
    for r in rows:
        base = floor.get((r["model"], r.get("variant", "fp32")))
        r["slowdown_vs_nonprivate"] = r["step_seconds"] / base if base and r["step_seconds"] else None


def format_table(rows: list[dict[str, Any]]) -> str:
    header = (f"{'model':<18} {'mode':<18} {'variant':<18} {'batch':>5} {'step s':>8} {'samples/s':>10} {'peak MB':>9} "
              f"{'x nonpriv':>9}")
    lines = [header, "-" * len(header)]
    for r in rows:
        if r.get("error"):
            lines.append(f"{r['model']:<18} {r['mode']:<18} {r.get('variant', 'fp32'):<18} {r['batch_size']:>5} "
                         f"failed: {r['error']}")
            continue
        ratio = f"{r['slowdown_vs_nonprivate']:.2f}" if r.get("slowdown_vs_nonprivate") else "-"
        peak = "-" if r["peak_memory_mb"] is None else f"{r['peak_memory_mb']:.0f}"
        lines.append(
            f"{r['model']:<18} {r['mode']:<18} {r.get('variant', 'fp32'):<18} {r['batch_size']:>5} "
            f"{r['step_seconds']:>8.3f} {r['samples_per_second']:>10.1f} {peak:>9} {ratio:>9}"
        )
    opacus = {r["model"]: r for r in rows if r["mode"] == "opacus"}
    for r in rows:
        if r["mode"] == "dpnas" and r["model"] in opacus and r["step_seconds"] and opacus[r["model"]]["step_seconds"]:
            speedup = opacus[r["model"]]["step_seconds"] / r["step_seconds"]
            lines.append(f"{r['model']}: Opacus-default step time / dpnas ({r.get('variant', 'fp32')}) step time = "
                         f"{speedup:.2f} (> 1: dpnas is faster)")
    return "\n".join(lines)


if __name__ == "__main__":  # one case, or interleaved modes, in its own process (see run_benchmark)
    _args = json.loads(sys.argv[1])
    print(json.dumps(run_interleaved(**_args) if "modes" in _args else run_case(**_args)))
