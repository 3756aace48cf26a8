"""Datasets and augmentations shared by the SupCon and SimCLR trials.

Both trials call `build_datasets`, which looks the dataset name up in `DATASETS` and returns the
contrastive, classifier, memory-bank and validation datasets. The multi-view augmentation is the
SupCon recipe (arXiv 2004.11362, after SimCLR, arXiv 2002.05709) run on uint8 tensors, with every
view batched through one affine resampling instead of per-view PIL calls.

To add a dataset, write a builder that returns `RawSplits` and register it in `DATASETS`.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import math
import os
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from functools import partial
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from filelock import FileLock
from PIL import Image
from torch.utils.data import Dataset
from torchvision.datasets import CIFAR10, CIFAR100, DatasetFolder
from torchvision.datasets.folder import find_classes
from torchvision.datasets.utils import check_integrity, download_and_extract_archive
from torchvision.transforms import v2

logger = logging.getLogger(__name__)

# ---------------------------------------------------------------------------------------------
# Augmentation settings and per-dataset statistics
# ---------------------------------------------------------------------------------------------

# Aspect-ratio range of the random resized crop, torchvision's default.
CROP_RATIO = (3 / 4, 4 / 3)
# Attempts at a crop inside the image before the centre-crop fallback, as in torchvision.
CROP_ATTEMPTS = 10


# Allowed closed range of each numeric AugmentationConfig field.
_AUGMENTATION_RANGES = {
    "color_jitter_strength": (0, 2),
    "color_jitter_prob": (0, 1),
    "grayscale_prob": (0, 1),
    "rotation_degrees": (0, 180),
}


@dataclass(frozen=True)
class AugmentationConfig:
    """Strengths of the contrastive augmentation, drawn independently for each view.

    Defaults are the SupCon CIFAR recipe (HobbitLong/SupContrast, main_supcon.py):
    RandomResizedCrop(scale=(0.2, 1.0)), horizontal flip, ColorJitter(0.4, 0.4, 0.4, 0.1)
    with probability 0.8 and grayscale with probability 0.2.

    Attributes:
        crop_scale: Range of the crop area as a fraction of the image area. Raise the lower
            bound for small or centred objects, where a 20% crop may miss the object.
        color_jitter_strength: Brightness, contrast and saturation factors are drawn from
            [1 - s, 1 + s] and the hue shift from [-s/4, s/4], so 0.4 gives hue 0.1 as in
            SupCon. Set 0 to turn colour jitter off. At most 2.
        color_jitter_prob: Probability that a view is colour-jittered.
        grayscale_prob: Probability that a view is converted to grayscale (kept as 3 channels).
        horizontal_flip: Mirror half of the views. Turn off where mirroring changes the class,
            as for digits.
        rotation_degrees: Each view is rotated by an angle drawn from [-d, d] degrees. Corners
            outside the image repeat the border pixels.
    """

    crop_scale: tuple[float, float] = (0.2, 1.0)
    color_jitter_strength: float = 0.4
    color_jitter_prob: float = 0.8
    grayscale_prob: float = 0.2
    horizontal_flip: bool = True
    rotation_degrees: float = 0.0

    def __post_init__(self) -> None:
        if not isinstance(self.horizontal_flip, bool):
            raise ValueError(
                f"invalid horizontal_flip {self.horizontal_flip!r}; expected true or false"
            )
        low, high = self.crop_scale
        if not 0 < low <= high <= 1:
            raise ValueError(
                f"invalid crop_scale {self.crop_scale!r}; expected (low, high) with "
                "0 < low <= high <= 1"
            )
        for field, (minimum, maximum) in _AUGMENTATION_RANGES.items():
            value = getattr(self, field)
            if isinstance(value, bool) or not isinstance(value, (int, float)):
                raise ValueError(f"invalid {field} {value!r}; expected a number")
            if not minimum <= value <= maximum:
                raise ValueError(
                    f"invalid {field} {value!r}; expected a value in [{minimum}, {maximum}]"
                )

    @classmethod
    def from_dict(
        cls, dataset_name: str, overrides: Mapping[str, Any] | None = None
    ) -> AugmentationConfig:
        """Return the defaults of `dataset_name` with the fields in `overrides` replaced.

        Args:
            dataset_name: A name in `DATASET_NAMES`. Datasets without an entry in
                `DATASET_STATS` start from the class defaults.
            overrides: Field names and values, for example the `augmentation` section of
                the experiment configuration. A list is accepted for `crop_scale`.

        Raises:
            ValueError: If the dataset is unknown, a key is not a field or a value is out of
                range.
        """
        _check_dataset_name(dataset_name)
        stats = DATASET_STATS.get(dataset_name)
        base = stats.augmentation if stats is not None else cls()
        overrides = dict(overrides or {})

        fields = [field.name for field in dataclasses.fields(cls)]
        unknown = sorted(set(overrides) - set(fields))
        if unknown:
            raise ValueError(f"unknown augmentation keys {unknown}; expected some of {fields}")
        if "crop_scale" in overrides:
            overrides["crop_scale"] = _as_float_pair("crop_scale", overrides["crop_scale"])
        return dataclasses.replace(base, **overrides)


@dataclass(frozen=True)
class DatasetStats:
    """Normalisation statistics, class count, image size and augmentation defaults.

    `mean` and `std` are per channel, on images scaled to [0, 1]. `image_size` is the side of
    the square images that the model receives.
    """

    mean: tuple[float, float, float]
    std: tuple[float, float, float]
    num_classes: int
    image_size: int
    augmentation: AugmentationConfig = AugmentationConfig()


DATASET_STATS: dict[str, DatasetStats] = {
    # Per-channel pixel mean and std of the 50,000 training images: the widely published
    # values, not recomputed here. SupContrast's main_supcon.py has the same mean but
    # std (0.2023, 0.1994, 0.2010).
    "cifar10": DatasetStats(
        mean=(0.4914, 0.4822, 0.4465), std=(0.2470, 0.2435, 0.2616), num_classes=10, image_size=32
    ),
    # Mean and std from SupContrast's main_supcon.py (HobbitLong/SupContrast).
    "cifar100": DatasetStats(
        mean=(0.5071, 0.4867, 0.4408), std=(0.2675, 0.2565, 0.2761), num_classes=100, image_size=32
    ),
    # Pixel mean and std of the 1437 training images as served (16x16, uint8 / 255), computed
    # by `digits_pixel_stats`. The images are grey, so the three channels agree.
    "digits": DatasetStats(
        mean=(0.3054, 0.3054, 0.3054),
        std=(0.3186, 0.3186, 0.3186),
        num_classes=10,
        image_size=16,
        # A mirrored digit is another digit or none, and grey images have no colour to jitter.
        # Crops keep at least half of the image because the 8x8 originals have little detail
        # to spare. Rotating by up to 10 degrees changed the 20-NN accuracy of 6-epoch runs
        # (ResNet-18 at width 0.25) by less than the 2 points between seeds, so it stays off.
        augmentation=AugmentationConfig(
            crop_scale=(0.5, 1.0),
            color_jitter_strength=0.0,
            color_jitter_prob=0.0,
            grayscale_prob=0.0,
            horizontal_flip=False,
        ),
    ),
    # Uniform random bytes: mean 127.5 / 255 and std sqrt((256**2 - 1) / 12) / 255.
    "synthetic": DatasetStats(
        mean=(0.5, 0.5, 0.5), std=(0.2898, 0.2898, 0.2898), num_classes=10, image_size=32
    ),
}


def _as_float_pair(name: str, value: Any) -> tuple[float, float]:
    message = f"invalid {name} {value!r}; expected two numbers such as [0.2, 1.0]"
    if not isinstance(value, Sequence) or isinstance(value, str) or len(value) != 2:
        raise ValueError(message)
    try:
        return float(value[0]), float(value[1])
    except (TypeError, ValueError):
        raise ValueError(message) from None


# ---------------------------------------------------------------------------------------------
# Transforms. Every dataset yields uint8 tensors (3, H, W) and the transforms produce float32.
# ---------------------------------------------------------------------------------------------

# ITU-R 601-2 luma weights, the ones torchvision's rgb_to_grayscale uses.
_GRAY_WEIGHTS = torch.tensor([0.2989, 0.587, 0.114]).view(1, 3, 1, 1)
# hsv_to_rgb evaluates k = (n + 6 h) mod 6 with n = 5, 3, 1 for red, green and blue.
_HSV_CHANNEL_OFFSETS = torch.tensor([5.0, 3.0, 1.0]).view(1, 3, 1, 1)

_BRIGHTNESS, _CONTRAST, _SATURATION, _HUE = range(4)


@dataclass(frozen=True)
class ViewParams:
    """Random parameters of one augmented view.

    The crop box is in input pixels. `jitter_factors` contains the brightness, contrast and
    saturation factors and the hue shift, and `jitter_order` the order in which they apply.
    """

    top: int
    left: int
    height: int
    width: int
    flip: bool
    angle: float
    jitter_factors: tuple[float, float, float, float] | None
    jitter_order: tuple[int, ...]
    grayscale: bool


def _grayscale(images: torch.Tensor) -> torch.Tensor:
    return (images * _GRAY_WEIGHTS).sum(dim=1, keepdim=True)  # (V, 1, H, W)


def _sample_crop_box(
    uniforms: list[float], height: int, width: int, scale: tuple[float, float]
) -> tuple[int, int, int, int]:
    """Draw (top, left, height, width) as torchvision's RandomResizedCrop.get_params does.

    `uniforms` contains 2 * CROP_ATTEMPTS + 2 numbers in [0, 1): two per attempt and two for the
    position. The fallback after failed attempts is the largest centred crop within CROP_RATIO.
    """
    area = height * width
    log_low, log_high = math.log(CROP_RATIO[0]), math.log(CROP_RATIO[1])
    for attempt in range(CROP_ATTEMPTS):
        target_area = area * (scale[0] + (scale[1] - scale[0]) * uniforms[2 * attempt])
        aspect = math.exp(log_low + (log_high - log_low) * uniforms[2 * attempt + 1])
        crop_width = round(math.sqrt(target_area * aspect))
        crop_height = round(math.sqrt(target_area / aspect))
        if 0 < crop_width <= width and 0 < crop_height <= height:
            top = math.floor(uniforms[-2] * (height - crop_height + 1))
            left = math.floor(uniforms[-1] * (width - crop_width + 1))
            return top, left, crop_height, crop_width

    aspect = width / height
    if aspect < CROP_RATIO[0]:
        crop_width, crop_height = width, round(width / CROP_RATIO[0])
    elif aspect > CROP_RATIO[1]:
        crop_width, crop_height = round(height * CROP_RATIO[1]), height
    else:
        crop_width, crop_height = width, height
    return (height - crop_height) // 2, (width - crop_width) // 2, crop_height, crop_width


def resample_views(image: torch.Tensor, views: Sequence[ViewParams], size: int) -> torch.Tensor:
    """Crop, resize, flip and rotate one image once per view, in one batched resampling.

    Each view is the crop box resized to `size` x `size` with bilinear interpolation, then
    mirrored and rotated counter-clockwise about its centre. Samples outside the image repeat
    the border pixels. Unlike torchvision's resized_crop, output pixels at the edge of the box
    may blend in the input pixel just outside it. A crop smaller than `size` is upsampled, so
    no antialiasing is needed, but crops larger than `size` are downsampled without it.

    Args:
        image: Float image (3, H, W).
        views: Crop box, flip and angle of each view.
        size: Side of the output views.

    Returns:
        The views (V, 3, size, size).
    """
    _, height, width = image.shape
    # Each row contains, for one view, the affine map from output to input coordinates, both in
    # grid_sample's normalised [-1, 1] range: x_in = a * x_out + b * y_out + c (same for y).
    # The map is scale(box) @ rotate(angle) @ mirror(flip), then a shift to the box centre.
    rows = []
    for view in views:
        scale_x, scale_y = view.width / width, view.height / height
        mirror = -1.0 if view.flip else 1.0
        cos, sin = math.cos(math.radians(view.angle)), math.sin(math.radians(view.angle))
        x_coefficients = [scale_x * cos * mirror, scale_y * sin * mirror]
        y_coefficients = [-scale_x * sin, scale_y * cos]
        centre = [
            (2 * view.left + view.width) / width - 1,
            (2 * view.top + view.height) / height - 1,
        ]
        rows.append([x_coefficients, y_coefficients, centre])
    affine = torch.tensor(rows, dtype=image.dtype)  # (V, 3, 2)

    # Pixel centres of the output in normalised coordinates, align_corners=False convention.
    positions = (torch.arange(size, dtype=image.dtype) * 2 + 1) / size - 1  # (size,)
    count = len(views)
    grid = (
        positions.view(1, 1, size, 1) * affine[:, 0].view(count, 1, 1, 2)
        + positions.view(1, size, 1, 1) * affine[:, 1].view(count, 1, 1, 2)
        + affine[:, 2].view(count, 1, 1, 2)
    )  # (V, size, size, 2)
    batch = image.unsqueeze(0).expand(count, -1, -1, -1)  # (V, 3, H, W)
    return F.grid_sample(batch, grid, mode="bilinear", padding_mode="border", align_corners=False)


def adjust_hue(images: torch.Tensor, shift: float) -> torch.Tensor:
    """Shift the hue of float RGB images (N, 3, H, W) by `shift` turns, as torchvision does.

    Converts to HSV, adds `shift` to the hue modulo 1 and converts back, in fewer tensor
    operations than torchvision's adjust_hue.
    """
    red, green, blue = images.unbind(dim=1)  # each (N, H, W)
    value = torch.maximum(torch.maximum(red, green), blue)
    chroma = value - torch.minimum(torch.minimum(red, green), blue)
    safe_chroma = torch.where(chroma > 0, chroma, 1.0)

    # Hue in sixths of a turn, [0, 6) up to the final modulo.
    hue = torch.where(
        value == red,
        (green - blue) / safe_chroma,
        torch.where(
            value == green, (blue - red) / safe_chroma + 2, (red - green) / safe_chroma + 4
        ),
    )
    sector = torch.remainder(hue.unsqueeze(1) + _HSV_CHANNEL_OFFSETS + 6 * shift, 6)  # (N, 3, H, W)
    weight = torch.minimum(sector, 4 - sector).clamp_(0, 1)
    return value.unsqueeze(1) - chroma.unsqueeze(1) * weight


def jitter_colors(
    images: torch.Tensor, factors: tuple[float, float, float, float], order: Sequence[int]
) -> torch.Tensor:
    """Apply brightness, contrast, saturation and hue changes in `order`, as ColorJitter does.

    Args:
        images: Float RGB images (N, 3, H, W) in [0, 1].
        factors: Brightness, contrast and saturation factors (1 keeps the image) and the hue
            shift in turns (0 keeps it).
        order: Permutation of 0 (brightness), 1 (contrast), 2 (saturation) and 3 (hue).

    Returns:
        The jittered images, clamped to [0, 1] after each step like torchvision's kernels.
    """
    brightness, contrast, saturation, hue = factors
    for operation in order:
        if operation == _BRIGHTNESS:
            images = (images * brightness).clamp_(0, 1)
        elif operation == _CONTRAST:
            mean = _grayscale(images).mean(dim=(1, 2, 3), keepdim=True)  # (N, 1, 1, 1)
            images = torch.lerp(mean, images, contrast).clamp_(0, 1)
        elif operation == _SATURATION:
            images = torch.lerp(_grayscale(images), images, saturation).clamp_(0, 1)
        elif operation == _HUE:
            images = adjust_hue(images, hue)
    return images


def _check_n_views(n_views: int) -> None:
    if not isinstance(n_views, int) or isinstance(n_views, bool) or n_views < 1:
        raise ValueError(f"invalid n_views {n_views!r}; expected an integer >= 1")


class MultiViewTransform:
    """Transform a uint8 image (3, H, W) into V augmented, normalised views (V, 3, S, S).

    Each view gets its own crop, flip, rotation, colour jitter (in its own random order) and
    grayscale draw, like V independent calls of the torchvision pipeline. Resampling,
    grayscale and normalisation run once for all views. Random numbers come from torch's
    global generator, which DataLoader seeds differently in each worker.
    """

    def __init__(self, stats: DatasetStats, augmentation: AugmentationConfig, n_views: int) -> None:
        _check_n_views(n_views)
        self.size = stats.image_size
        self.augmentation = augmentation
        self.n_views = n_views
        self.mean = torch.tensor(stats.mean).view(1, 3, 1, 1)
        self.std = torch.tensor(stats.std).view(1, 3, 1, 1)

    def sample_views(self, height: int, width: int) -> list[ViewParams]:
        """Draw the random parameters of every view of one image of the given size."""
        augmentation = self.augmentation
        crop_count = 2 * CROP_ATTEMPTS + 2
        # Crop numbers, then flip, angle, jitter, grayscale draws, 4 factors, 4 order keys.
        uniforms = torch.rand(self.n_views, crop_count + 12).tolist()

        views = []
        for draws in uniforms:
            top, left, box_height, box_width = _sample_crop_box(
                draws[:crop_count], height, width, augmentation.crop_scale
            )
            flip_draw, angle_draw, jitter_draw, gray_draw = draws[crop_count : crop_count + 4]
            factor_draws = draws[crop_count + 4 : crop_count + 8]
            order_keys = draws[crop_count + 8 :]

            jitter_factors = None
            strength = augmentation.color_jitter_strength
            if strength > 0 and jitter_draw < augmentation.color_jitter_prob:
                low = max(0.0, 1 - strength)
                scaled = [low + (1 + strength - low) * draw for draw in factor_draws[:3]]
                hue_shift = strength / 4 * (2 * factor_draws[3] - 1)
                jitter_factors = (scaled[0], scaled[1], scaled[2], hue_shift)

            views.append(
                ViewParams(
                    top=top,
                    left=left,
                    height=box_height,
                    width=box_width,
                    flip=augmentation.horizontal_flip and flip_draw < 0.5,
                    angle=augmentation.rotation_degrees * (2 * angle_draw - 1),
                    jitter_factors=jitter_factors,
                    # Sorting four uniform keys gives a uniformly random permutation.
                    jitter_order=tuple(sorted(range(4), key=order_keys.__getitem__)),
                    grayscale=gray_draw < augmentation.grayscale_prob,
                )
            )
        return views

    def __call__(self, image: torch.Tensor) -> torch.Tensor:
        """Return the views (V, 3, S, S) of a uint8 image (3, H, W), normalised."""
        views = self.sample_views(image.shape[-2], image.shape[-1])
        pixels = image.to(torch.float32).div_(255)  # (3, H, W)
        batch = resample_views(pixels, views, self.size)  # (V, 3, S, S)

        jittered = [
            jitter_colors(batch[index : index + 1], view.jitter_factors, view.jitter_order)
            if view.jitter_factors is not None
            else batch[index : index + 1]
            for index, view in enumerate(views)
        ]
        batch = torch.cat(jittered)

        to_gray = [view.grayscale for view in views]
        if any(to_gray):
            mask = torch.tensor(to_gray).view(-1, 1, 1, 1)
            batch = torch.where(mask, _grayscale(batch), batch)
        return (batch - self.mean) / self.std


def build_multiview_transform(
    stats: DatasetStats, augmentation: AugmentationConfig, n_views: int
) -> MultiViewTransform:
    """Build the contrastive transform: uint8 image (3, H, W) to views (V, 3, S, S).

    Raises:
        ValueError: If `n_views` is not an integer >= 1.
    """
    return MultiViewTransform(stats, augmentation, n_views)


def build_eval_transform(stats: DatasetStats) -> v2.Compose:
    """Build the deterministic transform: uint8 image to normalised float32 (3, H, W)."""
    return v2.Compose([v2.ToDtype(torch.float32, scale=True), v2.Normalize(stats.mean, stats.std)])


def build_classifier_transform(stats: DatasetStats, augmentation: AugmentationConfig) -> v2.Compose:
    """Build the light training transform of the linear classifier.

    A random crop from the image padded by S/8 pixels of zeros on each side, the standard
    CIFAR classifier augmentation, and a horizontal flip where `augmentation` allows it.
    """
    steps: list[Callable[..., Any]] = [
        v2.RandomCrop(stats.image_size, padding=stats.image_size // 8)
    ]
    if augmentation.horizontal_flip:
        steps.append(v2.RandomHorizontalFlip())
    steps += [v2.ToDtype(torch.float32, scale=True), v2.Normalize(stats.mean, stats.std)]
    return v2.Compose(steps)


# ---------------------------------------------------------------------------------------------
# Dataset containers
# ---------------------------------------------------------------------------------------------


class TensorImageDataset(Dataset):
    """Images held in memory as one uint8 tensor (N, 3, H, W), with integer labels."""

    def __init__(self, images: torch.Tensor, labels: Sequence[int]) -> None:
        if images.dtype != torch.uint8 or images.dim() != 4 or images.shape[1] != 3:
            raise ValueError(
                f"expected uint8 images (N, 3, H, W), got {images.dtype} {images.shape}"
            )
        if len(images) != len(labels):
            raise ValueError(f"got {len(images)} images but {len(labels)} labels")
        self.images = images
        self.labels = [int(label) for label in labels]

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int]:
        return self.images[index], self.labels[index]


class TransformedDataset(Dataset):
    """A dataset of (uint8 image, label) pairs seen through a transform of the image."""

    def __init__(self, base: Dataset, transform: Callable[[torch.Tensor], torch.Tensor]) -> None:
        self.base = base
        self.transform = transform

    def __len__(self) -> int:
        return len(self.base)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int]:
        image, label = self.base[index]
        return self.transform(image), label


@dataclass(frozen=True)
class RawSplits:
    """Untransformed train and val splits and their statistics, returned by a dataset builder.

    Both splits yield (uint8 image (3, S, S), int label) with S = `stats.image_size`.
    """

    train: Dataset
    val: Dataset
    stats: DatasetStats


@dataclass(frozen=True)
class Datasets:
    """The four datasets that the trials load, with the class count and image size.

    Attributes:
        contrastive_train: Items (views float32 (V, C, H, W), label int).
        classifier_train: Items (image float32 (C, H, W), label int) with the classifier
            transform.
        memory: The training images with the evaluation transform, for the kNN memory bank.
        val: Items (image float32 (C, H, W), label int) with the evaluation transform.
        num_classes: Number of classes.
        image_size: Side of the square images.
    """

    contrastive_train: Dataset
    classifier_train: Dataset
    memory: Dataset
    val: Dataset
    num_classes: int
    image_size: int


# ---------------------------------------------------------------------------------------------
# CIFAR-10 and CIFAR-100
# ---------------------------------------------------------------------------------------------

_CIFAR_CLASSES: dict[str, type[CIFAR10]] = {"cifar10": CIFAR10, "cifar100": CIFAR100}


def download_cifar(dataset_class: type[CIFAR10], data_dir: str) -> None:
    """Download and extract a CIFAR archive into `data_dir` with torchvision's downloader."""
    download_and_extract_archive(
        dataset_class.url, data_dir, filename=dataset_class.filename, md5=dataset_class.tgz_md5
    )


