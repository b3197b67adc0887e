#!/usr/bin/env bash
# Fill .whl/ with the wheels the GPU device machine lacks, so that a GPU session can run dpnas there.
#
#     benchmarks/device_wheels.sh           # download what is missing into .whl/ (idempotent)
#     benchmarks/device_wheels.sh --list    # only print NAME==VERSION, one per line (no network)
#
# Why: the device machine (one H200; see benchmarks/gpu_session.sh) has Python 3.12 with torch, numpy,
# pandas, scipy, scikit-learn, tqdm, pytest ... but not Opacus, Optuna or their own dependencies, and it
# cannot reach any package registry. What it lacks travels as wheels in the git-ignored .whl/ folder
# (the device tool's `carry: [".whl"]`), and gpu_session.sh installs them with pip --no-index --no-deps.
# --no-deps means nothing is resolved there: this script must name every missing package itself.
#
# What is fetched: the packages that `dpnas train`, `dpnas bench`, `dpnas search` (journal storage) and
# benchmarks/{epoch,search}_throughput.py need, i.e. the dependency closure of ROOTS below, read from
# uv.lock (versions and edges; markers evaluated for CPython 3.12 on Linux x86_64), stopping at every
# package the device already has (DEVICE_HAS). Not fetched, on purpose:
#   plotly (+ narwhals): only `dpnas plot` and dpnas.analysis draw figures;
#   psycopg2-binary:     only postgresql:// storages need it; a GPU session uses a journal file.
# Exactly one version of each package, as pinned in uv.lock: two versions of one package in .whl/ make
# the whole `pip install --no-deps` on the device fail. Stale or unlisted wheels are removed.
#
# Environment: PYTHON (default python3; needs Python >= 3.11 for tomllib, and pip for downloading),
# WHEEL_DIR (default .whl), WHEEL_BUDGET_MIB (default 40: the working tree that travels, wheels
# included, must stay under 64 MiB).
set -euo pipefail

REPO=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
PY=${PYTHON:-python3}
MODE=download
case "${1:-}" in
    "") ;;
    --list) MODE=list ;;
    -h|--help) sed -n '2,/^set -euo/p' "$0" | sed '$d; s/^# \{0,1\}//'; exit 0 ;;
    *) echo "usage: $0 [--list]" >&2; exit 2 ;;
esac

if [[ $MODE == download ]] && ! "$PY" -m pip --version >/dev/null 2>&1; then
    echo "error: '$PY -m pip' does not work; set PYTHON to a Python >= 3.11 that has pip" >&2
    exit 2
fi

export REPO MODE
export WHEEL_DIR=${WHEEL_DIR:-$REPO/.whl}
export WHEEL_BUDGET_MIB=${WHEEL_BUDGET_MIB:-40}

exec "$PY" - <<'PY'
import os
import re
import subprocess
import sys
import tomllib
from pathlib import Path

try:  # marker evaluation; pip vendors packaging, so any Python that can download has it
    from packaging.markers import Marker
    from packaging.requirements import Requirement
    from packaging.utils import canonicalize_name
    from packaging.version import Version
except ImportError:
    from pip._vendor.packaging.markers import Marker
    from pip._vendor.packaging.requirements import Requirement
    from pip._vendor.packaging.utils import canonicalize_name
    from pip._vendor.packaging.version import Version

REPO = Path(os.environ["REPO"])
MODE = os.environ["MODE"]
WHEEL_DIR = Path(os.environ["WHEEL_DIR"])
BUDGET_MIB = float(os.environ["WHEEL_BUDGET_MIB"])

# dpnas's own dependencies (from pyproject.toml, as locked) that the GPU runs need; see the header.
ROOTS = ["opacus", "optuna", "optuna-dashboard"]  # optuna-dashboard: `dpnas search` saves a study note with it

