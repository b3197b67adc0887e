"""Image classification datasets held in memory as uint8 tensors, with a seeded validation split.

Every dataset is decoded once into ``(N, C, H, W)`` uint8 tensors (4x smaller than float32), so a
whole split fits on the accelerator and training indexes batches there: no DataLoader, no worker
processes, no per-batch host-to-device copy.  ``normalise`` turns a uint8 batch into float32 on
whatever device the batch lives on.

Three splits per dataset:

* ``train``: the official training set minus the validation images;
* ``val``: a seeded fraction of the *official training set*, used for every selection decision
  (hyper-parameters, architectures, early stopping), so the test set never influences a choice;
* ``test``: the official test split, evaluated once for the final report.

Each record's part is decided by a keyed hash of its index in the source dataset (:func:`hash_split`),
never by the other records, so the parts compose in parallel for differential privacy: a record in
the training part is covered by the training runs' ε, one in the validation part by the ε of the
noisy validation scores (see :mod:`dpnas.search.privacy`). The sizes of the parts are treated as
public, as Opacus treats the dataset size n in the sample rate B / n.

Files are looked for under ``data_dir``; by default ``~/.cache/dpnas/data`` (see ``DEFAULT_DATA_DIR``).
"""

from __future__ import annotations

import gzip
import hashlib
import importlib.util
import math
import operator
import os
import pickle
import tarfile
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Sequence

import numpy as np
import torch
import torch.nn.functional as F

DATASETS = ("cifar10", "imagenette", "digits", "synthetic")

DEFAULT_DATA_DIR = Path("~/.cache/dpnas/data")
DEFAULT_SYNTHETIC_SIZE = 2048  # samples of dataset "synthetic" unless told otherwise
IMAGENETTE_RELEASES = (("imagenette2-160", 160), ("imagenette2-320", 320), ("imagenette2", math.inf))
CIFAR10_MEAN, CIFAR10_STD = (0.4914, 0.4822, 0.4465), (0.2471, 0.2435, 0.2616)
IMAGENET_MEAN, IMAGENET_STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)
# Fixed constants (measured once on the 32 px digits), like CIFAR's published ones: statistics
# computed from the training data at run time would be a release that no accountant covers.
DIGITS_MEAN, DIGITS_STD = (0.306,), (0.324,)
DEFAULT_IMAGE_SIZE = {"cifar10": 32, "imagenette": 160, "digits": 32, "synthetic": 32}
# Images (training and test together) and channels of each dataset as loaded, known before loading it, so a size
# that cannot fit in memory is refused before a download or a decode starts. ImageNette's count is its v2 release's.
DATASET_RECORDS = {"cifar10": 60_000, "imagenette": 13_394, "digits": 1_797}
DATASET_CHANNELS = {"cifar10": 3, "imagenette": 3, "digits": 1, "synthetic": 3}
NUM_CLASSES = 10  # every dataset here has ten classes
# The digits test split must not move when --seed changes, or results under different seeds
# would be scored on different test images: its hash key is fixed, and differs from every validation key.
DIGITS_TEST_FRACTION, DIGITS_TEST_KEY = 0.2, "digits-test"


class DataError(ValueError):
    """A dataset cannot be loaded as asked; the message says what is wrong and how to fix it."""


@dataclass(frozen=True)
class ImageData:
    """Images as uint8 ``(N, C, H, W)`` and their int64 labels ``(N,)``, on one device."""

    images: torch.Tensor
    labels: torch.Tensor

    def __post_init__(self) -> None:
        if self.images.dtype != torch.uint8 or self.images.dim() != 4:
            raise DataError(f"images must be uint8 (N, C, H, W), got {self.images.dtype} {tuple(self.images.shape)}")
        if self.labels.dtype != torch.int64 or self.labels.shape != self.images.shape[:1]:
            raise DataError(
                f"labels must be int64 of shape ({len(self.images)},), "
                f"got {self.labels.dtype} {tuple(self.labels.shape)}"
            )

    def __len__(self) -> int:
        return self.labels.shape[0]

    def to(self, device: torch.device | str) -> ImageData:
        return ImageData(self.images.to(device), self.labels.to(device))

    def subset(self, indices: torch.Tensor) -> ImageData:
        return ImageData(self.images[indices], self.labels[indices])