def _cifar_files_verified(dataset_class: type[CIFAR10], data_dir: str) -> bool:
    folder = os.path.join(data_dir, dataset_class.base_folder)
    expected = [*dataset_class.train_list, *dataset_class.test_list]
    expected.append([dataset_class.meta["filename"], dataset_class.meta["md5"]])
    return all(check_integrity(os.path.join(folder, name), md5) for name, md5 in expected)


def _build_cifar(name: str, data_dir: str, download: bool) -> RawSplits:
    """Load CIFAR-10 or CIFAR-100 from `data_dir`, downloading it first if needed.

    A file lock in `data_dir` lets one process per node check the md5 sums and download while
    the other processes wait. Every process then reads the extracted files.
    """
    dataset_class = _CIFAR_CLASSES[name]
    os.makedirs(data_dir, exist_ok=True)
    with FileLock(os.path.join(data_dir, f"{name}.lock")):
        if not _cifar_files_verified(dataset_class, data_dir):
            if not download:
                folder = os.path.join(data_dir, dataset_class.base_folder)
                raise ValueError(
                    f"{name} files are missing or corrupted in {folder!r}; set download to true "
                    f"or extract {dataset_class.filename} into {data_dir!r}"
                )
            logger.info("downloading %s into %s", name, data_dir)
            download_cifar(dataset_class, data_dir)

    splits = []
    for train in (True, False):
        dataset = dataset_class(data_dir, train=train, download=False)
        images = torch.from_numpy(dataset.data).permute(0, 3, 1, 2)  # (N, 3, 32, 32) uint8
        splits.append(TensorImageDataset(images, dataset.targets))
    return RawSplits(train=splits[0], val=splits[1], stats=DATASET_STATS[name])


