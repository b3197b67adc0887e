"""Search quality on digits at a fixed per-run ε: reference points vs random search vs TPE (not a test).

Each method gets the same trial budget on scikit-learn's bundled digits:

* ``reference``: the named `tiny` point with its default recipe (lr 2e-3, C 1), one run;
* ``random``: random search over the quickstart's conditional space, with lr and C;
* ``tpe``: TPE over the same space.

Reported per method: best validation accuracy, the test accuracy of the best trial's *stored* model (scored
again from its checkpoint, no retraining), trials wasted (invalid or repeated proposals), the search's ε
(composition of every run that touched the data), and wall time. Prints a table and writes JSON.

    uv run python benchmarks/search_quality.py --trials 8 --epochs 8 --epsilon 3 --json benchmarks/search_quality.json
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import optuna
from optuna.trial import TrialState

from dpnas.dp.checkpoint import evaluate_checkpoint
from dpnas.results import writable_file, write_json
from dpnas.search.runner import best_trials, search
from dpnas.search.study_file import load_study_file
from dpnas.search.study_privacy import study_privacy
from dpnas.search.study_report import export_best_weights

STUDY = """
[study]
name = "{name}"
n_trials = {trials}
sampler = "{sampler}"
pruner = "none"
seed = {seed}

[data]
dataset = "digits"
val_fraction = 0.2

[privacy]
epsilon = {epsilon}
delta = 1e-5

[train]
recipe = "quick"
epochs = {epochs}
batch_size = 256
physical_batch_size = 256

[arch]
base = "tiny"

[search]
{search}
"""

SPACE = """norm = ["group", "layer", "none"]
activation = ["selu", "relu", "mish"]
pool = ["max_smooth", "none"]
skip = ["dense", "residual"]
width = { low = 0.5, high = 2.0, step = 0.5 }
lr = { low = 5e-3, high = 3e-2, log = true }
max_grad_norm = { low = 0.5, high = 4.0, log = true }"""

# the reference point alone: a one-value axis makes a one-point grid at the recipe's defaults
REFERENCE = 'activation = ["selu"]'


def run_method(name: str, sampler: str, search_text: str, *, trials: int, epochs: int, epsilon: float, seed: int,
               folder: Path) -> dict:
    path = folder / f"{name}.toml"
    path.write_text(STUDY.format(name=name, trials=trials, sampler=sampler, seed=seed, epsilon=epsilon,
                                 epochs=epochs, search=search_text))
    spec = load_study_file(path)
    started = time.perf_counter()
    study = search(spec, progress=False)
    wall = time.perf_counter() - started
    study = optuna.load_study(study_name=spec.name, storage=study._storage)
    all_trials = study.get_trials()
    wasted = sum(1 for t in all_trials if "duplicate_of" in t.user_attrs
                 or "invalid combination" in str(t.user_attrs.get("failure_reason", "")))
    best = best_trials(study)[0]
    weights = export_best_weights(study, spec.default_storage(), folder / f"{name}-best.pt")[0]
    scored = evaluate_checkpoint(weights, device="cpu")
    privacy = study_privacy(study)
    return {
        "method": name,
        "trials_trained": sum(1 for t in all_trials if t.state == TrialState.COMPLETE),
        "trials_wasted": wasted,
        "best_val_accuracy": best.values[0],
        "best_test_accuracy_stored_model": scored["test_accuracy"],
        "best_params": best.params,
        "per_run_epsilon": privacy.per_run_epsilon,
        "search_epsilon": privacy.epsilon,
        "search_mode": privacy.mode,
        "wall_seconds": wall,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--trials", type=int, default=8)
    parser.add_argument("--epochs", type=int, default=8)
    parser.add_argument("--epsilon", type=float, default=3.0)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--methods", default="reference,random,tpe")
    parser.add_argument("--json", type=writable_file, dest="json_file", default="benchmarks/search_quality.json")
    args = parser.parse_args()
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    rows = []
    with tempfile.TemporaryDirectory(prefix="dpnas-search-quality-") as folder:
        for method in args.methods.split(","):
            sampler, text, trials = {"reference": ("grid", REFERENCE, 1), "random": ("random", SPACE, args.trials),
                                     "tpe": ("tpe", SPACE, args.trials)}[method]
            rows.append(run_method(method, sampler, text, trials=trials, epochs=args.epochs, epsilon=args.epsilon,
                                   seed=args.seed, folder=Path(folder)))
            print(f"{method}: done in {rows[-1]['wall_seconds']:.0f} s", flush=True)
    header = f"{'method':<10} {'trained':>7} {'wasted':>6} {'best val':>8} {'test (stored)':>13} {'run eps':>7} " \
             f"{'search eps':>10} {'wall s':>7}"
    print(header)
    for r in rows:
        print(f"{r['method']:<10} {r['trials_trained']:>7} {r['trials_wasted']:>6} {r['best_val_accuracy']:>8.4f} "
              f"{r['best_test_accuracy_stored_model']:>13.4f} {r['per_run_epsilon']:>7.2f} {r['search_epsilon']:>10.2f} "
              f"{r['wall_seconds']:>7.0f}")
    write_json(args.json_file, {"args": vars(args), "rows": rows})
    print(f"rows written to {args.json_file}")


if __name__ == "__main__":
    main()