# What the device image already holds ("Python packages already there" in the device tool's KINDS.md,
# read 2026-11-17), plus pip itself. Names only: the versions there are the image's, not uv.lock's.
DEVICE_HAS = set("""
absl-py accelerate aiofiles aiohappyeyeballs aiohttp aiosignal annotated-doc anyio attrs botorch build
certifi charset-normalizer chex click cloudpickle cmake colorama contourpy coverage cuda-bindings cuda-core
cuda-pathfinder cuda-toolkit cupy-cuda13x cycler cython diffrax e3nn einops equinox etils execnet filelock
flatbuffers flax fonttools formulaic frozenlist fsspec gpytorch grpcio h11 h5py hf-xet httpcore httpx
huggingface-hub humanize hypothesis idna imageio iniconfig interface-meta jax jax-cuda13-pjrt
jax-cuda13-plugin jaxlib jaxtyping jinja2 joblib kiwisolver lazy-loader lightning lightning-utilities
linear-operator lineax llvmlite lxml markdown markdown-it-py markupsafe matplotlib mdurl meson ml-dtypes
mpi4py mpmath msgpack multidict multipledispatch mypy-extensions nanobind narwhals networkx ninja numba
numba-cuda numpy numpyro nvidia-cublas nvidia-cuda-cupti nvidia-cuda-nvrtc nvidia-cuda-runtime
nvidia-cudnn-cu13 nvidia-cufft nvidia-cufile nvidia-curand nvidia-cusolver nvidia-cusparse
nvidia-cusparselt-cu13 nvidia-ml-py nvidia-nccl-cu13 nvidia-nvjitlink nvidia-nvshmem-cu13 nvidia-nvtx onnx
onnx-ir onnxruntime onnxscript opencv-python-headless optax opt-einsum opt-einsum-fx optimistix
orbax-checkpoint packaging pandas pathspec patsy peft pillow pip pluggy portalocker prometheus-client
propcache protobuf psutil pyarrow pybind11 py-cpuinfo pygments pyparsing pyproject-hooks pyre-extensions
pytest pytest-benchmark pytest-cov pytest-mock pytest-timeout pytest-xdist python-dateutil
pytorch-lightning pyyaml regex requests rich sacrebleu safetensors scikit-build-core scikit-image
scikit-learn scipy seaborn sentencepiece sentence-transformers setuptools shellingham simplejson six
sortedcontainers statsmodels sympy tabulate tensorboard tensorboard-data-server tensorstore threadpoolctl
tifffile tiktoken timm tokenizers toolz torch torchaudio torchdiffeq torch-geometric torchmetrics
torchvision tqdm transformers treescope triton typer typing-extensions typing-inspect urllib3 uvloop
wadler-lindig werkzeug wheel wrapt xarray xxhash yarl zipp
""".split())

# The device's interpreter: CPython 3.12.3 on Linux x86-64 (/opt/torch/.venv/bin/python3).
TARGET_ENV = {
    "python_version": "3.12", "python_full_version": "3.12.3", "implementation_name": "cpython",
    "implementation_version": "3.12.3", "platform_python_implementation": "CPython", "sys_platform": "linux",
    "platform_system": "Linux", "platform_machine": "x86_64", "os_name": "posix", "extra": "",
}
# pip matches manylinux tags exactly, so name every glibc level the device can load (its Python 3.12.3
# is Ubuntu 24.04's, glibc 2.39); pure-Python wheels (py3-none-any) match regardless.
PLATFORMS = ["manylinux_2_28_x86_64", "manylinux_2_27_x86_64", "manylinux_2_17_x86_64", "manylinux2014_x86_64",
             "manylinux1_x86_64", *(f"manylinux_2_{n}_x86_64" for n in range(5, 40) if n not in (17, 27, 28))]


def applies(marker: str | None) -> bool:
    return marker is None or Marker(marker).evaluate(TARGET_ENV)


def locked_closure() -> dict[str, str]:
    """{name: version} for ROOTS and what they need, as uv.lock resolved it, minus what the device has."""
    lock = tomllib.loads((REPO / "uv.lock").read_text())
    by_name: dict[str, list[dict]] = {}
    for package in lock["package"]:
        by_name.setdefault(canonicalize_name(package["name"]), []).append(package)

    def entry(name: str, version: str | None) -> dict:
        candidates = [p for p in by_name.get(name, []) if version is None or p.get("version") == version]
        if len(candidates) > 1:  # several versions (Python-version forks): take the one for Python 3.12
            candidates = [p for p in candidates
                          if any(applies(m) for m in p.get("resolution-markers", [])) or not p.get("resolution-markers")]
        if len(candidates) != 1:
            sys.exit(f"uv.lock: cannot pick one locked version of {name} (version {version}): "
                     f"{[p.get('version') for p in candidates]}")
        return candidates[0]

    project = entry("dpnas", None)
    roots = {canonicalize_name(d["name"]): d for d in project.get("dependencies", [])}
    missing = [r for r in ROOTS if r not in roots]
    if missing:
        sys.exit(f"uv.lock: dpnas does not depend on {missing}; update ROOTS in benchmarks/device_wheels.sh")

    wanted: dict[str, str] = {}
    todo = [roots[r] for r in ROOTS]
    while todo:
        dep = todo.pop()
        name = canonicalize_name(dep["name"])
        if name in DEVICE_HAS or not applies(dep.get("marker")):
            continue
        package = entry(name, dep.get("version"))
        if name in wanted:
            if wanted[name] != package["version"]:
                sys.exit(f"uv.lock: two versions of {name} needed: {wanted[name]} and {package['version']}")
            continue
        wanted[name] = package["version"]
        todo += package.get("dependencies", [])
        for extra in dep.get("extra", []):  # dependency on name[extra]
            todo += package.get("optional-dependencies", {}).get(extra, [])
    return dict(sorted(wanted.items()))