# ---------------------------------------------------------------------------------------------
# Image folders: the template for custom datasets
# ---------------------------------------------------------------------------------------------

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg")


def _load_resized_image(path: str, image_size: int) -> torch.Tensor:
    """Read an image as RGB, resize its shorter side to `image_size` and centre-crop a square."""
    with Image.open(path) as image:
        image = image.convert("RGB")
    image = v2.functional.resize(image, image_size)
    image = v2.functional.center_crop(image, image_size)
    return v2.functional.pil_to_tensor(image)  # (3, image_size, image_size) uint8


def _fingerprint_files(data_dir: str, paths: Sequence[str]) -> str:
    """Hash the relative path, size and modification time of every file."""
    digest = hashlib.sha256()
    for path in sorted(paths):
        status = os.stat(path)
        relative = os.path.relpath(path, data_dir)
        digest.update(f"{relative}\0{status.st_size}\0{status.st_mtime_ns}\n".encode())
    return digest.hexdigest()


def compute_channel_stats(images: Dataset) -> tuple[list[float], list[float]]:
    """Return the per-channel mean and std over every pixel of a dataset of uint8 images."""
    total = torch.zeros(3, dtype=torch.float64)
    total_squares = torch.zeros(3, dtype=torch.float64)
    pixels = 0
    for index in range(len(images)):
        image = images[index][0].to(torch.float64).div_(255)  # (3, H, W)
        total += image.sum(dim=(1, 2))
        total_squares += image.square().sum(dim=(1, 2))
        pixels += image.shape[1] * image.shape[2]
    mean = total / pixels
    std = (total_squares / pixels - mean.square()).clamp_(min=0).sqrt()
    return mean.tolist(), std.tolist()


