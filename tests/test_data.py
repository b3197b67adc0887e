"""dpnas.data.datasets: real on-disk formats written in miniature, loaded by the real loaders; no network."""

from __future__ import annotations

import hashlib
import pickle
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from torchvision.datasets import CIFAR10

from dpnas.data.datasets import (
    DATASETS,
    DataError,
    DatasetSplits,
    ImageData,
    hash_split,
    load_dataset,
    normalise,
    stratified_split,
)


def row_set(data: ImageData) -> set[bytes]:
    """Each image (with its label) as bytes, to compare splits by content."""
    return {img.numpy().tobytes() + bytes([label]) for img, label in zip(data.images, data.labels.tolist())}


# --- CIFAR-10 ---------------------------------------------------------------------------------

CIFAR_CLASSES = ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck"]


def md5(path: Path) -> str:
    return hashlib.md5(path.read_bytes()).hexdigest()


def write_cifar(root: Path, *, per_batch: int = 4, n_test: int = 6) -> dict[str, tuple[np.ndarray, list[int]]]:
    """Write cifar-10-batches-py as in the official tarball; return {file: (CHW images, labels)}.

    The official files are Python 2 pickles whose str keys load as str under encoding="latin1",
    which is how torchvision reads them; protocol-2 pickles with str keys load identically.
    """
    folder = root / "cifar-10-batches-py"
    folder.mkdir(parents=True)
    rng = np.random.default_rng(0)
    written = {}
    for name, n in [(f"data_batch_{i}", per_batch) for i in range(1, 6)] + [("test_batch", n_test)]:
        images = rng.integers(0, 256, size=(n, 3, 32, 32), dtype=np.uint8)
        labels = rng.integers(0, 10, size=n).tolist()
        entry = {
            "batch_label": f"{name} of 5",
            # One row per image: the 1024 red values, then green, then blue, each row-major.
            "data": images.reshape(n, 3072),
            "labels": labels,
            "filenames": [f"img_{name}_{i}.png" for i in range(n)],
        }
        (folder / name).write_bytes(pickle.dumps(entry, protocol=2))
        written[name] = (images, labels)
    meta = {"label_names": CIFAR_CLASSES, "num_cases_per_batch": per_batch, "num_vis": 3072}
    (folder / "batches.meta").write_bytes(pickle.dumps(meta, protocol=2))
    return written


@pytest.fixture
def cifar_dir(tmp_path, monkeypatch):
    """Tiny CIFAR-10 files, with torchvision's MD5 table pointed at *their* checksums.

    torchvision still runs its own integrity check on every file; only the expected digests
    (which are those of the real 170 MB release) are swapped for the digests of these files.
    """
    written = write_cifar(tmp_path)
    folder = tmp_path / "cifar-10-batches-py"
    monkeypatch.setattr(CIFAR10, "train_list", [[f"data_batch_{i}", md5(folder / f"data_batch_{i}")] for i in range(1, 6)])
    monkeypatch.setattr(CIFAR10, "test_list", [["test_batch", md5(folder / "test_batch")]])
    monkeypatch.setattr(CIFAR10, "meta", {**CIFAR10.meta, "md5": md5(folder / "batches.meta")})
    return tmp_path, written


def test_cifar10_round_trips_pixels_and_labels(cifar_dir):
    root, written = cifar_dir
    data = load_dataset("cifar10", data_dir=root, download=False, val_fraction=0.25, seed=3)

    test_images, test_labels = written["test_batch"]
    assert data.test.images.dtype == torch.uint8 and data.test.labels.dtype == torch.int64
    assert torch.equal(data.test.images, torch.from_numpy(test_images))  # same CHW uint8, same order
    assert data.test.labels.tolist() == test_labels

    train_images = np.concatenate([written[f"data_batch_{i}"][0] for i in range(1, 6)])
    train_labels = sum((written[f"data_batch_{i}"][1] for i in range(1, 6)), [])
    assert len(data.train) + len(data.val) == 20 and len(data.val) >= 1
    expected = row_set(ImageData(torch.from_numpy(train_images), torch.tensor(train_labels)))
    assert row_set(data.train) | row_set(data.val) == expected
    assert not row_set(data.train) & row_set(data.val)

    assert (data.num_classes, data.in_channels, data.image_size) == (10, 3, 32)
    assert data.mean == (0.4914, 0.4822, 0.4465) and data.std == (0.2471, 0.2435, 0.2616)
    assert data.synthetic is False and data.name == "cifar10"