def wheel_name_version(path: Path) -> tuple[str, str]:
    name, version = path.name.split("-")[:2]  # NAME-VERSION[-BUILD]-PY-ABI-PLATFORM.whl; '-' escaped as '_'
    return canonicalize_name(name), version


def requires(path: Path) -> list[Requirement]:
    """The wheel's own Requires-Dist that apply on the device (no extras): a check on uv.lock's edges."""
    import zipfile

    with zipfile.ZipFile(path) as archive:
        metadata = next(n for n in archive.namelist() if n.endswith(".dist-info/METADATA"))
        lines = archive.read(metadata).decode().splitlines()
    reqs = [Requirement(line.split(":", 1)[1].strip()) for line in lines if line.startswith("Requires-Dist:")]
    return [r for r in reqs if r.marker is None or r.marker.evaluate(TARGET_ENV)]


def main() -> None:
    wanted = locked_closure()
    if MODE == "list":
        for name, version in wanted.items():
            print(f"{name}=={version}")
        return

    WHEEL_DIR.mkdir(exist_ok=True)
    have: dict[str, Path] = {}
    for path in sorted(WHEEL_DIR.glob("*.whl")):
        name, version = wheel_name_version(path)
        if name in wanted and Version(version) == Version(wanted[name]) and name not in have:
            have[name] = path
        else:  # another version, an unlisted package or a duplicate: it would break the install there
            print(f"removed {path.name} (not in the list for uv.lock's pins)")
            path.unlink()
    missing = [f"{n}=={v}" for n, v in wanted.items() if n not in have]
    if missing:
        command = [sys.executable, "-m", "pip", "download", "--quiet", "--no-deps", "--only-binary=:all:",
                   "--python-version", "3.12", "--implementation", "cp", "--abi", "cp312", "--abi", "abi3",
                   "--abi", "none", *(f"--platform={p}" for p in PLATFORMS), "--dest", str(WHEEL_DIR), *missing]
        subprocess.run(command, check=True)
    total = 0
    for name, version in wanted.items():
        paths = [p for p in WHEEL_DIR.glob("*.whl") if wheel_name_version(p)[0] == name]
        if len(paths) != 1:
            sys.exit(f"error: expected one wheel of {name}=={version} in {WHEEL_DIR}, found {[p.name for p in paths]}")
        size = paths[0].stat().st_size
        total += size
        status = "have   " if name in have else "fetched"
        print(f"{status} {paths[0].name}  {size / 2**20:.2f} MiB")

    # Everything a wheel needs must be in .whl/ or on the device, else the import fails only there.
    for path in sorted(WHEEL_DIR.glob("*.whl")):
        for req in requires(path):
            name = canonicalize_name(req.name)
            if name not in wanted and name not in DEVICE_HAS:
                sys.exit(f"error: {path.name} requires {req}, which is neither fetched nor on the device; "
                         f"is uv.lock out of date?")
            if name in wanted and not req.specifier.contains(wanted[name], prereleases=True):
                sys.exit(f"error: {path.name} requires {req}, but uv.lock pins {name}=={wanted[name]}")

    print(f"{len(wanted)} wheels, {total / 2**20:.2f} MiB in {WHEEL_DIR}")
    if total > BUDGET_MIB * 2**20:
        sys.exit(f"error: more than {BUDGET_MIB:g} MiB of wheels; the tree sent to the device must stay under 64 MiB")


main()
PY