def _read_cached_stats(path: str, fingerprint: str) -> tuple[list[float], list[float]] | None:
    try:
        with open(path) as file:
            cached = json.load(file)
    except (OSError, ValueError):
        return None
    if cached.get("fingerprint") != fingerprint:
        return None
    return cached["mean"], cached["std"]


def _image_folder_stats(
    data_dir: str, train: DatasetFolder, image_size: int
) -> tuple[list[float], list[float]]:
    """Return the train mean and std, computed once and cached in `data_dir`.

    The cache is normalization_stats_<image_size>px.json next to train/ and val/. It is
    recomputed when a training image is added, removed or changed. If `data_dir` is read-only,
    the statistics are computed on every run.
    """
    cache_path = os.path.join(data_dir, f"normalization_stats_{image_size}px.json")
    fingerprint = _fingerprint_files(data_dir, [path for path, _ in train.samples])
    cached = _read_cached_stats(cache_path, fingerprint)
    if cached is not None:
        return cached

    if not os.access(data_dir, os.W_OK):
        logger.warning("%s is read-only, so normalisation statistics are not cached", data_dir)
        return compute_channel_stats(train)

    with FileLock(cache_path + ".lock"):
        # Another process may have written the cache while this one waited for the lock.
        cached = _read_cached_stats(cache_path, fingerprint)
        if cached is not None:
            return cached
        logger.info("computing normalisation statistics of %d images", len(train))
        mean, std = compute_channel_stats(train)
        record = {"fingerprint": fingerprint, "image_size": image_size, "mean": mean, "std": std}
        temporary_path = cache_path + ".tmp"
        with open(temporary_path, "w") as file:
            json.dump(record, file, indent=2)
        os.replace(temporary_path, cache_path)
    return mean, std