def test_cifar10_known_pixel_positions(tmp_path, monkeypatch):
    """The R, G, B planes of a row land in channels 0, 1, 2 and stay row-major (no transposition)."""
    image = np.zeros((3, 32, 32), dtype=np.uint8)
    image[0, 0, 1] = 200  # red, row 0, column 1
    image[1, 2, 0] = 100  # green, row 2, column 0
    image[2, 31, 30] = 50  # blue, row 31, column 30
    folder = tmp_path / "cifar-10-batches-py"
    folder.mkdir()
    for name in [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]:
        entry = {"batch_label": name, "data": image.reshape(1, 3072), "labels": [7], "filenames": ["x.png"]}
        (folder / name).write_bytes(pickle.dumps(entry, protocol=2))
    (folder / "batches.meta").write_bytes(pickle.dumps({"label_names": CIFAR_CLASSES}, protocol=2))
    monkeypatch.setattr(CIFAR10, "train_list", [[f"data_batch_{i}", md5(folder / f"data_batch_{i}")] for i in range(1, 6)])
    monkeypatch.setattr(CIFAR10, "test_list", [["test_batch", md5(folder / "test_batch")]])
    monkeypatch.setattr(CIFAR10, "meta", {**CIFAR10.meta, "md5": md5(folder / "batches.meta")})

    data = load_dataset("cifar10", data_dir=tmp_path, download=False, val_fraction=0.0)
    got = data.test.images[0]
    assert got[0, 0, 1] == 200 and got[1, 2, 0] == 100 and got[2, 31, 30] == 50
    assert int(got.sum()) == 350
    assert data.test.labels.tolist() == [7] and len(data.val) == 0 and len(data.train) == 5


def test_cifar10_resize_at_load_time(cifar_dir):
    root, _ = cifar_dir
    data = load_dataset("cifar10", data_dir=root, download=False, image_size=16)
    assert data.image_size == 16
    assert data.train.images.shape[1:] == (3, 16, 16) and data.test.images.shape == (6, 3, 16, 16)
    assert data.train.images.dtype == torch.uint8


def test_cifar10_data_dir_may_name_the_batches_folder_itself(cifar_dir):
    """--data-dir pointed at cifar-10-batches-py (where data_batch_1 is) was taken for its parent: the files were
    "not found", and with the download allowed a second 170 MB copy went into cifar-10-batches-py/cifar-10-batches-py."""
    root, _ = cifar_dir
    inner = load_dataset("cifar10", data_dir=root / "cifar-10-batches-py", download=False, image_size=8)
    outer = load_dataset("cifar10", data_dir=root, download=False, image_size=8)
    assert torch.equal(inner.train.images, outer.train.images) and torch.equal(inner.test.labels, outer.test.labels)
    assert not (root / "cifar-10-batches-py" / "cifar-10-batches-py").exists()


def test_cifar10_missing_files_mention_data_dir(tmp_path):
    with pytest.raises(DataError, match="--data-dir") as info:
        load_dataset("cifar10", data_dir=tmp_path / "empty", download=False)
    assert str(tmp_path / "empty") in str(info.value)
    assert "data_batch_1" in str(info.value)  # says which layout is expected


def test_cifar10_checksum_mismatch_is_a_data_error(tmp_path):
    """Files in the right place but not the official ones (torchvision's real MD5 table) are refused."""
    write_cifar(tmp_path)
    with pytest.raises(DataError, match="corrupted"):
        load_dataset("cifar10", data_dir=tmp_path, download=False)


# --- ImageNette -------------------------------------------------------------------------------

