"""Whole-epoch training throughput: `dpnas train`'s pipeline against Opacus's default one.

Both train the same model for one epoch on the same synthetic CIFAR-shaped data at the same (eps, delta),
expected batch and physical batch. Opacus's default: a DataLoader with Poisson sampling over host tensors,
`make_private_with_epsilon`, hooks, BatchMemoryManager for the physical batch, fp32. Prints a table and
writes JSON (one run: compare the ratio, not the absolute numbers, on a shared machine).

    uv run python benchmarks/epoch_throughput.py --model tiny,resnet9_scalenorm --samples 2048 --batch-size 256 --physical 64

`--set amp=true --set channels_last=true` (any TrainConfig field) changes dpnas's side only: Opacus's default
pipeline is the fixed baseline.
"""

from __future__ import annotations

import argparse
import datetime
import platform
import sys
import time
import warnings

import torch
import torch.nn.functional as F

from dpnas.arch.models import build_model
from dpnas.arch.registry import get_arch
from dpnas.data.datasets import load_dataset
from dpnas.dp.config import PrivacyConfig, TrainConfig
from dpnas.dp.recipes import split_overrides
from dpnas.dp.train import train
from dpnas.results import writable_file, write_json


def opacus_epoch(arch, data, *, batch_size: int, physical: int, device: str) -> float:
    from opacus import PrivacyEngine
    from opacus.utils.batch_memory_manager import BatchMemoryManager
    from torch.utils.data import DataLoader, TensorDataset

    from dpnas.data.datasets import normalise

    torch.manual_seed(0)
    model = build_model(arch, num_classes=data.num_classes, in_channels=data.in_channels).to(device)
    optimizer = torch.optim.NAdam(model.parameters(), lr=2e-3)
    images = normalise(data.train.images, data.mean, data.std)  # host tensors, as a user would hold them
    loader = DataLoader(TensorDataset(images, data.train.labels), batch_size=batch_size)
    engine = PrivacyEngine(accountant="rdp")
    model, optimizer, loader = engine.make_private_with_epsilon(
        module=model, optimizer=optimizer, data_loader=loader, target_epsilon=8.0, target_delta=1e-5, epochs=1,
        max_grad_norm=1.0, poisson_sampling=True)
    start = time.perf_counter()
    seen = 0
    with BatchMemoryManager(data_loader=loader, max_physical_batch_size=physical, optimizer=optimizer) as batches:
        for x, y in batches:
            x, y = x.to(device), y.to(device)
            optimizer.zero_grad()
            F.cross_entropy(model(x), y).backward()
            optimizer.step()
            seen += len(y)
    if device.startswith("cuda"):
        torch.cuda.synchronize()
    return seen / (time.perf_counter() - start)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="tiny", help="registered architecture name(s), comma-separated")
    parser.add_argument("--samples", type=int, default=2048)
    parser.add_argument("--batch-size", type=int, default=256)
    parser.add_argument("--physical", type=int, default=64)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--json", type=writable_file, default="benchmarks/epoch_throughput.json")
    parser.add_argument("--set", dest="assignments", action="append", default=[], metavar="FIELD=VALUE",
                        help="a TrainConfig field for dpnas's side (repeatable), e.g. --set amp=true")
    args = parser.parse_args(argv)
    arch_fields, dpnas_options, privacy_fields = split_overrides(args.assignments)
    if arch_fields or privacy_fields:
        parser.error("--set takes TrainConfig fields only (the model and the budget are the baseline's too)")
    warnings.filterwarnings("ignore")
    data = load_dataset("synthetic", synthetic_size=args.samples, val_fraction=0.0)
    cfg = TrainConfig(epochs=1, batch_size=args.batch_size, physical_batch_size=args.physical, optimizer="nadam",
                      lr=2e-3, val_fraction=0.0, **dpnas_options)
    print(f"{args.samples} synthetic samples, B={args.batch_size}, physical {args.physical}, {args.device}, "
          f"dpnas options {dpnas_options or 'none'}")
    print(f"{'model':<20} {'opacus samples/s':>17} {'dpnas samples/s':>16} {'dpnas / opacus':>15}")
    rows = []
    for name in args.model.split(","):
        arch = get_arch(name)
        result = train(arch, data, train_cfg=cfg, privacy=PrivacyConfig(epsilon=8.0), device=args.device, progress=False)
        opacus_rate = opacus_epoch(arch, data, batch_size=args.batch_size, physical=args.physical, device=args.device)
        dpnas_rate = result["samples_per_second"]
        rows.append({"model": name, "opacus_default_samples_per_second": opacus_rate,
                     "dpnas_train_samples_per_second": dpnas_rate, "per_sample": result["per_sample"],
                     "dpnas_options": dpnas_options,
                     "ratio": dpnas_rate / opacus_rate})
        print(f"{name:<20} {opacus_rate:>17.1f} {dpnas_rate:>16.1f} {dpnas_rate / opacus_rate:>14.2f}x", flush=True)
        # after each model: a run stopped by a time limit (a GPU session's) keeps the models it finished
        write_json(args.json, {"date": datetime.date.today().isoformat(), "command": " ".join(sys.argv),
                               "machine": platform.machine(), "cpu_threads": torch.get_num_threads(),
                               "torch": torch.__version__, "args": vars(args), "rows": rows})


if __name__ == "__main__":
    main()