def _check_image_folder(data_dir: str) -> None:
    """Raise ValueError unless data_dir has train/ and val/ with the same class folders."""
    if not os.path.isdir(data_dir):
        raise ValueError(f"data_dir {data_dir!r} is not a directory; create it or fix the path")
    classes = {}
    for split in ("train", "val"):
        root = os.path.join(data_dir, split)
        if not os.path.isdir(root):
            raise ValueError(
                f"missing folder {root!r}; image_folder expects "
                f"{data_dir}/train/<class>/*.png and {data_dir}/val/<class>/*.png"
            )
        try:
            classes[split], _ = find_classes(root)
        except FileNotFoundError as error:
            raise ValueError(f"{error}; put the images of each class in {root}/<class>/") from None
    if classes["train"] != classes["val"]:
        missing = sorted(set(classes["train"]) - set(classes["val"]))
        extra = sorted(set(classes["val"]) - set(classes["train"]))
        raise ValueError(
            f"val classes differ from train classes in {data_dir!r}: missing in val {missing}, "
            f"not in train {extra}; give val/ the same class folders as train/"
        )


def _build_image_folder(
    data_dir: str,
    download: bool,
    image_size: int = 32,
    mean: Sequence[float] | None = None,
    std: Sequence[float] | None = None,
) -> RawSplits:
    """Load data_dir/train/<class>/*.png|jpg|jpeg and data_dir/val/<class>/*.

    Images are resized (shorter side to `image_size`, then a centred square) as they are read.
    Without `mean` and `std`, the statistics come from the training images, see
    `_image_folder_stats`. The images themselves are never written. `download` is ignored.
    """
    if not isinstance(image_size, int) or isinstance(image_size, bool) or image_size < 1:
        raise ValueError(f"invalid image_size {image_size!r}; expected a positive integer")
    if (mean is None) != (std is None):
        raise ValueError("give both mean and std for image_folder, or neither to compute them")
    if mean is not None:
        mean, std = _as_channel_triple("mean", mean), _as_channel_triple("std", std)
        if min(std) <= 0:
            raise ValueError(f"invalid std {std!r}; every channel needs a positive std")
    _check_image_folder(data_dir)

    loader = partial(_load_resized_image, image_size=image_size)
    splits = {}
    for split in ("train", "val"):
        root = os.path.join(data_dir, split)
        try:
            splits[split] = DatasetFolder(root, loader=loader, extensions=IMAGE_EXTENSIONS)
        except FileNotFoundError as error:
            raise ValueError(f"{error}; add {'/'.join(IMAGE_EXTENSIONS)} images") from None

    if mean is None:
        mean, std = _image_folder_stats(data_dir, splits["train"], image_size)
        if min(std) <= 0:
            raise ValueError(
                f"the training images in {data_dir!r} have zero std in a channel ({std}); "
                "give the mean and std options"
            )
    stats = DatasetStats(
        mean=tuple(mean),
        std=tuple(std),
        num_classes=len(splits["train"].classes),
        image_size=image_size,
    )
    return RawSplits(train=splits["train"], val=splits["val"], stats=stats)


