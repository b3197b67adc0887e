"""Freed host memory stays in the training process (dpnas.dp.host_memory): a large block comes from the heap, not
from mmap, and is kept after it is freed; glibc's default maps it and gives it back. Every training engine sets it."""

import json
import platform
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import dpnas.dp.host_memory as host_memory
from dpnas.dp.engine import DPSGDEngine
from dpnas.dp.privacy import PrivacyPlan

MODULE = Path(host_memory.__file__)
# A fresh interpreter that loads only this module (no torch, whose imports could already have raised glibc's
# dynamic threshold), then allocates and frees one 8 MiB block and reads malloc's own statistics (mallinfo2).
PROBE = """
import ctypes, importlib.util, json, sys
spec = importlib.util.spec_from_file_location("host_memory", sys.argv[1])
module = importlib.util.module_from_spec(spec)
spec.loader.exec_module(module)
applied = module.keep_freed_host_memory() if sys.argv[2] == "keep" else False

class MallInfo2(ctypes.Structure):
    _fields_ = [(name, ctypes.c_size_t) for name in
                ("arena", "ordblks", "smblks", "hblks", "hblkhd", "usmblks", "fsmblks", "uordblks", "fordblks",
                 "keepcost")]

libc = ctypes.CDLL(None)
libc.mallinfo2.restype = MallInfo2
libc.malloc.restype, libc.malloc.argtypes = ctypes.c_void_p, [ctypes.c_size_t]
libc.free.argtypes = [ctypes.c_void_p]
size = 8 * 2**20
before = libc.mallinfo2()
block = libc.malloc(size)
ctypes.memset(block, 1, size)
during = libc.mallinfo2()
libc.free(block)
after = libc.mallinfo2()
print(json.dumps({"applied": applied, "size": size, "mapped": during.hblkhd - before.hblkhd,
                  "kept_after_free": after.fordblks - before.fordblks}))
"""

glibc_only = pytest.mark.skipif(platform.libc_ver()[0] != "glibc", reason="mallopt and mallinfo2 are glibc's")


def probe(mode: str, **env) -> dict:
    result = subprocess.run([sys.executable, "-c", PROBE, str(MODULE), mode], capture_output=True, text=True,
                            check=True, env={"PATH": "/usr/bin:/bin", **env})
    return json.loads(result.stdout)


@glibc_only
def test_a_freed_block_is_kept_in_the_heap_where_glibc_would_unmap_it():
    default, kept = probe("default"), probe("keep")
    assert not default["applied"] and kept["applied"]
    # glibc's default: an 8 MiB block is mapped on its own and unmapped when freed
    assert default["mapped"] >= default["size"] and default["kept_after_free"] < default["size"]
    # kept: it comes from the heap, and stays there once freed (the next step's tensor reuses those pages)
    assert kept["mapped"] == 0 and kept["kept_after_free"] >= kept["size"]


@glibc_only
def test_the_opt_out_leaves_glibc_alone():
    opted_out = probe("keep", DPNAS_KEEP_FREED_MEMORY="0")
    assert not opted_out["applied"] and opted_out["mapped"] >= opted_out["size"]


def test_elsewhere_than_glibc_nothing_is_set(monkeypatch):
    monkeypatch.setattr(platform, "libc_ver", lambda *args, **kwargs: ("", ""))
    host_memory.keep_freed_host_memory.cache_clear()
    try:
        assert host_memory.keep_freed_host_memory() is False
    finally:
        host_memory.keep_freed_host_memory.cache_clear()


def test_every_training_engine_keeps_freed_memory(monkeypatch):
    calls = []
    monkeypatch.setattr("dpnas.dp.engine.keep_freed_host_memory", lambda: calls.append(1))
    model = torch.nn.Linear(3, 2)
    plan = PrivacyPlan(sample_rate=0.1, steps=1, noise_multiplier=0.0, expected_batch_size=1.0, dataset_size=10)
    for private in (True, False):
        DPSGDEngine(model, torch.optim.SGD(model.parameters(), lr=0.1), plan=plan, max_grad_norm=1.0,
                    private=private, accountant=None, physical_batch_size=4)
    assert len(calls) == 2