@dataclass(frozen=True)
class DatasetSplits:
    name: str
    train: ImageData
    val: ImageData
    test: ImageData
    num_classes: int
    in_channels: int
    image_size: int
    mean: tuple[float, ...]
    std: tuple[float, ...]
    synthetic: bool = False
    train_ids: torch.Tensor | None = None
    """Each training record's id in the source dataset (what :func:`hash_split` keys on), in `train`'s order."""
    val_ids: torch.Tensor | None = None
    """The same for the validation records, in `val`'s order."""
    full_train_size: int | None = None
    """The training records before a search kept a subset of them ([fidelity] data_fraction); None: all kept."""

    def to(self, device: torch.device | str) -> DatasetSplits:
        return replace(self, train=self.train.to(device), val=self.val.to(device), test=self.test.to(device))


def normalise(images: torch.Tensor, mean: Sequence[float], std: Sequence[float]) -> torch.Tensor:
    """uint8 ``(..., C, H, W)`` -> float32 ``(x / 255 - mean) / std``, computed on the images' device."""
    if images.dtype != torch.uint8:
        raise TypeError(f"normalise expects uint8 images, got {images.dtype}")
    if len(mean) != images.shape[-3] or len(std) != images.shape[-3]:
        raise DataError(f"mean/std have {len(mean)}/{len(std)} entries for {images.shape[-3]} channels")
    mean_t = torch.as_tensor(mean, dtype=torch.float32, device=images.device).view(-1, 1, 1)
    std_t = torch.as_tensor(std, dtype=torch.float32, device=images.device).view(-1, 1, 1)
    return (images.float().div_(255) - mean_t) / std_t


def dataset_key(name: str) -> str:
    """The DATASETS entry `name` means (case and spaces aside), or a DataError listing them."""
    key = name.strip().lower() if isinstance(name, str) else name
    if key not in DATASETS:
        raise DataError(f"unknown dataset {name!r}; choose one of: {', '.join(DATASETS)}")
    return key


def host_memory_bytes() -> int:
    """This machine's physical memory: more than this can never be held, swap or not."""
    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")