def _as_channel_triple(name: str, values: Sequence[float]) -> tuple[float, float, float]:
    message = f"invalid {name} {values!r}; expected three numbers, one per channel"
    if isinstance(values, str) or not isinstance(values, Sequence) or len(values) != 3:
        raise ValueError(message)
    try:
        return float(values[0]), float(values[1]), float(values[2])
    except (TypeError, ValueError):
        raise ValueError(message) from None


# ---------------------------------------------------------------------------------------------
# Handwritten digits from scikit-learn: the embedded default
# ---------------------------------------------------------------------------------------------

# Fraction and seed of the stratified split: 1437 train and 360 val images.
DIGITS_VAL_FRACTION = 0.2
DIGITS_SPLIT_SEED = 0
# Pixel values of sklearn's digits run from 0 to 16.
_DIGITS_MAX_VALUE = 16.0


def load_digits_splits(image_size: int) -> tuple[TensorImageDataset, TensorImageDataset]:
    """Load scikit-learn's 1797 8x8 digits as RGB uint8 images, split 80/20 by class.

    The split depends only on DIGITS_SPLIT_SEED, not on global random state. Images are
    upsampled bilinearly to `image_size` and copied into 3 channels.
    """
    # Imported here because scikit-learn adds about a second to every import of this module.
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    digits = load_digits()
    pixels = torch.from_numpy(digits.images).to(torch.float32).unsqueeze(1)  # (1797, 1, 8, 8)
    pixels = F.interpolate(pixels, size=image_size, mode="bilinear", align_corners=False)
    images = (pixels / _DIGITS_MAX_VALUE * 255).round().clamp(0, 255).to(torch.uint8)
    images = images.expand(-1, 3, -1, -1).contiguous()  # (1797, 3, S, S)

    indices = np.arange(len(digits.target))
    train_indices, val_indices = train_test_split(
        indices,
        test_size=DIGITS_VAL_FRACTION,
        stratify=digits.target,
        random_state=DIGITS_SPLIT_SEED,
    )
    train_indices, val_indices = np.sort(train_indices), np.sort(val_indices)
    labels = digits.target
    return (
        TensorImageDataset(images[train_indices], labels[train_indices].tolist()),
        TensorImageDataset(images[val_indices], labels[val_indices].tolist()),
    )


