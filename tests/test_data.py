"""Tests for data: dataset builders, the download lock, augmentation kernels and transforms.

CIFAR tests write small files in the real on-disk format (pickled batches under the folder
names torchvision expects) and point torchvision's md5 lists at them, so no test downloads.
"""

import dataclasses
import hashlib
import itertools
import json
import multiprocessing
import multiprocessing.synchronize
import os
import pickle
import shutil
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from torch.utils.data import DataLoader
from torchvision.datasets import CIFAR10, CIFAR100
from torchvision.transforms.v2 import functional as TF

import data
from data import (
    DATASET_NAMES,
    DATASET_STATS,
    AugmentationConfig,
    ViewParams,
    adjust_hue,
    build_classifier_transform,
    build_datasets,
    build_eval_transform,
    build_multiview_transform,
    jitter_colors,
    load_digits_splits,
    resample_views,
)

# ---------------------------------------------------------------------------------------------
# Fake CIFAR files
# ---------------------------------------------------------------------------------------------

CIFAR10_TRAIN_PER_BATCH = 4
CIFAR10_TEST_SIZE = 5
CIFAR100_TRAIN_SIZE = 12
CIFAR100_TEST_SIZE = 6


def _md5(path: Path) -> str:
    return hashlib.md5(path.read_bytes()).hexdigest()


def _dump(path: Path, record: dict) -> None:
    # Protocol 2 and str keys, as in the Python 2 pickles that torchvision reads with latin1.
    with open(path, "wb") as file:
        pickle.dump(record, file, protocol=2)


def _random_rows(rng: np.random.Generator, count: int) -> np.ndarray:
    # One row per image: 1024 red, then 1024 green, then 1024 blue values of a 32x32 image.
    return rng.integers(0, 256, (count, 3072), dtype=np.uint8)


def write_cifar10(root: Path, seed: int = 0) -> dict[str, list]:
    """Write cifar-10-batches-py under `root` and return the md5 lists of the written files."""
    rng = np.random.default_rng(seed)
    folder = root / CIFAR10.base_folder
    folder.mkdir(parents=True)
    names = ["data_batch_1", "data_batch_2", "data_batch_3", "data_batch_4", "data_batch_5"]
    for index, name in enumerate(names, start=1):
        _dump(
            folder / name,
            {
                "batch_label": f"training batch {index} of 5",
                "labels": rng.integers(0, 10, CIFAR10_TRAIN_PER_BATCH).tolist(),
                "data": _random_rows(rng, CIFAR10_TRAIN_PER_BATCH),
                "filenames": [f"train_{index}_{i}.png" for i in range(CIFAR10_TRAIN_PER_BATCH)],
            },
        )
    _dump(
        folder / "test_batch",
        {
            "batch_label": "testing batch 1 of 1",
            "labels": rng.integers(0, 10, CIFAR10_TEST_SIZE).tolist(),
            "data": _random_rows(rng, CIFAR10_TEST_SIZE),
            "filenames": [f"test_{i}.png" for i in range(CIFAR10_TEST_SIZE)],
        },
    )
    label_names = ["airplane", "automobile", "bird", "cat", "deer"]
    label_names += ["dog", "frog", "horse", "ship", "truck"]
    _dump(
        folder / "batches.meta",
        {
            "num_cases_per_batch": CIFAR10_TRAIN_PER_BATCH,
            "label_names": label_names,
            "num_vis": 3072,
        },
    )
    return {
        "train_list": [[name, _md5(folder / name)] for name in names],
        "test_list": [["test_batch", _md5(folder / "test_batch")]],
        "meta": {**CIFAR10.meta, "md5": _md5(folder / "batches.meta")},
    }


def write_cifar100(root: Path, seed: int = 0) -> dict[str, list]:
    """Write cifar-100-python under `root` and return the md5 lists of the written files."""
    rng = np.random.default_rng(seed)
    folder = root / CIFAR100.base_folder
    folder.mkdir(parents=True)
    for name, count in (("train", CIFAR100_TRAIN_SIZE), ("test", CIFAR100_TEST_SIZE)):
        _dump(
            folder / name,
            {
                "filenames": [f"{name}_{i}.png" for i in range(count)],
                "batch_label": f"{name}ing batch 1 of 1",
                "fine_labels": rng.integers(0, 100, count).tolist(),
                "coarse_labels": rng.integers(0, 20, count).tolist(),
                "data": _random_rows(rng, count),
            },
        )
    _dump(
        folder / "meta",
        {
            "fine_label_names": [f"fine_{i}" for i in range(100)],
            "coarse_label_names": [f"coarse_{i}" for i in range(20)],
        },
    )
    return {
        "train_list": [["train", _md5(folder / "train")]],
        "test_list": [["test", _md5(folder / "test")]],
        "meta": {**CIFAR100.meta, "md5": _md5(folder / "meta")},
    }