# Written in a non-sorted order: labels must follow the sorted wnids, not creation order.
WNID_COLOURS = {"n03000684": (20, 200, 40), "n01440764": (220, 30, 30), "n02102040": (30, 40, 210)}


def write_imagenette(root: Path, *, per_class: int = 3) -> None:
    for split, count in (("train", per_class), ("val", 2)):
        for wnid, colour in WNID_COLOURS.items():
            folder = root / split / wnid
            folder.mkdir(parents=True)
            for i in range(count):
                size = (48 + 8 * i, 40) if i % 2 else (36, 60)  # landscape and portrait
                Image.new("RGB", size, colour).save(folder / f"{wnid}_{i}.JPEG", quality=95)
            (folder / "readme.txt").write_text("not an image")  # skipped like ImageFolder does


@pytest.mark.parametrize("use_parent", [True, False])
def test_imagenette_folder_layout(tmp_path, use_parent):
    release = tmp_path / "imagenette2-160"
    write_imagenette(release)
    data = load_dataset(
        "imagenette", data_dir=tmp_path if use_parent else release, image_size=24, val_fraction=1 / 3, progress=False
    )
    assert (data.num_classes, data.in_channels, data.image_size) == (3, 3, 24)
    assert len(data.train) + len(data.val) == 9 and len(data.val) >= 1 and len(data.test) == 6  # release "val" = test
    for split in (data.train, data.val, data.test):
        assert split.images.shape[1:] == (3, 24, 24) and split.images.dtype == torch.uint8
        for image, label in zip(split.images, split.labels.tolist()):
            wnid = sorted(WNID_COLOURS)[label]
            mean_colour = image.float().mean(dim=(1, 2))
            assert torch.allclose(mean_colour, torch.tensor(WNID_COLOURS[wnid], dtype=torch.float32), atol=4)
    assert data.mean == (0.485, 0.456, 0.406) and data.std == (0.229, 0.224, 0.225)


def test_imagenette_greyscale_and_full_size_release(tmp_path):
    """A greyscale JPEG becomes 3 identical channels; the full-size "imagenette2" folder is found too."""
    release = tmp_path / "imagenette2"
    for split in ("train", "val"):
        for wnid in ("n01440764", "n02102040"):
            folder = release / split / wnid
            folder.mkdir(parents=True)
            Image.new("L", (70, 50), 90 if wnid == "n01440764" else 180).save(folder / "a.JPEG", quality=95)
            Image.new("RGB", (50, 70), (90, 90, 90) if wnid == "n01440764" else (180, 180, 180)).save(folder / "b.JPEG")
    data = load_dataset("imagenette", data_dir=tmp_path, image_size=32, val_fraction=0.0, progress=False)
    assert data.train.images.shape == (4, 3, 32, 32) and data.test.images.shape == (4, 3, 32, 32)
    for image, label in zip(data.train.images, data.train.labels.tolist()):
        assert (image.float() - (90, 180)[label]).abs().max() <= 3


def test_imagenette_missing_directory_names_the_path(tmp_path):
    missing = tmp_path / "no-such-dir"
    with pytest.raises(DataError, match="train/<wnid>") as info:
        load_dataset("imagenette", data_dir=missing, progress=False)
    assert str(missing) in str(info.value)


def test_imagenette_missing_test_class_and_corrupt_image(tmp_path):
    release = tmp_path / "imagenette2-160"
    write_imagenette(release)
    bad = release / "train" / "n01440764" / "broken.JPEG"
    bad.write_bytes(b"definitely not a jpeg")
    with pytest.raises(DataError, match="broken.JPEG"):
        load_dataset("imagenette", data_dir=tmp_path, image_size=8, progress=False)
    bad.unlink()
    for path in (release / "val" / "n02102040").iterdir():
        path.unlink()
    with pytest.raises(DataError, match="n02102040"):
        load_dataset("imagenette", data_dir=tmp_path, image_size=8, progress=False)