def digits_pixel_stats() -> tuple[list[float], list[float]]:
    """Compute the digits mean and std that DATASET_STATS records, from the train split."""
    train, _ = load_digits_splits(DATASET_STATS["digits"].image_size)
    return compute_channel_stats(train)


def _build_digits(data_dir: str | None, download: bool) -> RawSplits:
    """Serve the digits that ship with scikit-learn. Both arguments are ignored."""
    stats = DATASET_STATS["digits"]
    train, val = load_digits_splits(stats.image_size)
    return RawSplits(train=train, val=val, stats=stats)


# ---------------------------------------------------------------------------------------------
# Synthetic images for smoke tests
# ---------------------------------------------------------------------------------------------

SYNTHETIC_SEED = 0


def _build_synthetic(
    data_dir: str | None,
    download: bool,
    size: int = 256,
    num_classes: int = 10,
    image_size: int = 32,
) -> RawSplits:
    """Make `size` train and `size` val images of uniform random bytes with random labels.

    The same options give the same images on every call and in every process.
    """
    for name, value in (("size", size), ("num_classes", num_classes), ("image_size", image_size)):
        if not isinstance(value, int) or isinstance(value, bool) or value < 1:
            raise ValueError(f"invalid {name} {value!r}; expected a positive integer")
    generator = torch.Generator().manual_seed(SYNTHETIC_SEED)
    splits = []
    for _ in ("train", "val"):
        images = torch.randint(0, 256, (size, 3, image_size, image_size), generator=generator)
        labels = torch.randint(0, num_classes, (size,), generator=generator)
        splits.append(TensorImageDataset(images.to(torch.uint8), labels.tolist()))
    stats = dataclasses.replace(
        DATASET_STATS["synthetic"], num_classes=num_classes, image_size=image_size
    )
    return RawSplits(train=splits[0], val=splits[1], stats=stats)


