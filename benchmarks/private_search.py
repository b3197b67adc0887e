"""A whole private search at a total ε against one hand-made Opacus run at the same ε, on digits (not a test).

* ``dpnas``: the quickstart's space (tiny SmoothNet-style CNNs; norm, activation, pooling, skip, width, lr, C) as a
  study at ``[privacy] total_epsilon = E``: every trial's DP-SGD, every noisy validation score and the release
  of the best trial's stored model together cost at most E. Two ways to spend it:
  ``fixed`` (TPE + median pruner, K trials composed) and ``random-K`` (random search, K ~ geometric with mean
  ``--mean-trials``, Papernot & Steinke).
* ``opacus``: what a user would write by hand: a small GroupNorm/SELU CNN, Adam, fixed hyperparameters, trained
  once with plain Opacus ``make_private_with_epsilon`` at ε = E on the same training records plus the validation
  records (a single run needs no validation split).

Reported over ``--seeds`` study seeds: the released model's accuracy on digits' fixed test split (mean and spread),
wall time, and the ε breakdown (training records, validation records, per run, σ, validation noise). The test split
is read only here, after the release. Prints a table and writes JSON.

    uv run python benchmarks/private_search.py --epsilons 8,3 --seeds 0,1,2 --json benchmarks/private_search.json
"""

from __future__ import annotations

import argparse
import re
import statistics
import tempfile
import time
from pathlib import Path

import torch
from torch import nn

from dpnas.data.datasets import load_dataset, normalise
from dpnas.dp.checkpoint import evaluate_checkpoint
from dpnas.results import writable_file, write_json
from dpnas.search.runner import search
from dpnas.search.study_file import load_study_file
from dpnas.search.study_privacy import study_privacy
from dpnas.search.study_report import export_best_weights

QUICKSTART = Path(__file__).resolve().parents[1] / "studies" / "quickstart.toml"


def study_text(*, total: float, seed: int, mode: str, trials: int, mean_trials: float, epochs: int) -> str:
    text = re.sub(r"^(total_)?epsilon = [0-9.]+", f"total_epsilon = {total}", QUICKSTART.read_text(), flags=re.M)
    text = text.replace("epochs = 8", f"epochs = {epochs}")
    text = text.replace("seed = 0", f"seed = {seed}").replace('name = "quickstart"', f'name = "private-{mode}-{seed}"')
    if mode == "fixed":
        return text.replace("n_trials = 6", f"n_trials = {trials}")
    return (text.replace("n_trials = 6", f'trial_count = "truncated_negative_binomial"\neta = 1.0\n'
                                         f"gamma = {1 / mean_trials}")
            .replace('sampler = "tpe"', 'sampler = "random"').replace('pruner = "median"', 'pruner = "none"'))


def run_study(folder: Path, **kwargs) -> dict:
    path = folder / f"study-{kwargs['mode']}-{kwargs['seed']}-{kwargs['total']}-{kwargs['epochs']}.toml"
    path.write_text(study_text(**kwargs))
    spec = load_study_file(path)
    started = time.perf_counter()
    study = search(spec, progress=False)
    wall = time.perf_counter() - started
    weights = export_best_weights(study, spec.default_storage(), folder / f"{path.stem}.pt")[0]
    released = evaluate_checkpoint(weights, device="cpu")  # the released model, scored once on the test split
    privacy = study_privacy(study)
    return {
        "method": f"dpnas {kwargs['mode']}", "seed": kwargs["seed"], "total_epsilon": kwargs["total"],
        "test_accuracy": released["test_accuracy"], "wall_seconds": wall, "runs": privacy.runs,
        "epsilon": privacy.epsilon, "training_epsilon": privacy.training_epsilon,
        "validation_epsilon": privacy.validation_epsilon, "per_run_epsilon": privacy.per_run_epsilon,
        "noise_multipliers": privacy.budget["noise_multipliers"], "val_noise": privacy.budget["val_noise"],
        "val_releases": privacy.budget["val_releases"], "mode": privacy.mode,
    }


class HandMadeCNN(nn.Module):
    """What a user would write for digits: three GroupNorm/SELU conv blocks and a linear head."""

    def __init__(self, classes: int = 10):
        super().__init__()

        def block(c_in, c_out):
            return nn.Sequential(nn.Conv2d(c_in, c_out, 3, padding=1), nn.GroupNorm(4, c_out), nn.SELU(),
                                 nn.MaxPool2d(2))

        self.features = nn.Sequential(block(1, 16), block(16, 32), block(32, 32))
        self.head = nn.Linear(32 * 4 * 4, classes)

    def forward(self, x):
        return self.head(self.features(x).flatten(1))