def test_imagenette_image_past_pil_s_size_limit_is_a_data_error(tmp_path, monkeypatch):
    """PIL refuses an image of more than twice MAX_IMAGE_PIXELS with DecompressionBombError, which is no OSError:
    it escaped as a traceback that named no file."""
    release = tmp_path / "imagenette2-160"
    write_imagenette(release)
    Image.new("RGB", (200, 200)).save(release / "train" / "n01440764" / "huge.png")
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 10_000)  # huge.png is past twice the limit; the others under it
    with pytest.raises(DataError, match="huge.png"):
        load_dataset("imagenette", data_dir=tmp_path, image_size=8, progress=False)


def test_an_imagenette_record_s_part_depends_on_its_own_file_alone(tmp_path):
    """Parallel composition needs each record's part (training or validation) to depend on that record only. Keyed
    on a position in the sorted file list, removing one file moved many others between the parts."""
    release = tmp_path / "imagenette2-160"
    write_imagenette(release, per_class=12)
    for i, path in enumerate(sorted((release / "train").rglob("*.JPEG"))):  # every image its own colour
        Image.new("RGB", (40, 40), (i * 7 % 256, i * 13 % 256, i * 29 % 256)).save(path, quality=100)

    def parts(data):
        def key(image):
            return tuple(image.float().mean(dim=(1, 2)).round().int().tolist())

        return {key(image): part for part, split in (("train", data.train), ("val", data.val)) for image in split.images}

    before = parts(load_dataset("imagenette", data_dir=release, image_size=8, val_fraction=0.3, progress=False))
    removed = min((release / "train").rglob("*.JPEG"))
    removed.unlink()
    after = parts(load_dataset("imagenette", data_dir=release, image_size=8, val_fraction=0.3, progress=False))
    assert len(after) == len(before) - 1 and "val" in after.values() and "train" in after.values()
    assert all(before[key] == part for key, part in after.items())


def test_imagenette_refuses_what_it_would_read_wrongly(tmp_path):
    """A 16-bit image was clipped by convert("RGB"); a class folder only in val/ (the test split) was skipped."""
    import numpy as np

    release = tmp_path / "imagenette2-160"
    write_imagenette(release)
    deep = release / "train" / "n01440764" / "deep.png"
    Image.fromarray(np.full((40, 40), 15_000, dtype=np.uint16)).save(deep)
    assert Image.open(deep).mode.startswith("I")
    with pytest.raises(DataError, match="deep.png: mode I"):
        load_dataset("imagenette", data_dir=tmp_path, image_size=8, progress=False)
    deep.unlink()
    (release / "val" / "n09999999").mkdir()
    Image.new("RGB", (40, 40)).save(release / "val" / "n09999999" / "x.JPEG")
    with pytest.raises(DataError, match="n09999999 are in only one of train/ and val/"):
        load_dataset("imagenette", data_dir=tmp_path, image_size=8, progress=False)


# --- digits -----------------------------------------------------------------------------------


def test_digits_shapes_and_sizes():
    data = load_dataset("digits", seed=0)
    assert (data.num_classes, data.in_channels, data.image_size) == (10, 1, 32)
    for split in (data.train, data.val, data.test):
        assert split.images.dtype == torch.uint8 and split.images.shape[1:] == (1, 32, 32)
        assert split.labels.dtype == torch.int64
    assert len(data.train) + len(data.val) + len(data.test) == 1797
    # Each record lands in a part by its own hash: the sizes are Binomial, within 4 standard deviations of the mean.
    assert abs(len(data.test) - 0.2 * 1797) < 4 * (1797 * 0.2 * 0.8) ** 0.5
    pool = 1797 - len(data.test)
    assert abs(len(data.val) - 0.2 * pool) < 4 * (pool * 0.2 * 0.8) ** 0.5
    assert set(data.test.labels.tolist()) == set(range(10)) and set(data.val.labels.tolist()) == set(range(10))
    assert int(data.train.images.max()) == 255  # 0..16 scaled to the full uint8 range
    assert len(data.mean) == len(data.std) == 1 and 0 < data.mean[0] < 1 and data.std[0] > 0
    assert data.synthetic is False


