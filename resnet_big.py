"""ResNet encoders for small images and the contrastive network built on them.

Both trials build `SupConResNet` (encoder plus projection head) and `LinearClassifier` from here.
The encoder is the ResNet of "Deep Residual Learning for Image Recognition" (arXiv 1512.03385)
with the CIFAR stem that SupCon (arXiv 2004.11362) uses: a 3x3 stride-1 first convolution and no
max-pool. The ImageNet stem is an option, and `width` scales every channel count for CPU runs.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn
from torchvision.models.resnet import BasicBlock, Bottleneck


@dataclass(frozen=True)
class BackboneSpec:
    """Residual block type and number of blocks in each of the four stages."""

    block: type[BasicBlock] | type[Bottleneck]
    layers: tuple[int, int, int, int]


BACKBONES: dict[str, BackboneSpec] = {
    "resnet18": BackboneSpec(BasicBlock, (2, 2, 2, 2)),
    "resnet34": BackboneSpec(BasicBlock, (3, 4, 6, 3)),
    "resnet50": BackboneSpec(Bottleneck, (3, 4, 6, 3)),
    "resnet101": BackboneSpec(Bottleneck, (3, 4, 23, 3)),
}
STEMS = ("cifar", "imagenet")
HEADS = ("mlp", "linear")

# Channels of the first stage at width 1.0. Every later stage doubles them.
BASE_CHANNELS = 64


def _check_choice(kind: str, value: str, choices: list[str] | tuple[str, ...]) -> None:
    if value not in choices:
        raise ValueError(f"unknown {kind} {value!r}; expected one of {list(choices)}")


def _build_stem(stem: str, channels: int) -> nn.Sequential:
    if stem == "cifar":
        # 32x32 inputs keep their resolution into the first stage.
        conv = nn.Conv2d(3, channels, kernel_size=3, stride=1, padding=1, bias=False)
        return nn.Sequential(conv, nn.BatchNorm2d(channels), nn.ReLU(inplace=True))
    conv = nn.Conv2d(3, channels, kernel_size=7, stride=2, padding=3, bias=False)
    pool = nn.MaxPool2d(kernel_size=3, stride=2, padding=1)
    return nn.Sequential(conv, nn.BatchNorm2d(channels), nn.ReLU(inplace=True), pool)


def _build_stage(
    block: type[BasicBlock] | type[Bottleneck],
    in_channels: int,
    planes: int,
    num_blocks: int,
    stride: int,
) -> nn.Sequential:
    out_channels = planes * block.expansion
    downsample = None
    if stride != 1 or in_channels != out_channels:
        downsample = nn.Sequential(
            nn.Conv2d(in_channels, out_channels, kernel_size=1, stride=stride, bias=False),
            nn.BatchNorm2d(out_channels),
        )
    blocks = [block(in_channels, planes, stride, downsample)]
    blocks += [block(out_channels, planes) for _ in range(num_blocks - 1)]
    return nn.Sequential(*blocks)


class ResNetEncoder(nn.Module):
    """ResNet without its classifier: stem, four stages, global average pool and flatten.

    Built by `build_encoder`. `feature_dim` is the size of the pooled embedding.
    """

    def __init__(self, spec: BackboneSpec, stem: str, width: float) -> None:
        super().__init__()
        base = max(1, round(BASE_CHANNELS * width))
        self.stem = _build_stem(stem, base)

        stages = []
        in_channels = base
        for index, num_blocks in enumerate(spec.layers):
            planes = base * 2**index
            stride = 1 if index == 0 else 2
            stages.append(_build_stage(spec.block, in_channels, planes, num_blocks, stride))
            in_channels = planes * spec.block.expansion
        self.stages = nn.Sequential(*stages)
        self.feature_dim = in_channels

        # Same initialisation as torchvision's ResNet.
        for module in self.modules():
            if isinstance(module, nn.Conv2d):
                nn.init.kaiming_normal_(module.weight, mode="fan_out", nonlinearity="relu")
            elif isinstance(module, nn.BatchNorm2d):
                nn.init.ones_(module.weight)
                nn.init.zeros_(module.bias)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        """Map images (N, 3, H, W) to embeddings (N, feature_dim)."""
        features = self.stages(self.stem(images))  # (N, feature_dim, H', W')
        return torch.flatten(F.adaptive_avg_pool2d(features, 1), 1)  # (N, feature_dim)


def build_encoder(name: str, stem: str = "cifar", width: float = 1.0) -> tuple[nn.Module, int]:
    """Build a ResNet encoder that outputs the pooled embedding.

    Args:
        name: Backbone name, a key of `BACKBONES`.
        stem: "cifar" (3x3 stride-1 convolution, no max-pool) for 32x32 images, or "imagenet"
            (7x7 stride-2 convolution and 3x3 stride-2 max-pool) for larger images.
        width: Multiplier of every channel count: 1.0 is the standard ResNet, 0.5 half and
            0.25 quarter width for quick CPU runs.

    Returns:
        The encoder and the size of its embedding (512 for resnet18/34 and 2048 for
        resnet50/101 at width 1.0).

    Raises:
        ValueError: If `name` or `stem` is unknown or `width` is not positive.
    """
    _check_choice("backbone", name, list(BACKBONES))
    _check_choice("stem", stem, STEMS)
    if not width > 0:
        raise ValueError(f"invalid width {width!r}; expected a positive multiplier such as 1.0")
    encoder = ResNetEncoder(BACKBONES[name], stem, width)
    return encoder, encoder.feature_dim


class SupConResNet(nn.Module):
    """ResNet encoder followed by a projection head whose output lies on the unit sphere.

    The contrastive loss uses the normalised projection, and the linear evaluation uses the
    encoder embedding, as in SupCon and SimCLR.
    """

    def __init__(
        self,
        backbone: str = "resnet50",
        head: str = "mlp",
        projection_dim: int = 128,
        stem: str = "cifar",
        width: float = 1.0,
    ) -> None:
        """Build the encoder and the projection head.

        Args:
            backbone: Backbone name, a key of `BACKBONES`.
            head: "mlp" (Linear, ReLU, Linear, as in SimCLR) or "linear" (one Linear layer).
            projection_dim: Size of the projection that the loss compares.
            stem: "cifar" or "imagenet", see `build_encoder`.
            width: Channel multiplier, see `build_encoder`.

        Raises:
            ValueError: If `backbone`, `head` or `stem` is unknown or `width` is not positive.
        """
        super().__init__()
        _check_choice("head", head, HEADS)
        self.encoder, self.feature_dim = build_encoder(backbone, stem=stem, width=width)
        if head == "mlp":
            self.head: nn.Module = nn.Sequential(
                nn.Linear(self.feature_dim, self.feature_dim),
                nn.ReLU(inplace=True),
                nn.Linear(self.feature_dim, projection_dim),
            )
        else:
            self.head = nn.Linear(self.feature_dim, projection_dim)

    def forward(
        self, images: torch.Tensor, return_embedding: bool = False
    ) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
        """Project images (N, 3, H, W) onto the unit sphere.

        Args:
            images: Normalised image batch.
            return_embedding: Also return the encoder output. Under DistributedDataParallel
                only `forward` may be called, so a trial that needs both the projection and the
                embedding gets them from this one call.

        Returns:
            The L2-normalised projection (N, projection_dim), or the tuple (projection,
            embedding) with the embedding (N, feature_dim) when `return_embedding` is true.
        """
        embedding = self.encoder(images)  # (N, feature_dim)
        projection = F.normalize(self.head(embedding), dim=1)  # (N, projection_dim)
        if return_embedding:
            return projection, embedding
        return projection


class LinearClassifier(nn.Module):
    """One linear layer from the encoder embedding to class logits, for linear evaluation."""

    def __init__(self, feature_dim: int, num_classes: int) -> None:
        super().__init__()
        self.fc = nn.Linear(feature_dim, num_classes)

    def forward(self, embedding: torch.Tensor) -> torch.Tensor:
        """Map embeddings (N, feature_dim) to logits (N, num_classes)."""
        return self.fc(embedding)


def convert_sync_batchnorm(model: nn.Module) -> nn.Module:
    """Replace every BatchNorm layer of `model` with SyncBatchNorm.

    Multi-GPU trials call this before wrapping the model, so that batch statistics are computed
    over the global batch. Returns the converted model with the same weights.
    """
    return nn.SyncBatchNorm.convert_sync_batchnorm(model)