def run_opacus(*, total: float, seed: int, epochs: int, batch_size: int, lr: float) -> dict:
    from opacus import PrivacyEngine
    from torch.utils.data import DataLoader, TensorDataset

    data = load_dataset("digits", seed=seed)
    images = normalise(torch.cat([data.train.images, data.val.images]), data.mean, data.std)
    labels = torch.cat([data.train.labels, data.val.labels])
    torch.manual_seed(seed)
    model = HandMadeCNN()
    optimizer = torch.optim.Adam(model.parameters(), lr=lr)
    loader = DataLoader(TensorDataset(images, labels), batch_size=batch_size, shuffle=True)
    engine = PrivacyEngine()
    started = time.perf_counter()
    model, optimizer, loader = engine.make_private_with_epsilon(
        module=model, optimizer=optimizer, data_loader=loader, target_epsilon=total, target_delta=1e-5,
        epochs=epochs, max_grad_norm=1.0)
    model.train()
    for _ in range(epochs):
        for x, y in loader:
            if len(y) == 0:
                continue
            optimizer.zero_grad()
            nn.functional.cross_entropy(model(x), y).backward()
            optimizer.step()
    wall = time.perf_counter() - started
    model.eval()
    with torch.no_grad():
        test = normalise(data.test.images, data.mean, data.std)
        accuracy = float((model(test).argmax(1) == data.test.labels).float().mean())
    spent = engine.get_epsilon(1e-5)
    return {"method": "opacus (one hand-made run)", "seed": seed, "total_epsilon": total, "test_accuracy": accuracy,
            "wall_seconds": wall, "runs": 1, "epsilon": spent, "training_epsilon": spent,
            "validation_epsilon": 0.0, "per_run_epsilon": spent, "noise_multipliers": [optimizer.noise_multiplier],
            "val_noise": [], "val_releases": 0, "mode": "single run"}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--epsilons", default="8,3")
    parser.add_argument("--seeds", default="0,1,2")
    parser.add_argument("--modes", default="fixed,random-K")
    parser.add_argument("--trials", type=int, default=6, help="K of the fixed mode")
    parser.add_argument("--mean-trials", type=float, default=5.0, help="E[K] of the random-K mode (geometric)")
    parser.add_argument("--epochs", type=int, default=8, help="epochs of every trial (the quickstart's 8)")
    parser.add_argument("--opacus-epochs", type=int, default=15)
    parser.add_argument("--opacus-batch-size", type=int, default=256)
    parser.add_argument("--opacus-lr", type=float, default=5e-3)
    parser.add_argument("--json", type=writable_file, default=Path("benchmarks/private_search.json"))
    args = parser.parse_args()
    epsilons = [float(e) for e in args.epsilons.split(",")]
    seeds = [int(s) for s in args.seeds.split(",")]
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for total in epsilons:
            for seed in seeds:
                for mode in args.modes.split(","):
                    rows.append(run_study(Path(tmp), total=total, seed=seed, mode=mode, trials=args.trials,
                                          mean_trials=args.mean_trials, epochs=args.epochs))
                    print(rows[-1], flush=True)
                rows.append(run_opacus(total=total, seed=seed, epochs=args.opacus_epochs,
                                       batch_size=args.opacus_batch_size, lr=args.opacus_lr))
                print(rows[-1], flush=True)
    summary = []
    for total in epsilons:
        for method in dict.fromkeys(r["method"] for r in rows):
            group = [r for r in rows if r["method"] == method and r["total_epsilon"] == total]
            accuracies = [r["test_accuracy"] for r in group]
            summary.append({
                "method": method, "total_epsilon": total, "seeds": len(group),
                "test_accuracy_mean": statistics.mean(accuracies),
                "test_accuracy_min": min(accuracies), "test_accuracy_max": max(accuracies),
                "wall_seconds_mean": statistics.mean(r["wall_seconds"] for r in group),
                "epsilon_max": max(r["epsilon"] for r in group),
                "training_epsilon_max": max(r["training_epsilon"] for r in group),
                "validation_epsilon_max": max(r["validation_epsilon"] for r in group),
                "per_run_epsilon": max(r["per_run_epsilon"] for r in group),
                "runs": [r["runs"] for r in group],
            })
    print(f"\n{'method':28} {'total ε':>7} {'test acc mean [min, max]':>26} {'wall s':>7} {'ε spent':>8} "
          f"{'ε train':>8} {'ε val':>6} {'ε/run':>6}  runs")
    for s in summary:
        print(f"{s['method']:28} {s['total_epsilon']:7g} {s['test_accuracy_mean']:10.3f} "
              f"[{s['test_accuracy_min']:.3f}, {s['test_accuracy_max']:.3f}] {s['wall_seconds_mean']:7.1f} "
              f"{s['epsilon_max']:8.3f} {s['training_epsilon_max']:8.3f} {s['validation_epsilon_max']:6.3f} "
              f"{s['per_run_epsilon']:6.3f}  {s['runs']}")
    write_json(args.json, {"rows": rows, "summary": summary, "args": {k: str(v) for k, v in vars(args).items()}})
    print(f"wrote {args.json}")


if __name__ == "__main__":
    main()