def test_digits_splits_by_seed():
    a, b, a_again = load_dataset("digits", seed=0), load_dataset("digits", seed=1), load_dataset("digits", seed=0)
    # The test split is fixed, whatever the seed; train/val move with it.
    assert torch.equal(a.test.images, b.test.images) and torch.equal(a.test.labels, b.test.labels)
    assert row_set(a.val) != row_set(b.val)
    assert row_set(a.train) | row_set(a.val) == row_set(b.train) | row_set(b.val)
    # Disjoint splits, and deterministic for a given seed.
    assert not row_set(a.train) & row_set(a.val) and not (row_set(a.train) | row_set(a.val)) & row_set(a.test)
    for x, y in ((a.train, a_again.train), (a.val, a_again.val)):
        assert torch.equal(x.images, y.images) and torch.equal(x.labels, y.labels)
    assert a.mean == b.mean  # normalisation statistics do not depend on the validation seed


def test_digits_image_size_and_zero_val_fraction():
    data = load_dataset("digits", image_size=8, val_fraction=0.0)
    assert data.train.images.shape[1:] == (1, 8, 8) and len(data.val) == 0
    assert data.val.images.shape == (0, 1, 8, 8)
    assert len(data.train) + len(data.test) == 1797


def test_digits_are_read_as_load_digits_gives_them_without_importing_scikit_learn(monkeypatch):
    import importlib.util
    import subprocess
    import sys

    from sklearn.datasets import load_digits

    from dpnas.data import datasets

    reference = load_digits()
    images, target = datasets._digits_arrays()
    assert images.dtype == reference.images.dtype and target.dtype == reference.target.dtype
    assert np.array_equal(images, reference.images) and np.array_equal(target, reference.target)
    # where the bundled file is not where dpnas looks, scikit-learn's own loader reads it
    monkeypatch.setattr(importlib.util, "find_spec", lambda name: None)
    images, target = datasets._digits_arrays()
    assert np.array_equal(images, reference.images) and np.array_equal(target, reference.target)
    # a search's start: loading digits does not import scikit-learn (and its scipy)
    code = ("import sys; from dpnas.data.datasets import load_dataset; load_dataset('digits', image_size=16); "
            "print('sklearn' in sys.modules, 'scipy' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.split()
    assert out == ["False", "False"]


# --- errors, split helper, synthetic, normalise ----------------------------------------------


def test_unknown_dataset_lists_allowed_names():
    with pytest.raises(DataError) as info:
        load_dataset("mnist")
    for name in DATASETS:
        assert name in str(info.value)


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"val_fraction": 1.0}, "val_fraction"),
        ({"val_fraction": -0.1}, "val_fraction"),
        ({"image_size": 0}, "image_size"),
        ({"image_size": 12.5}, "image_size"),
        ({"synthetic_size": 1}, "synthetic_size"),
    ],
)
def test_bad_arguments_raise_data_error(kwargs, match):
    with pytest.raises(DataError, match=match):
        load_dataset("synthetic", **kwargs)


def test_stratified_split_is_a_seeded_partition():
    labels = torch.tensor([0] * 50 + [1] * 30 + [2] * 20)
    kept, held = stratified_split(labels, 0.1, seed=5)
    assert len(held) == 10 and len(kept) == 90
    assert sorted(torch.cat([kept, held]).tolist()) == list(range(100))
    assert torch.bincount(labels[held]).tolist() == [5, 3, 2]
    assert torch.equal(held, stratified_split(labels, 0.1, seed=5)[1])
    assert not torch.equal(held, stratified_split(labels, 0.1, seed=6)[1])
    assert len(stratified_split(labels, 0.001, seed=0)[1]) == 1  # at least one when fraction > 0


