"""The end of a DP step on dpnas's per-sample path: noise, scaling, the accountant's hook, the optimizer's step.

dpnas's clipped sum is already in each parameter's ``summed_grad`` when the step ends. Until the sixth pass of
issue 17 the engine then called Opacus's ``DPOptimizer.step()`` with empty per-sample gradients, which first clips
and sums those (about 25 small operations per parameter on empty tensors) before its noise; now the engine calls
the parts that follow in the same order (``add_noise``, ``scale_grad``, the step hook, the wrapped optimizer's
step). Both run here on the same engine, taking turns (median of ``--rounds``), for each model: the time of one
noisy step, less the time of setting the clipped sums it starts from.

    uv run python benchmarks/noisy_step.py --models "" --points studies/quickstart.toml --n 5
    uv run python benchmarks/noisy_step.py --models smoothnet,resnet9_scalenorm,wrn16_4

Prints a table and writes JSON (`--json`, default benchmarks/noisy_step.json).
"""

from __future__ import annotations

import argparse
import datetime
import platform
import statistics
import sys
import time
import warnings

import torch

from dpnas.arch.models import build_model
from dpnas.arch.space import ArchConfig
from dpnas.bench import BenchModel, add_model_options, models_from_options
from dpnas.dp.config import PrivacyConfig
from dpnas.dp.engine import DPSGDEngine
from dpnas.dp.host_memory import keep_freed_host_memory
from dpnas.dp.privacy import plan_privacy
from dpnas.results import writable_file, write_json


def through_dpoptimizer_step(engine: DPSGDEngine) -> None:
    """The engine's noisy step before: DPOptimizer.step() on empty per-sample gradients."""
    for p in engine.optimizer.params:
        p.grad_sample = torch.zeros((0, *p.shape), device=p.device, dtype=p.dtype)
    engine.optimizer.step()
    engine.optimizer.zero_grad(set_to_none=True)


def model_row(model: BenchModel, *, rounds: int) -> dict:
    torch.manual_seed(0)
    net = build_model(ArchConfig.from_dict(model.arch), num_classes=10, in_channels=model.in_channels)
    batch = model.batch_size or 32
    plan = plan_privacy(PrivacyConfig(epsilon=8.0, delta=1e-5, max_grad_norm=1.0), dataset_size=16 * batch,
                        batch_size=batch, epochs=1)
    engine = DPSGDEngine(net, torch.optim.NAdam(net.parameters(), lr=1e-3), plan=plan, max_grad_norm=1.0,
                         private=True, accountant=None, physical_batch_size=batch,
                         noise_generator=torch.Generator().manual_seed(0))

    def clipped_sums() -> None:  # what both start from
        for p in engine.optimizer.params:
            p.summed_grad = torch.zeros_like(p)

    variants = {"setting the sums": clipped_sums,
                "DPOptimizer.step()": lambda: (clipped_sums(), through_dpoptimizer_step(engine)),
                "dpnas": lambda: (clipped_sums(), engine._noisy_step())}
    times: dict[str, list[float]] = {name: [] for name in variants}
    for round_ in range(rounds + 5):  # the first five warm up
        for name, run in variants.items():
            start = time.perf_counter()
            run()
            if round_ >= 5:
                times[name].append(time.perf_counter() - start)
    base = statistics.median(times["setting the sums"])
    ms = {name: (statistics.median(t) - base) * 1e3 for name, t in times.items() if name != "setting the sums"}
    return {"model": model.label, "parameters": len(engine.optimizer.params), "ms": ms,
            "x": ms["DPOptimizer.step()"] / ms["dpnas"]}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    add_model_options(parser, default="tiny", batch_size=False)
    parser.add_argument("--rounds", type=int, default=200, help="timed rounds (median reported)")
    parser.add_argument("--json", type=writable_file, default="benchmarks/noisy_step.json")
    args = parser.parse_args(argv)
    if args.rounds < 1:
        parser.error("--rounds must be >= 1")
    models = models_from_options(parser, args)  # unknown names fail before any model runs
    warnings.filterwarnings("ignore")
    keep_freed_host_memory()
    rows = [model_row(model, rounds=args.rounds) for model in models]
    print(f"{'model':<20} {'params':>6} {'DPOptimizer.step() ms':>22} {'dpnas ms':>9} {'x':>6}")
    for r in rows:
        print(f"{r['model']:<20} {r['parameters']:>6} {r['ms']['DPOptimizer.step()']:>22.3f} {r['ms']['dpnas']:>9.3f} "
              f"{r['x']:>6.2f}")
    write_json(args.json, {"benchmark": "noisy_step", "date": datetime.date.today().isoformat(),
                           "command": " ".join(["python", "benchmarks/noisy_step.py", *(argv or sys.argv[1:])]),
                           "machine": {"platform": platform.platform(), "threads": torch.get_num_threads()},
                           "torch": torch.__version__, "rows": rows})
    print(f"written to {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
