"""Throughput of the two-view contrastive augmentation, one worker process, one thread.

Compares the PIL pipeline of the SupContrast recipe (torchvision.transforms v1), the same recipe
in torchvision.transforms.v2 on uint8 tensors (colour jitter on uint8 and on float), and
`data.MultiViewTransform`, the default of data.py. Prints a markdown table.

Run from the repository root: `.venv/bin/python benchmarks/augment_bench.py`.
"""

from __future__ import annotations

import argparse
import platform
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torchvision
from PIL import Image
from torchvision import transforms as transforms_v1
from torchvision.transforms import v2

# The benchmark lives in benchmarks/, one level below data.py.
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from data import DATASET_STATS, AugmentationConfig, build_multiview_transform  # noqa: E402

STATS = DATASET_STATS["cifar10"]
VIEWS = 2


def _pil_pipeline(size: int) -> Callable[[Image.Image], torch.Tensor]:
    return transforms_v1.Compose(
        [
            transforms_v1.RandomResizedCrop(size, scale=(0.2, 1.0)),
            transforms_v1.RandomHorizontalFlip(),
            transforms_v1.RandomApply([transforms_v1.ColorJitter(0.4, 0.4, 0.4, 0.1)], p=0.8),
            transforms_v1.RandomGrayscale(p=0.2),
            transforms_v1.ToTensor(),
            transforms_v1.Normalize(STATS.mean, STATS.std),
        ]
    )


def _v2_pipeline(size: int, jitter_on_float: bool) -> Callable[[torch.Tensor], torch.Tensor]:
    crop_and_flip = [
        v2.RandomResizedCrop(size, scale=(0.2, 1.0), antialias=True),
        v2.RandomHorizontalFlip(),
    ]
    color = [
        v2.RandomApply([v2.ColorJitter(0.4, 0.4, 0.4, 0.1)], p=0.8),
        v2.RandomGrayscale(p=0.2),
    ]
    to_float = [v2.ToDtype(torch.float32, scale=True)]
    normalize = [v2.Normalize(STATS.mean, STATS.std)]
    if jitter_on_float:
        return v2.Compose(crop_and_flip + to_float + color + normalize)
    return v2.Compose(crop_and_flip + color + to_float + normalize)


def _two_views(transform: Callable[[Any], torch.Tensor]) -> Callable[[Any], torch.Tensor]:
    def apply(image: Any) -> torch.Tensor:
        return torch.stack([transform(image) for _ in range(VIEWS)])  # (V, 3, S, S)

    return apply


def _variants(size: int) -> dict[str, tuple[Callable[[np.ndarray], Any], Callable]]:
    """Map each variant's name to (conversion of an HWC uint8 array, two-view transform).

    The conversion is part of the timed work, as it is in a dataset's __getitem__.
    """
    to_pil = Image.fromarray

    def to_tensor(array: np.ndarray) -> torch.Tensor:
        return torch.from_numpy(array).permute(2, 0, 1)  # (3, H, W) uint8

    batched = build_multiview_transform(STATS, AugmentationConfig(), VIEWS)
    return {
        "(a) PIL + transforms v1 (SupContrast recipe)": (to_pil, _two_views(_pil_pipeline(size))),
        "(b) transforms.v2 on uint8 tensors": (
            to_tensor,
            _two_views(_v2_pipeline(size, jitter_on_float=False)),
        ),
        "(c) transforms.v2, jitter on float32": (
            to_tensor,
            _two_views(_v2_pipeline(size, jitter_on_float=True)),
        ),
        "(d) data.MultiViewTransform (views batched)": (to_tensor, batched),
    }


def _images_per_second(
    convert: Callable[[np.ndarray], Any], transform: Callable, images: np.ndarray
) -> float:
    for array in images[:50]:
        transform(convert(array))
    start = time.perf_counter()
    for array in images:
        transform(convert(array))
    return len(images) / (time.perf_counter() - start)


def _cpu_name() -> str:
    try:
        with open("/proc/cpuinfo") as cpuinfo:
            for line in cpuinfo:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=2000, help="images per timed run")
    parser.add_argument("--repeats", type=int, default=5, help="timed runs; the median is shown")
    parser.add_argument("--size", type=int, default=32, help="image side in pixels")
    arguments = parser.parse_args()

    torch.set_num_threads(1)
    torch.manual_seed(0)
    generator = np.random.default_rng(0)
    images = generator.integers(0, 256, (arguments.images, arguments.size, arguments.size, 3))
    images = images.astype(np.uint8)

    variants = _variants(arguments.size)
    rates: dict[str, list[float]] = {name: [] for name in variants}
    # Interleave the variants so that load from other processes affects all of them alike.
    for _ in range(arguments.repeats):
        for name, (convert, transform) in variants.items():
            rates[name].append(_images_per_second(convert, transform, images))

    baseline = statistics.median(next(iter(rates.values())))
    print(
        f"{VIEWS} views of {arguments.size}x{arguments.size} images, 1 process, 1 thread, "
        f"median of {arguments.repeats} runs of {arguments.images} images; "
        f"torch {torch.__version__}, torchvision {torchvision.__version__}, "
        f"Python {platform.python_version()}, CPU {_cpu_name()}"
    )
    print()
    print("| pipeline | images/s | views/s | vs (a) |")
    print("|---|---:|---:|---:|")
    for name, values in rates.items():
        rate = statistics.median(values)
        print(f"| {name} | {rate:,.0f} | {rate * VIEWS:,.0f} | {rate / baseline:.2f}x |")


if __name__ == "__main__":
    main()