def test_hash_split_assigns_each_record_on_its_own():
    """Parallel composition needs each record's part to depend on that record only: removing or adding records
    leaves every other record where it was, the key (seed) moves them, and the held-out share is the fraction."""
    ids = torch.arange(20000)
    kept, held = hash_split(ids, 0.25, key="val:3")
    assert not set(kept.tolist()) & set(held.tolist()) and len(kept) + len(held) == len(ids)
    assert abs(len(held) - 5000) < 4 * (20000 * 0.25 * 0.75) ** 0.5
    held_ids = set(held.tolist())
    # Remove every third record and add 500 new ids: the survivors keep their part.
    others = torch.cat([ids[ids % 3 != 0], torch.arange(10**6, 10**6 + 500)])
    _, held_others = hash_split(others, 0.25, key="val:3")
    survivors_held = {int(others[i]) for i in held_others if int(others[i]) < 20000}
    assert survivors_held == {i for i in held_ids if i % 3 != 0}
    # A different key gives a different (but equally sized) split; the same key the same one.
    assert set(hash_split(ids, 0.25, key="val:4")[1].tolist()) != held_ids
    assert torch.equal(hash_split(ids, 0.25, key="val:3")[1], held)
    # Neighbouring ids are not correlated: the held-out share among even and odd ids is the same.
    assert abs(sum(i % 2 == 0 for i in held_ids) - len(held_ids) / 2) < 4 * (len(held_ids) / 4) ** 0.5


def test_digits_split_uses_source_indices():
    """The validation hash reads each record's index in the full digits set, not its position after the test
    split was taken out, so a record's part never depends on where other records went."""
    from dpnas.data.datasets import DIGITS_TEST_FRACTION, DIGITS_TEST_KEY, hash_unit

    data = load_dataset("digits", seed=7, image_size=8)
    u_test = hash_unit(torch.arange(1797), key=DIGITS_TEST_KEY)
    pool_ids = torch.nonzero(u_test >= DIGITS_TEST_FRACTION).flatten()
    expected_val = pool_ids[hash_unit(pool_ids, key="val:7") < 0.2]
    assert len(data.val) == len(expected_val)
    from sklearn.datasets import load_digits

    labels = torch.from_numpy(load_digits().target)
    assert torch.equal(data.val.labels, labels[expected_val])


def test_too_small_a_validation_split_is_refused():
    with pytest.raises(DataError, match="validation split"):
        load_dataset("synthetic", synthetic_size=2, val_fraction=0.01, seed=0)


def test_synthetic_is_flagged_and_seeded():
    data = load_dataset("synthetic", synthetic_size=64, seed=1)
    assert data.synthetic is True
    assert len(data.train) + len(data.val) == 64 and len(data.test) == 16
    assert data.train.images.shape[1:] == (3, 32, 32) and data.num_classes == 10
    again, other = load_dataset("synthetic", synthetic_size=64, seed=1), load_dataset("synthetic", synthetic_size=64, seed=2)
    assert torch.equal(data.train.images, again.train.images)
    assert not torch.equal(data.train.images, other.train.images)


def test_normalise_exact_values_dtype_and_device():
    mean, std = (0.4914, 0.4822, 0.4465), (0.2471, 0.2435, 0.2616)
    images = torch.full((2, 3, 4, 4), 255, dtype=torch.uint8)
    images[1] = 0
    out = normalise(images, mean, std)
    assert out.dtype == torch.float32 and out.shape == images.shape and out.device == images.device
    m, s = torch.tensor(mean), torch.tensor(std)
    for c in range(3):
        assert torch.all(out[0, c] == (1 - m[c]) / s[c])
        assert torch.all(out[1, c] == -m[c] / s[c])
    # Computed where the images are: on the meta device, nothing is ever materialised on the CPU.
    meta = normalise(torch.empty((2, 3, 4, 4), dtype=torch.uint8, device="meta"), mean, std)
    assert meta.device.type == "meta" and meta.dtype == torch.float32
    with pytest.raises(DataError, match="channels"):
        normalise(images, (0.5,), (0.5,))


def test_splits_move_to_a_device_together():
    data = load_dataset("synthetic", synthetic_size=16)
    moved = data.to("meta")
    assert isinstance(moved, DatasetSplits) and moved.name == data.name and moved.mean == data.mean
    for split in (moved.train, moved.val, moved.test):
        assert split.images.device.type == "meta" and split.labels.device.type == "meta"
    assert data.train.images.device.type == "cpu"  # the original is untouched (frozen dataclass)
    assert len(moved.train) == len(data.train)
