"""What a physical batch equal to the expected Poisson batch costs: a second, small pass in about half the steps.

DP-SGD's Poisson batches vary in size (Binomial(n, q), mean B, sd about sqrt(B)). With ``physical_batch_size = B``,
every batch larger than B is computed in two chunks, B rows and a few more, and the small one costs a whole extra
forward, backward and per-sample pass. Here one engine per physical batch size, each on the same model, takes
the same Poisson batches of a study's data in turn (`--physical`, default the study's expected batch and the
study's own setting), with the study's noise and optimizer: the mean time of a whole DP step, and how many steps
were split into more than one chunk.

    uv run python benchmarks/poisson_chunks.py --study studies/quickstart.toml --n 5
    uv run python benchmarks/poisson_chunks.py --study studies/quickstart.toml --physical 256,320,512 --steps 100

Prints a table and writes JSON (`--json`, default benchmarks/poisson_chunks.json).
"""

from __future__ import annotations

import argparse
import datetime
import math
import platform
import statistics
import sys
import time

import torch

from dpnas.arch.models import build_model
from dpnas.arch.space import ArchConfig
from dpnas.bench import study_points
from dpnas.data.datasets import normalise
from dpnas.dp.engine import DPSGDEngine
from dpnas.dp.host_memory import keep_freed_host_memory
from dpnas.dp.privacy import plan_privacy, poisson_sample
from dpnas.dp.train import make_optimizer
from dpnas.results import writable_file, write_json
from dpnas.search.fidelity import load_search_data
from dpnas.search.study_file import load_study_file


def point_row(point, spec, data, physical: list[int], *, steps: int, seed: int) -> dict:
    """Mean ms of a DP step at each physical batch size, the engines taking the same batches in turn."""
    train_cfg = spec.train
    # the study's per-run privacy (a total_epsilon study's runs get less ε: more noise, the same arithmetic)
    plan = plan_privacy(spec.privacy, dataset_size=len(data.train), batch_size=train_cfg.batch_size,
                        epochs=train_cfg.epochs)
    engines = []
    for size in physical:
        torch.manual_seed(0)
        net = build_model(ArchConfig.from_dict(point.arch), num_classes=data.num_classes,
                          in_channels=data.in_channels, image_size=data.image_size)
        engines.append(DPSGDEngine(net, make_optimizer(net, train_cfg), plan=plan,
                                   max_grad_norm=spec.privacy.max_grad_norm, private=True, accountant=None,
                                   physical_batch_size=size, noise_generator=torch.Generator().manual_seed(seed)))
    sampling = torch.Generator().manual_seed(seed)  # a benchmark's batches: nothing here is released
    times: list[list[float]] = [[] for _ in physical]
    split = [0 for _ in physical]  # steps computed in more than one chunk
    warmup = 3  # the first steps time each layer's per-sample methods
    for step in range(warmup + steps):
        idx = poisson_sample(len(data.train), plan.sample_rate, generator=sampling, device="cpu")
        images, labels = normalise(data.train.images[idx], data.mean, data.std), data.train.labels[idx]
        order = [(step + j) % len(engines) for j in range(len(engines))]  # each engine in each place in turn
        for i in order:
            start = time.perf_counter()
            engines[i].step(images, labels)
            if step >= warmup:
                times[i].append(time.perf_counter() - start)
                split[i] += len(idx) > physical[i]
    ms = {str(size): statistics.mean(t) * 1e3 for size, t in zip(physical, times)}
    return {"model": point.label, "arch": point.arch, "expected_batch": plan.expected_batch_size,
            "sample_rate": plan.sample_rate, "steps": steps, "mean_step_ms": ms,
            "split_steps": dict(zip(map(str, physical), split)),
            "x_first_over_last": ms[str(physical[0])] / ms[str(physical[-1])]}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--study", default="studies/quickstart.toml", help="its data, recipe, privacy and space")
    parser.add_argument("--n", type=int, default=5, help="seeded random points of the study's space")
    parser.add_argument("--physical", help="physical batch sizes to compare (default: the study's batch size and "
                                           "its physical batch size)")
    parser.add_argument("--steps", type=int, default=60, help="timed steps per point (after 3 warm-up steps)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--json", type=writable_file, default="benchmarks/poisson_chunks.json")
    args = parser.parse_args(argv)
    keep_freed_host_memory()
    spec = load_study_file(args.study)
    physical = ([int(v) for v in args.physical.split(",")] if args.physical
                else [spec.train.batch_size, spec.train.physical_batch_size])
    data = load_search_data(spec)
    rows = []
    for point in study_points(args.study, args.n, seed=args.seed):
        print(f"  {point.label} ...", file=sys.stderr, flush=True)
        rows.append(point_row(point, spec, data, physical, steps=args.steps, seed=args.seed))
    q = rows[0]["sample_rate"] if rows else math.nan
    header = f"{'model':<16}" + "".join(f" {'ms @ ' + str(p):>11} {'split':>6}" for p in physical) + "   x"
    print(header)
    print("-" * len(header))
    for r in rows:
        cells = "".join(f" {r['mean_step_ms'][str(p)]:>11.2f} {r['split_steps'][str(p)]:>6}" for p in physical)
        print(f"{r['model']:<16}{cells} {r['x_first_over_last']:>5.3f}")
    print(f"{len(data.train)} training records, q = {q:.4f}; split: steps (of {args.steps}) computed in more than "
          "one chunk")
    write_json(args.json, {
        "benchmark": "poisson_chunks",
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "command": "python benchmarks/poisson_chunks.py " + " ".join(argv if argv is not None else sys.argv[1:]),
        "machine": {"platform": platform.platform(), "threads": torch.get_num_threads()},
        "torch": torch.__version__,
        "study": str(args.study),
        "physical": physical,
        "rows": rows,
    })
    print(f"written to {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