def dataset_records(name: str, *, synthetic_size: int = DEFAULT_SYNTHETIC_SIZE) -> int:
    """How many images (training and test) `name` holds once loaded."""
    return synthetic_size + max(1, synthetic_size // 4) if name == "synthetic" else DATASET_RECORDS[name]


def dataset_bytes(name: str, *, image_size: int, synthetic_size: int = DEFAULT_SYNTHETIC_SIZE) -> int:
    """Bytes of `name`'s uint8 images at `image_size` (all splits): what loading it holds in memory."""
    return dataset_records(name, synthetic_size=synthetic_size) * DATASET_CHANNELS[name] * image_size**2


def format_bytes(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB", "TiB", "PiB"):
        if n < 1024 or unit == "PiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    raise AssertionError("unreachable")


def check_fits(name: str, size: int, synthetic_size: int = DEFAULT_SYNTHETIC_SIZE) -> None:
    """Refuse (DataError) an image size at which `name` cannot be held in this machine's memory."""
    need, have = dataset_bytes(name, image_size=size, synthetic_size=synthetic_size), host_memory_bytes()
    if need > have:
        raise DataError(
            f"image_size {size}: {name} at {size}x{size} px takes {format_bytes(need)} in memory "
            f"({dataset_records(name, synthetic_size=synthetic_size):,} images x {DATASET_CHANNELS[name]} channels "
            f"x {size} x {size} bytes), more than this machine's {format_bytes(have)}; use a smaller image_size "
            f"(default {DEFAULT_IMAGE_SIZE[name]})")


def load_dataset(
    name: str,
    *,
    data_dir: str | Path | None = None,
    val_fraction: float = 0.2,
    seed: int = 0,
    image_size: int | None = None,
    download: bool = True,
    synthetic_size: int = DEFAULT_SYNTHETIC_SIZE,
    progress: bool = True,
) -> DatasetSplits:
    """Load ``name`` (one of ``DATASETS``) into CPU memory; call ``.to(device)`` on the result to move it.

    Each record of the official training set lands in ``val`` with probability ``val_fraction``,
    by a hash keyed with ``seed`` (:func:`hash_split`); the rest is ``train``.  ``image_size`` defaults to 32 (160 for imagenette); images
    are resized once here, never per batch.  ``download`` only matters for cifar10.  ``progress``
    shows a progress bar while decoding imagenette's JPEGs.
    """
    key = dataset_key(name)
    if not 0.0 <= val_fraction < 1.0:
        raise DataError(f"val_fraction must be in [0, 1), got {val_fraction}")
    size = DEFAULT_IMAGE_SIZE[key] if image_size is None else _positive_int("image_size", image_size, minimum=1)
    if key == "synthetic":
        synthetic_size = _positive_int("synthetic_size", synthetic_size, minimum=2)
    check_fits(key, size, synthetic_size)
    root = Path(data_dir if data_dir is not None else DEFAULT_DATA_DIR).expanduser()

    pool_ids = None  # each pool record's index in the source dataset (default: its position)
    if key == "cifar10":
        pool, test, num_classes = _load_cifar10(root, download=download, size=size, given=data_dir is not None)
        mean, std = CIFAR10_MEAN, CIFAR10_STD
    elif key == "imagenette":
        pool, test, num_classes, pool_ids = _load_imagenette(root, size=size, progress=progress)
        mean, std = IMAGENET_MEAN, IMAGENET_STD
    elif key == "digits":
        pool, test, num_classes, pool_ids = _load_digits(size=size)
        mean, std = DIGITS_MEAN, DIGITS_STD
    else:
        pool, test, num_classes = _make_synthetic(synthetic_size, size=size, seed=seed)
        mean, std = (0.5,) * 3, (0.2898,) * 3  # uniform 0..255: std = sqrt((256^2 - 1) / 12) / 255

    ids = torch.arange(len(pool)) if pool_ids is None else pool_ids
    train_idx, val_idx = hash_split(ids, val_fraction, key=f"val:{seed}")
    if val_fraction > 0 and len(val_idx) == 0:
        raise DataError(f"no record of the {len(pool)} landed in the validation split (val_fraction "
                        f"{val_fraction:g}, seed {seed}); use a larger val_fraction or more data")
    if len(train_idx) == 0:
        raise DataError(f"holding out {val_fraction:.0%} of {len(pool)} samples left none to train on")
    return DatasetSplits(
        name=key,
        train=pool.subset(train_idx),
        val=pool.subset(val_idx),
        test=test,
        num_classes=num_classes,
        in_channels=pool.images.shape[1],
        image_size=size,
        mean=tuple(mean),
        std=tuple(std),
        synthetic=key == "synthetic",
        train_ids=ids[train_idx],
        val_ids=ids[val_idx],
    )


_MASK64 = (1 << 64) - 1


def hash_unit(ids: torch.Tensor, *, key: str) -> torch.Tensor:
    """A number in [0, 1) for each record id, from a hash keyed by ``key``: the same id and key always give the
    same number, and each record's number depends on nothing else (SplitMix64's finaliser over id + key)."""
    salt = int.from_bytes(hashlib.blake2b(key.encode(), digest_size=8).digest(), "little")
    x = (ids.cpu().numpy().astype(np.uint64) + np.uint64(salt)) & np.uint64(_MASK64)
    with np.errstate(over="ignore"):
        x = x + np.uint64(0x9E3779B97F4A7C15)
        x = (x ^ (x >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
        x = (x ^ (x >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
        x = x ^ (x >> np.uint64(31))
    return torch.from_numpy((x >> np.uint64(11)).astype(np.float64) / float(1 << 53))


def hash_split(ids: torch.Tensor, fraction: float, *, key: str) -> tuple[torch.Tensor, torch.Tensor]:
    """Positions of ``ids`` split into (kept, held out): record i is held out iff ``hash_unit(i, key) < fraction``.

    Each record's part is a function of its own id and the key only, so the parts are disjoint and a record's
    part does not depend on which other records exist: what parallel composition needs (a stratified
    permutation would not do: adding one record reshuffles the others). The held-out count is
    Binomial(n, fraction) rather than exactly round(fraction n).
    """
    held = hash_unit(ids, key=key) < fraction
    return torch.nonzero(~held).flatten(), torch.nonzero(held).flatten()


def stratified_split(labels: torch.Tensor, fraction: float, *, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Seeded split of ``range(len(labels))`` into (kept, held out), each sorted.

    ``round(fraction * n)`` samples are held out (at least one when ``fraction > 0``), spread over
    the classes in proportion to their size (largest remainder), so a small validation set still
    sees every class.
    """
    n = len(labels)
    n_out = 0 if fraction <= 0 else max(1, round(fraction * n))
    if n_out >= n and n_out > 0:
        raise DataError(f"holding out {fraction:.0%} of {n} samples leaves none to train on")
    generator = torch.Generator().manual_seed(seed)
    classes, counts = torch.unique(labels.cpu(), return_counts=True)
    quota = counts.double() * n_out / n
    take = quota.floor().long()
    remainder = quota - take
    # Stable sort so ties go to the lower class index, deterministically.
    for c in torch.argsort(-remainder, stable=True)[: n_out - int(take.sum())]:
        take[c] += 1
    held_out = []
    for cls, k in zip(classes.tolist(), take.tolist()):
        members = torch.nonzero(labels.cpu() == cls).flatten()
        held_out.append(members[torch.randperm(len(members), generator=generator)[:k]])
    mask = torch.zeros(n, dtype=torch.bool)
    if held_out:
        mask[torch.cat(held_out)] = True
    return torch.nonzero(~mask).flatten(), torch.nonzero(mask).flatten()


def _positive_int(field: str, value: object, *, minimum: int) -> int:
    try:
        number = operator.index(value)  # accepts numpy integers, refuses floats and strings
    except TypeError:
        number = None
    if number is None or isinstance(value, bool) or number < minimum:
        raise DataError(f"{field} must be an integer >= {minimum}, got {value!r}")
    return number


def _resize(images: torch.Tensor, size: int, chunk_bytes: int = 256 * 2**20) -> torch.Tensor:
    """Bilinear, antialiased resize of uint8 (N, C, H, W) to (N, C, size, size), in chunks to bound memory."""
    if images.shape[-2:] == (size, size):
        return images
    # each chunk goes through float32 at the larger of the two sizes: keep that near chunk_bytes
    pixels = images.shape[1] * max(size, images.shape[-2]) * max(size, images.shape[-1])
    chunk = max(1, min(1024, chunk_bytes // (4 * pixels)))
    out = torch.empty((len(images), images.shape[1], size, size), dtype=torch.uint8)
    for start in range(0, len(images), chunk):
        block = images[start : start + chunk].float()
        block = F.interpolate(block, size=(size, size), mode="bilinear", antialias=True, align_corners=False)
        out[start : start + chunk] = block.round_().clamp_(0, 255).to(torch.uint8)
    return out


def _load_cifar10(root: Path, *, download: bool, size: int, given: bool = False) -> tuple[ImageData, ImageData, int]:
    from torchvision.datasets import CIFAR10

    if root.name == CIFAR10.base_folder and (root / "data_batch_1").is_file():
        root = root.parent  # the batches' own folder: read it, rather than download a second copy into it
    folder = root / CIFAR10.base_folder
    layout = "data_batch_1..5, test_batch and batches.meta, as extracted from cifar-10-python.tar.gz"
    hint = f"point --data-dir at a directory that contains an existing {CIFAR10.base_folder} folder"
    if given and not root.is_dir():
        # torchvision would create a mistyped directory and download 170 MB into it; only the default cache is made
        what = "is not a directory" if root.exists() else "does not exist"
        raise DataError(f"data_dir {root} {what}; {hint} ({layout}), create the directory to download CIFAR-10 "
                        f"into it, or leave --data-dir out to use {DEFAULT_DATA_DIR}")
    splits = []
    for train in (True, False):
        try:
            ds = CIFAR10(root=str(root), train=train, download=download)
        except (OSError, tarfile.TarError) as err:  # includes urllib's URLError: no network
            action = "download CIFAR-10 into" if download else "read CIFAR-10 from"
            raise DataError(f"could not {action} {root} ({err}); {hint}") from err
        except (RuntimeError, pickle.UnpicklingError, EOFError, KeyError) as err:
            raise DataError(
                f"CIFAR-10 not found or corrupted in {folder} (expected {layout}); "
                + ("" if download else "allow the download (without --no-download; download=True in Python) to "
                                       "fetch it, or ")
                + hint
            ) from err
        images = torch.from_numpy(ds.data).permute(0, 3, 1, 2).contiguous()  # torchvision keeps HWC
        splits.append(ImageData(_resize(images, size), torch.tensor(ds.targets, dtype=torch.int64)))
        num_classes = len(ds.classes)
    return splits[0], splits[1], num_classes


def _imagenette_root(root: Path, size: int) -> Path:
    """The release folder (with train/ and val/): ``root`` itself, or the smallest release under it big enough."""
    if (root / "train").is_dir() and (root / "val").is_dir():
        return root
    found = [(root / folder, resolution) for folder, resolution in IMAGENETTE_RELEASES if (root / folder).is_dir()]
    if not found:
        releases = " or ".join(folder for folder, _ in IMAGENETTE_RELEASES)
        raise DataError(
            f"ImageNette not found at {root}: expected train/<wnid>/*.JPEG and val/<wnid>/*.JPEG there, "
            f"or in an {releases} folder inside it (download and extract a release from "
            "https://github.com/fastai/imagenette, then pass --data-dir)"
        )
    # Decoding is the slow part: prefer the smallest release whose short side covers image_size.
    return next((path for path, resolution in found if resolution >= size), found[-1][0])


def _load_imagenette(root: Path, *, size: int, progress: bool) -> tuple[ImageData, ImageData, int, torch.Tensor]:
    """(train, test, classes, each training image's id): the id is a hash of its path in the release, so a record's
    validation part depends on that record alone, not on which other files the folder holds (a position in the
    sorted file list would shift when one file is added or removed, and move many records between parts)."""
    from torchvision.datasets.folder import IMG_EXTENSIONS, find_classes, make_dataset

    release = _imagenette_root(root, size)
    try:
        classes, class_to_idx = find_classes(release / "train")
        test_classes, _ = find_classes(release / "val")
        if test_classes != classes:
            missing = sorted(set(test_classes) ^ set(classes))
            raise ValueError(f"class folders {', '.join(missing[:5])} are in only one of train/ and val/")
        samples = {
            split: make_dataset(release / split, class_to_idx, extensions=IMG_EXTENSIONS) for split in ("train", "val")
        }
    except (FileNotFoundError, ValueError) as err:
        raise DataError(
            f"bad ImageNette layout in {release} ({err}); expected train/<wnid>/*.JPEG and "
            "val/<wnid>/*.JPEG with the same class folders in both"
        ) from err
    # The release's "val" folder is our test split; validation is held out from train.
    train = _decode(samples["train"], size, progress=progress, split="train")
    test = _decode(samples["val"], size, progress=progress, split="test")
    ids = torch.tensor([_path_id(Path(path).relative_to(release)) for path, _ in samples["train"]], dtype=torch.int64)
    return train, test, len(classes), ids


def _path_id(relative: Path) -> int:
    """A record id from a file's path inside its dataset folder (63 bits of BLAKE2b)."""
    digest = hashlib.blake2b(relative.as_posix().encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") >> 1


_EIGHT_BIT_MODES = frozenset({"1", "L", "LA", "P", "PA", "RGB", "RGBA", "RGBX", "CMYK", "YCbCr", "La", "RGBa"})


def _decode(samples: list[tuple[str, int]], size: int, *, progress: bool, split: str) -> ImageData:
    from PIL import Image, UnidentifiedImageError
    from tqdm import tqdm

    images = torch.empty((len(samples), 3, size, size), dtype=torch.uint8)
    for i, (path, _) in enumerate(tqdm(samples, desc=f"imagenette {split}", unit="img", disable=not progress)):
        try:
            with Image.open(path) as img:
                if img.mode not in _EIGHT_BIT_MODES:  # convert("RGB") clips 16-bit and float images, silently
                    raise DataError(f"image {path}: mode {img.mode} (more than 8 bits a channel); dpnas reads 8-bit "
                                    "images: convert it first")
                img.draft("RGB", (size, size))  # let the JPEG decoder downscale by 2^k; keeps short side >= size
                img = img.convert("RGB")
                scale = size / min(img.size)
                w, h = max(size, round(img.width * scale)), max(size, round(img.height * scale))
                img = img.resize((w, h), Image.BILINEAR)  # PIL antialiases when shrinking
                left, top = (w - size) // 2, (h - size) // 2
                img = img.crop((left, top, left + size, top + size))
                images[i] = torch.from_numpy(np.array(img)).permute(2, 0, 1)
        except (OSError, UnidentifiedImageError, Image.DecompressionBombError) as err:  # the last is no OSError
            raise DataError(f"cannot decode image {path}: {err}") from err
    return ImageData(images, torch.tensor([label for _, label in samples], dtype=torch.int64))


def _load_digits(*, size: int) -> tuple[ImageData, ImageData, int, torch.Tensor]:
    images, target = _digits_arrays()  # bundled with scikit-learn: works offline
    raw = torch.from_numpy(images).mul(255 / 16).round().to(torch.uint8).unsqueeze(1)
    everything = ImageData(_resize(raw, size), torch.from_numpy(target).to(torch.int64))
    pool_idx, test_idx = hash_split(torch.arange(len(everything)), DIGITS_TEST_FRACTION, key=DIGITS_TEST_KEY)
    return everything.subset(pool_idx), everything.subset(test_idx), 10, pool_idx


def _digits_arrays() -> tuple[np.ndarray, np.ndarray]:
    """scikit-learn's digits as ``load_digits()`` gives them: (1797 x 8 x 8 float images in 0-16, int labels).

    ``load_digits`` parses the gzip CSV bundled with scikit-learn with ``np.loadtxt``; importing scikit-learn to
    call it costs 0.4-1.4 s (scipy and more) at the start of every digits search, more than reading the file.
    So the file is read here the same way, located without importing the package; where it is not found (another
    layout), ``load_digits`` reads it. tests/test_data.py checks both give the same arrays.
    """
    spec = importlib.util.find_spec("sklearn")  # finds the package without running its __init__
    for folder in (spec.submodule_search_locations or []) if spec else []:
        path = Path(folder) / "datasets" / "data" / "digits.csv.gz"
        if path.is_file():
            with gzip.open(path, mode="rt", encoding="utf-8") as text:
                data = np.loadtxt(text, delimiter=",")
            return data[:, :-1].reshape(-1, 8, 8), data[:, -1].astype(int, copy=False)
    from sklearn.datasets import load_digits

    digits = load_digits()
    return digits.images, digits.target


def _make_synthetic(n: int, *, size: int, seed: int) -> tuple[ImageData, ImageData, int]:
    n = _positive_int("synthetic_size", n, minimum=2)
    generator = torch.Generator().manual_seed(seed)

    def make(count: int) -> ImageData:
        images = torch.randint(0, 256, (count, 3, size, size), generator=generator, dtype=torch.uint8)
        return ImageData(images, torch.randint(0, 10, (count,), generator=generator))

    return make(n), make(max(1, n // 4)), 10