CIFAR_WRITERS = {"cifar10": (CIFAR10, write_cifar10), "cifar100": (CIFAR100, write_cifar100)}


def _read_rows(path: Path) -> np.ndarray:
    with open(path, "rb") as file:
        return pickle.load(file, encoding="latin1")["data"]


def _unnormalize(image: torch.Tensor, name: str) -> torch.Tensor:
    stats = DATASET_STATS[name]
    mean = torch.tensor(stats.mean).view(3, 1, 1)
    std = torch.tensor(stats.std).view(3, 1, 1)
    return (image * std + mean) * 255


@pytest.mark.parametrize("name", ["cifar10", "cifar100"])
def test_cifar_reads_pickled_batches(
    name: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    dataset_class, write = CIFAR_WRITERS[name]
    for attribute, value in write(tmp_path).items():
        monkeypatch.setattr(dataset_class, attribute, value)

    def fail_download(*_: object) -> None:
        raise AssertionError("files are present and verified, so nothing should be downloaded")

    monkeypatch.setattr(data, "download_cifar", fail_download)

    datasets = build_datasets(name, str(tmp_path), download=True)

    train_size, test_size = {
        "cifar10": (5 * CIFAR10_TRAIN_PER_BATCH, CIFAR10_TEST_SIZE),
        "cifar100": (CIFAR100_TRAIN_SIZE, CIFAR100_TEST_SIZE),
    }[name]
    assert len(datasets.contrastive_train) == train_size
    assert len(datasets.memory) == train_size
    assert len(datasets.val) == test_size
    assert datasets.num_classes == {"cifar10": 10, "cifar100": 100}[name]
    assert datasets.image_size == 32

    test_file = dataset_class.test_list[0][0]
    rows = _read_rows(tmp_path / dataset_class.base_folder / test_file)
    image, label = datasets.val[1]
    expected = torch.from_numpy(rows[1].reshape(3, 32, 32)).to(torch.float32)
    torch.testing.assert_close(_unnormalize(image, name), expected, atol=1e-3, rtol=0)
    assert isinstance(label, int)

    views, _ = datasets.contrastive_train[0]
    assert views.shape == (2, 3, 32, 32)
    assert views.dtype == torch.float32


def test_cifar_keeps_integrity_check(tmp_path: Path) -> None:
    # The files are well formed but their md5 sums are not torchvision's, so they must be
    # rejected as corrupted.
    write_cifar10(tmp_path)

    with pytest.raises(ValueError, match="missing or corrupted.*set download to true"):
        build_datasets("cifar10", str(tmp_path), download=False)


def test_cifar_downloads_when_missing(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    md5s = write_cifar10(tmp_path / "template")
    for attribute, value in md5s.items():
        monkeypatch.setattr(CIFAR10, attribute, value)
    calls = []

    def copy_download(dataset_class: type, data_dir: str) -> None:
        calls.append((dataset_class, data_dir))
        source = tmp_path / "template" / dataset_class.base_folder
        shutil.copytree(source, Path(data_dir) / dataset_class.base_folder)

    monkeypatch.setattr(data, "download_cifar", copy_download)
    data_dir = tmp_path / "new" / "cifar"

    datasets = build_datasets("cifar10", str(data_dir))

    assert calls == [(CIFAR10, str(data_dir))]
    assert len(datasets.val) == CIFAR10_TEST_SIZE


def _load_with_slow_download(
    data_dir: str,
    template_dir: str,
    md5s: dict,
    calls_path: str,
    result_path: str,
    barrier: multiprocessing.synchronize.Barrier,
) -> None:
    """Child process: build CIFAR-10 with a downloader that copies files slowly."""
    torch.set_num_threads(1)
    for attribute, value in md5s.items():
        setattr(CIFAR10, attribute, value)

    def slow_download(dataset_class: type, root: str) -> None:
        with open(calls_path, "a") as calls:
            calls.write(f"{os.getpid()}\n")
        source = Path(template_dir) / dataset_class.base_folder
        target = Path(root) / dataset_class.base_folder
        target.mkdir()
        for path in sorted(source.iterdir()):
            time.sleep(0.2)
            shutil.copy(path, target / path.name)

    data.download_cifar = slow_download
    barrier.wait(timeout=120)
    datasets = build_datasets("cifar10", data_dir)
    with open(result_path, "w") as result:
        json.dump({"train": len(datasets.memory), "val": len(datasets.val)}, result)


def test_cifar_lock_downloads_once(tmp_path: Path) -> None:
    md5s = write_cifar10(tmp_path / "template")
    data_dir = tmp_path / "shared"
    data_dir.mkdir()
    calls_path = tmp_path / "download_calls.txt"
    context = multiprocessing.get_context("spawn")
    barrier = context.Barrier(2)

    processes = []
    for index in range(2):
        arguments = (
            str(data_dir),
            str(tmp_path / "template"),
            md5s,
            str(calls_path),
            str(tmp_path / f"result_{index}.json"),
            barrier,
        )
        process = context.Process(target=_load_with_slow_download, args=arguments)
        process.start()
        processes.append(process)
    for process in processes:
        process.join(timeout=180)

    assert [process.exitcode for process in processes] == [0, 0]
    assert len(calls_path.read_text().splitlines()) == 1
    for index in range(2):
        result = json.loads((tmp_path / f"result_{index}.json").read_text())
        assert result == {"train": 5 * CIFAR10_TRAIN_PER_BATCH, "val": CIFAR10_TEST_SIZE}


# ---------------------------------------------------------------------------------------------
# Image folders
# ---------------------------------------------------------------------------------------------

# Solid colours survive resizing unchanged, so the expected statistics are exact.
TRAIN_COLORS = {
    "cat": [(255, 0, 0), (0, 0, 255), (200, 100, 50)],
    "dog": [(0, 255, 0), (10, 20, 30)],
}
VAL_COLORS = {"cat": [(128, 128, 128)], "dog": [(50, 60, 70)]}


def _write_tree(root: Path, colors: dict[str, list[tuple[int, int, int]]]) -> None:
    for class_name, class_colors in colors.items():
        (root / class_name).mkdir(parents=True)
        for index, color in enumerate(class_colors):
            # Not square, so the loader's resize and centre crop both take effect.
            Image.new("RGB", (20, 12), color).save(root / class_name / f"{index}.png")


@pytest.fixture
def image_tree(tmp_path: Path) -> Path:
    _write_tree(tmp_path / "train", TRAIN_COLORS)
    _write_tree(tmp_path / "val", VAL_COLORS)
    return tmp_path


def _hash_files(root: Path) -> dict[str, str]:
    return {
        str(path.relative_to(root)): _md5(path)
        for path in sorted(root.rglob("*"))
        if path.is_file()
    }


def _expected_color_stats(colors: dict) -> tuple[np.ndarray, np.ndarray]:
    values = np.array([color for class_colors in colors.values() for color in class_colors]) / 255
    return values.mean(axis=0), values.std(axis=0)


def test_image_folder_stats_cached(image_tree: Path) -> None:
    before = _hash_files(image_tree / "train") | _hash_files(image_tree / "val")

    datasets = build_datasets("image_folder", str(image_tree), image_size=8)

    assert len(datasets.memory) == 5
    assert len(datasets.val) == 2
    assert datasets.num_classes == 2
    assert datasets.image_size == 8
    image, label = datasets.val[0]
    assert image.shape == (3, 8, 8)
    assert label == 0

    mean, std = _expected_color_stats(TRAIN_COLORS)
    cache = json.loads((image_tree / "normalization_stats_8px.json").read_text())
    np.testing.assert_allclose(cache["mean"], mean, atol=1e-6)
    np.testing.assert_allclose(cache["std"], std, atol=1e-6)
    # The grey validation image normalised with the train statistics.
    expected = (128 / 255 - mean) / std
    np.testing.assert_allclose(image[:, 0, 0].numpy(), expected, atol=1e-5)

    after = _hash_files(image_tree / "train") | _hash_files(image_tree / "val")
    assert after == before


def test_image_folder_reuses_cache(image_tree: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    build_datasets("image_folder", str(image_tree), image_size=8)

    def fail_compute(*_: object) -> None:
        raise AssertionError("statistics should come from the cache")

    monkeypatch.setattr(data, "compute_channel_stats", fail_compute)
    datasets = build_datasets("image_folder", str(image_tree), image_size=8)

    assert len(datasets.memory) == 5


def test_image_folder_stale_cache_recomputed(image_tree: Path) -> None:
    build_datasets("image_folder", str(image_tree), image_size=8)
    Image.new("RGB", (20, 12), (255, 255, 255)).save(image_tree / "train" / "dog" / "new.png")

    build_datasets("image_folder", str(image_tree), image_size=8)

    colors = {**TRAIN_COLORS, "dog": [*TRAIN_COLORS["dog"], (255, 255, 255)]}
    mean, _ = _expected_color_stats(colors)
    cache = json.loads((image_tree / "normalization_stats_8px.json").read_text())
    np.testing.assert_allclose(cache["mean"], mean, atol=1e-6)


def test_image_folder_mean_std_override(image_tree: Path) -> None:
    datasets = build_datasets(
        "image_folder", str(image_tree), image_size=8, mean=[0.5, 0.5, 0.5], std=[0.25, 0.5, 1.0]
    )

    image, _ = datasets.val[0]
    expected = (128 / 255 - 0.5) / np.array([0.25, 0.5, 1.0])
    np.testing.assert_allclose(image[:, 0, 0].numpy(), expected, atol=1e-5)
    assert not (image_tree / "normalization_stats_8px.json").exists()


def test_image_folder_reads_jpeg(tmp_path: Path) -> None:
    for split in ("train", "val"):
        (tmp_path / split / "only").mkdir(parents=True)
        Image.new("RGB", (16, 16), (90, 90, 90)).save(tmp_path / split / "only" / "a.JPG")
        Image.new("RGB", (16, 16), (90, 90, 90)).save(tmp_path / split / "only" / "b.jpeg")
        (tmp_path / split / "only" / "notes.txt").write_text("not an image")

    datasets = build_datasets("image_folder", str(tmp_path), image_size=16)

    assert len(datasets.memory) == 2
    assert datasets.num_classes == 1


def _make_bad_tree(root: Path, layout: str) -> None:
    """Write an image tree with one defect, named by `layout`."""
    if layout != "no_train":
        _write_tree(root / "train", TRAIN_COLORS)
    if layout == "no_val":
        return
    if layout == "different_classes":
        _write_tree(root / "val", {"cat": VAL_COLORS["cat"]})
    elif layout == "no_class_folders":
        (root / "val").mkdir()
    elif layout == "no_images":
        for class_name in TRAIN_COLORS:
            (root / "val" / class_name).mkdir(parents=True)
    else:
        _write_tree(root / "val", VAL_COLORS)


@pytest.mark.parametrize(
    ("layout", "message"),
    [
        ("no_train", "missing folder .*train"),
        ("no_val", "missing folder .*val"),
        ("no_class_folders", "Couldn't find any class folder"),
        ("no_images", "Found no valid file"),
        ("different_classes", r"val classes differ .* missing in val \['dog'\]"),
    ],
)
def test_image_folder_bad_layout(tmp_path: Path, layout: str, message: str) -> None:
    _make_bad_tree(tmp_path, layout)

    with pytest.raises(ValueError, match=message):
        build_datasets("image_folder", str(tmp_path))


@pytest.mark.parametrize(
    ("options", "message"),
    [
        ({"mean": [0.5, 0.5, 0.5]}, "give both mean and std"),
        ({"mean": [0.5, 0.5], "std": [0.2, 0.2, 0.2]}, "invalid mean"),
        ({"mean": [0.5, 0.5, 0.5], "std": [0.2, 0.0, 0.2]}, "positive std"),
        ({"image_size": 0}, "invalid image_size 0"),
        ({"size": 10}, r"unknown options \['size'\] for dataset 'image_folder'"),
    ],
)
def test_image_folder_bad_options(image_tree: Path, options: dict, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        build_datasets("image_folder", str(image_tree), **options)


def test_image_folder_missing_dir(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="is not a directory"):
        build_datasets("image_folder", str(tmp_path / "absent"))


# ---------------------------------------------------------------------------------------------
# Digits
# ---------------------------------------------------------------------------------------------


def test_digits_split_sizes_and_balance() -> None:
    train, val = load_digits_splits(16)

    assert len(train) == 1437
    assert len(val) == 360
    train_counts = np.bincount(train.labels, minlength=10)
    val_counts = np.bincount(val.labels, minlength=10)
    totals = train_counts + val_counts
    # Stratified: every class is split 80/20 up to rounding.
    assert np.all(np.abs(val_counts - 0.2 * totals) <= 1)
    assert val_counts.min() >= 35


def test_digits_images_shape_and_range() -> None:
    train, _ = load_digits_splits(16)

    assert train.images.shape == (1437, 3, 16, 16)
    assert train.images.dtype == torch.uint8
    assert train.images.min() == 0
    assert train.images.max() == 255
    torch.testing.assert_close(train.images[:, 0], train.images[:, 2], rtol=0, atol=0)


def test_digits_split_ignores_global_seed() -> None:
    torch.manual_seed(1)
    np.random.seed(1)
    first_train, first_val = load_digits_splits(16)
    torch.manual_seed(2)
    np.random.seed(2)
    second_train, second_val = load_digits_splits(16)

    assert first_train.labels == second_train.labels
    assert first_val.labels == second_val.labels
    torch.testing.assert_close(first_val.images, second_val.images, rtol=0, atol=0)


def test_digits_table_stats_match_train_split() -> None:
    mean, std = data.digits_pixel_stats()

    np.testing.assert_allclose(DATASET_STATS["digits"].mean, mean, atol=1e-4)
    np.testing.assert_allclose(DATASET_STATS["digits"].std, std, atol=1e-4)


def test_digits_without_data_dir() -> None:
    datasets = build_datasets("digits", None)

    views, label = datasets.contrastive_train[0]
    assert views.shape == (2, 3, 16, 16)
    assert 0 <= label < 10
    assert datasets.num_classes == 10
    assert datasets.image_size == 16
    assert datasets.classifier_train[0][0].shape == (3, 16, 16)


# ---------------------------------------------------------------------------------------------
# Synthetic
# ---------------------------------------------------------------------------------------------


def test_synthetic_shapes_and_options() -> None:
    datasets = build_datasets("synthetic", None, n_views=3, size=6, num_classes=4, image_size=12)

    views, label = datasets.contrastive_train[0]
    assert views.shape == (3, 3, 12, 12)
    assert 0 <= label < 4
    assert len(datasets.contrastive_train) == 6
    assert len(datasets.val) == 6
    assert datasets.num_classes == 4
    assert datasets.image_size == 12
    assert datasets.val[0][0].shape == (3, 12, 12)


def test_synthetic_is_deterministic() -> None:
    first = build_datasets("synthetic", None, size=4)
    torch.manual_seed(123)
    second = build_datasets("synthetic", None, size=4)

    for index in range(4):
        torch.testing.assert_close(first.val[index][0], second.val[index][0], rtol=0, atol=0)
        assert first.val[index][1] == second.val[index][1]


def test_default_collate_shapes() -> None:
    datasets = build_datasets("synthetic", None, size=8, image_size=16)

    views, labels = next(iter(DataLoader(datasets.contrastive_train, batch_size=4)))

    assert views.shape == (4, 2, 3, 16, 16)
    assert views.dtype == torch.float32
    assert labels.shape == (4,)
    assert labels.dtype == torch.int64


def test_datasets_pickle_for_workers(image_tree: Path) -> None:
    # DataLoader workers started with spawn receive the datasets pickled.
    for datasets in (
        build_datasets("synthetic", None, size=2),
        build_datasets("image_folder", str(image_tree), image_size=8),
    ):
        for dataset in (datasets.contrastive_train, datasets.classifier_train, datasets.val):
            copy = pickle.loads(pickle.dumps(dataset))
            assert copy[0][0].shape == dataset[0][0].shape


# ---------------------------------------------------------------------------------------------
# Input checks and augmentation settings
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("arguments", "message"),
    [
        ({"name": "mnist"}, r"unknown dataset 'mnist'; expected one of \['cifar10', 'cifar100'"),
        ({"name": "cifar10"}, "dataset 'cifar10' needs data_dir"),
        ({"name": "cifar100"}, "dataset 'cifar100' needs data_dir"),
        ({"name": "image_folder"}, "dataset 'image_folder' needs data_dir"),
        ({"name": "digits", "n_views": 0}, "invalid n_views 0; expected an integer >= 1"),
        ({"name": "digits", "n_views": 1.5}, "invalid n_views 1.5"),
        (
            {"name": "digits", "augmentation": {"blur": 0.5}},
            r"unknown augmentation keys \['blur'\]",
        ),
        ({"name": "digits", "size": 3}, r"unknown options \['size'\] for dataset 'digits'"),
        ({"name": "synthetic", "size": 0}, "invalid size 0"),
    ],
)
def test_build_datasets_bad_input(arguments: dict, message: str) -> None:
    arguments = {"data_dir": None, **arguments}

    with pytest.raises(ValueError, match=message):
        build_datasets(**arguments)


def test_dataset_names_match_registry() -> None:
    assert DATASET_NAMES == ("cifar10", "cifar100", "image_folder", "digits", "synthetic")
    assert set(DATASET_STATS) <= set(DATASET_NAMES)


def test_augmentation_config_dataset_defaults() -> None:
    cifar = AugmentationConfig.from_dict("cifar10", None)
    digits = AugmentationConfig.from_dict("digits", {})
    folder = AugmentationConfig.from_dict("image_folder", {})

    assert cifar == AugmentationConfig()
    assert cifar.crop_scale == (0.2, 1.0)
    assert cifar.color_jitter_strength == 0.4
    assert cifar.horizontal_flip
    assert not digits.horizontal_flip
    assert digits.color_jitter_prob == 0.0
    assert digits.grayscale_prob == 0.0
    assert folder == AugmentationConfig()


def test_augmentation_config_overrides() -> None:
    config = AugmentationConfig.from_dict(
        "digits", {"crop_scale": [0.3, 0.9], "rotation_degrees": 5}
    )

    assert config.crop_scale == (0.3, 0.9)
    assert config.rotation_degrees == 5
    assert not config.horizontal_flip


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        ({"flip": True}, r"unknown augmentation keys \['flip'\]; expected some of"),
        ({"crop_scale": [0.5]}, "invalid crop_scale"),
        ({"crop_scale": [0.8, 0.5]}, "invalid crop_scale"),
        ({"crop_scale": [0.0, 1.0]}, "invalid crop_scale"),
        ({"color_jitter_strength": 3.0}, r"invalid color_jitter_strength 3.0; expected a value"),
        ({"color_jitter_prob": -0.1}, "invalid color_jitter_prob"),
        ({"grayscale_prob": "high"}, "invalid grayscale_prob 'high'; expected a number"),
        ({"horizontal_flip": "no"}, "invalid horizontal_flip 'no'; expected true or false"),
        ({"rotation_degrees": 200}, "invalid rotation_degrees 200"),
    ],
)
def test_augmentation_config_bad_overrides(overrides: dict, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        AugmentationConfig.from_dict("cifar10", overrides)


def test_augmentation_config_unknown_dataset() -> None:
    with pytest.raises(ValueError, match="unknown dataset 'svhn'"):
        AugmentationConfig.from_dict("svhn", {})


# ---------------------------------------------------------------------------------------------
# Augmentation kernels against torchvision
# ---------------------------------------------------------------------------------------------

# float32 kernels that take different but equivalent steps agree to about 1e-6.
KERNEL_TOLERANCE = {"rtol": 0, "atol": 1e-5}


@pytest.mark.parametrize("shift", [-0.5, -0.25, -0.1, 0.0, 0.05, 0.3, 0.5])
def test_adjust_hue_matches_torchvision(shift: float) -> None:
    torch.manual_seed(0)
    images = torch.rand(2, 3, 9, 7)
    images[1, :, :2] = 0.5  # grey pixels have no hue

    torch.testing.assert_close(
        adjust_hue(images, shift), TF.adjust_hue(images, shift), **KERNEL_TOLERANCE
    )


def test_jitter_colors_matches_torchvision() -> None:
    torch.manual_seed(0)
    images = torch.rand(1, 3, 8, 8)
    factors = (1.3, 0.7, 1.2, 0.05)
    kernels = [
        lambda image: TF.adjust_brightness(image, factors[0]),
        lambda image: TF.adjust_contrast(image, factors[1]),
        lambda image: TF.adjust_saturation(image, factors[2]),
        lambda image: TF.adjust_hue(image, factors[3]),
    ]

    for order in itertools.permutations(range(4)):
        expected = images
        for operation in order:
            expected = kernels[operation](expected)
        torch.testing.assert_close(
            jitter_colors(images, factors, order), expected, **KERNEL_TOLERANCE
        )


def _view(**changes: object) -> ViewParams:
    identity = ViewParams(
        top=0,
        left=0,
        height=16,
        width=16,
        flip=False,
        angle=0.0,
        jitter_factors=None,
        jitter_order=(0, 1, 2, 3),
        grayscale=False,
    )
    return dataclasses.replace(identity, **changes)


def test_resample_views_crop_flip_rotate() -> None:
    torch.manual_seed(0)
    image = torch.rand(3, 24, 20)
    box = {"top": 4, "left": 3, "height": 16, "width": 16}
    views = [_view(**box), _view(**box, flip=True), _view(**box, angle=90.0)]

    resampled = resample_views(image, views, size=16)

    crop = image[:, 4:20, 3:19]
    torch.testing.assert_close(resampled[0], crop, **KERNEL_TOLERANCE)
    torch.testing.assert_close(resampled[1], crop.flip(-1), **KERNEL_TOLERANCE)
    torch.testing.assert_close(resampled[2], torch.rot90(crop, 1, dims=(1, 2)), **KERNEL_TOLERANCE)


def test_resample_views_matches_resized_crop() -> None:
    torch.manual_seed(0)
    image = torch.rand(3, 24, 20)

    resampled = resample_views(image, [_view(top=2, left=5, height=10, width=12)], size=16)[0]

    expected = TF.resized_crop(image, 2, 5, 10, 12, [16, 16], antialias=False)
    # Away from the box edge, where torchvision clamps to the crop and grid_sample does not.
    torch.testing.assert_close(
        resampled[:, 2:-2, 2:-2], expected[:, 2:-2, 2:-2], **KERNEL_TOLERANCE
    )


def test_sample_crop_box_stays_in_image_and_scale() -> None:
    torch.manual_seed(0)
    height, width, scale = 32, 24, (0.2, 0.6)
    uniforms = torch.rand(500, 2 * data.CROP_ATTEMPTS + 2).tolist()

    for draws in uniforms:
        top, left, box_height, box_width = data._sample_crop_box(draws, height, width, scale)
        assert top >= 0
        assert top + box_height <= height
        assert left >= 0
        assert left + box_width <= width
        # Rounding each side to whole pixels adds or removes at most half a row and a column.
        area = box_height * box_width / (height * width)
        assert area >= scale[0] - 0.04
        assert area <= scale[1] + 0.04


def test_sample_crop_box_falls_back_to_centre() -> None:
    # Full-area crops with the widest aspect ratio never fit, so every attempt fails.
    draws = [0.0, 1.0] * data.CROP_ATTEMPTS + [0.5, 0.5]

    assert data._sample_crop_box(draws, 32, 32, (1.0, 1.0)) == (0, 0, 32, 32)
    assert data._sample_crop_box(draws, 40, 20, (1.0, 1.0)) == (6, 0, 27, 20)


# ---------------------------------------------------------------------------------------------
# Transforms
# ---------------------------------------------------------------------------------------------

STATS = DATASET_STATS["cifar10"]
# Whole-image crops without flips or colour changes: every view equals the source image.
NO_CHANGE = AugmentationConfig(
    crop_scale=(1.0, 1.0),
    color_jitter_strength=0.0,
    color_jitter_prob=0.0,
    grayscale_prob=0.0,
    horizontal_flip=False,
)


def _random_image(seed: int = 0, size: int = 32) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    return torch.randint(0, 256, (3, size, size), generator=generator, dtype=torch.uint8)


def test_eval_transform_deterministic() -> None:
    image = _random_image()
    transform = build_eval_transform(STATS)

    first = transform(image)
    second = transform(image)

    torch.testing.assert_close(first, second, rtol=0, atol=0)
    mean = torch.tensor(STATS.mean).view(3, 1, 1)
    std = torch.tensor(STATS.std).view(3, 1, 1)
    torch.testing.assert_close(first, (image / 255 - mean) / std, **KERNEL_TOLERANCE)


def test_multiview_transform_views_differ() -> None:
    torch.manual_seed(0)
    transform = build_multiview_transform(STATS, AugmentationConfig(), n_views=2)

    views = transform(_random_image())

    assert views.shape == (2, 3, 32, 32)
    assert views.dtype == torch.float32
    assert not torch.allclose(views[0], views[1])


def test_multiview_transform_identity_equals_eval() -> None:
    image = _random_image()
    transform = build_multiview_transform(STATS, NO_CHANGE, n_views=3)

    views = transform(image)

    assert views.shape == (3, 3, 32, 32)
    expected = build_eval_transform(STATS)(image)
    for view in views:
        torch.testing.assert_close(view, expected, **KERNEL_TOLERANCE)


def test_multiview_transform_flip_only_mirrors() -> None:
    torch.manual_seed(0)
    image = _random_image()
    flips = dataclasses.replace(NO_CHANGE, horizontal_flip=True)
    transform = build_multiview_transform(STATS, flips, n_views=64)

    views = transform(image)

    expected = build_eval_transform(STATS)(image)
    mirrored = [bool(torch.allclose(view, expected.flip(-1), atol=1e-5)) for view in views]
    unchanged = [bool(torch.allclose(view, expected, atol=1e-5)) for view in views]
    assert all(a != b for a, b in zip(mirrored, unchanged, strict=True))
    assert 10 < sum(mirrored) < 54


def test_multiview_transform_views_close_to_source() -> None:
    # Smooth images (4x4 noise upsampled) change little under mild crops and colour jitter
    # without flips, so each view stays nearer its own image than any other.
    torch.manual_seed(0)
    coarse = torch.rand(8, 3, 4, 4)
    smooth = torch.nn.functional.interpolate(coarse, size=32, mode="bilinear")
    images = (smooth * 255).round().to(torch.uint8)  # (8, 3, 32, 32)
    mild = dataclasses.replace(NO_CHANGE, crop_scale=(0.8, 1.0), color_jitter_strength=0.1)
    mild = dataclasses.replace(mild, color_jitter_prob=1.0)
    augment = build_multiview_transform(STATS, mild, n_views=2)
    evaluate = build_eval_transform(STATS)
    sources = torch.stack([evaluate(image) for image in images])

    for index, image in enumerate(images):
        views = augment(image)
        assert not torch.allclose(views[0], views[1])
        for view in views:
            distances = (sources - view).flatten(1).norm(dim=1)
            assert int(distances.argmin()) == index


def test_multiview_transform_grayscale_views() -> None:
    torch.manual_seed(0)
    gray = dataclasses.replace(NO_CHANGE, grayscale_prob=1.0)
    stats = dataclasses.replace(STATS, mean=(0.5, 0.5, 0.5), std=(0.25, 0.25, 0.25))
    transform = build_multiview_transform(stats, gray, n_views=2)

    views = transform(_random_image())

    torch.testing.assert_close(views[:, 0], views[:, 1], **KERNEL_TOLERANCE)
    torch.testing.assert_close(views[:, 0], views[:, 2], **KERNEL_TOLERANCE)


def test_multiview_transform_single_view() -> None:
    transform = build_multiview_transform(STATS, AugmentationConfig(), n_views=1)

    assert transform(_random_image()).shape == (1, 3, 32, 32)


def test_multiview_transform_bad_view_count() -> None:
    with pytest.raises(ValueError, match="invalid n_views 0"):
        build_multiview_transform(STATS, AugmentationConfig(), n_views=0)


def test_classifier_transform_shape_and_padding() -> None:
    torch.manual_seed(0)
    transform = build_classifier_transform(STATS, AugmentationConfig(horizontal_flip=False))
    image = torch.full((3, 32, 32), 255, dtype=torch.uint8)

    outputs = [transform(image) for _ in range(20)]

    assert all(output.shape == (3, 32, 32) for output in outputs)
    assert all(output.dtype == torch.float32 for output in outputs)
    # Crops that reach into the zero padding show black pixels, normalised to -mean / std.
    black = -torch.tensor(STATS.mean) / torch.tensor(STATS.std)
    padded = [bool(torch.isclose(output[:, 0, 0], black).all()) for output in outputs]
    assert any(padded)