# ---------------------------------------------------------------------------------------------
# Registry
# ---------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class DatasetSpec:
    """A registered dataset: its builder, the options it accepts and whether it needs data_dir.

    The builder is called as `build(data_dir, download, **options)` and returns `RawSplits`.
    """

    build: Callable[..., RawSplits]
    options: tuple[str, ...] = ()
    needs_data_dir: bool = False


DATASETS: dict[str, DatasetSpec] = {
    "cifar10": DatasetSpec(partial(_build_cifar, "cifar10"), needs_data_dir=True),
    "cifar100": DatasetSpec(partial(_build_cifar, "cifar100"), needs_data_dir=True),
    "image_folder": DatasetSpec(
        _build_image_folder, options=("image_size", "mean", "std"), needs_data_dir=True
    ),
    "digits": DatasetSpec(_build_digits),
    "synthetic": DatasetSpec(_build_synthetic, options=("size", "num_classes", "image_size")),
}
DATASET_NAMES = tuple(DATASETS)


def _check_dataset_name(name: str) -> None:
    if name not in DATASETS:
        raise ValueError(f"unknown dataset {name!r}; expected one of {list(DATASET_NAMES)}")


def build_datasets(
    name: str,
    data_dir: str | None,
    n_views: int = 2,
    augmentation: Mapping[str, Any] | None = None,
    download: bool = True,
    **options: Any,
) -> Datasets:
    """Build the contrastive, classifier, memory-bank and validation datasets of `name`.

    Args:
        name: A name in `DATASET_NAMES`.
        data_dir: Folder of the dataset. CIFAR is downloaded into it, and image_folder reads
            train/ and val/ from it. digits and synthetic ignore it, so it may be None.
        n_views: Augmented views per image in `contrastive_train`.
        augmentation: Overrides of the dataset's `AugmentationConfig` fields.
        download: Download CIFAR when its files are missing.
        **options: Dataset options: image_size, mean and std for image_folder, and size,
            num_classes and image_size for synthetic.

    Returns:
        The datasets. DataLoader's default collate gives views (B, V, C, H, W) float32 and
        labels (B,) int64.

    Raises:
        ValueError: If the name, an option, an augmentation key, `n_views` or `data_dir` is
            invalid, or the files in `data_dir` do not form the dataset.
    """
    _check_dataset_name(name)
    spec = DATASETS[name]
    unknown = sorted(set(options) - set(spec.options))
    if unknown:
        accepted = list(spec.options)
        hint = f"expected some of {accepted}" if accepted else "it takes no options; remove them"
        raise ValueError(f"unknown options {unknown} for dataset {name!r}; {hint}")
    if spec.needs_data_dir and not data_dir:
        raise ValueError(f"dataset {name!r} needs data_dir; set it to the folder of the dataset")
    if data_dir:
        data_dir = os.path.expanduser(data_dir)
    augmentation_config = AugmentationConfig.from_dict(name, augmentation)
    _check_n_views(n_views)

    splits = spec.build(data_dir, download, **options)
    stats = splits.stats
    logger.info(
        "dataset %s: %d train and %d val images, %d classes, %dx%d pixels, augmentation %s",
        name,
        len(splits.train),
        len(splits.val),
        stats.num_classes,
        stats.image_size,
        stats.image_size,
        augmentation_config,
    )

    eval_transform = build_eval_transform(stats)
    return Datasets(
        contrastive_train=TransformedDataset(
            splits.train, build_multiview_transform(stats, augmentation_config, n_views)
        ),
        classifier_train=TransformedDataset(
            splits.train, build_classifier_transform(stats, augmentation_config)
        ),
        memory=TransformedDataset(splits.train, eval_transform),
        val=TransformedDataset(splits.val, eval_transform),
        num_classes=stats.num_classes,
        image_size=stats.image_size,
    )
