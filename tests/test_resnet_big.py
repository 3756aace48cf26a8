"""Tests for resnet_big: shapes, parameter counts, gradients, heads and input checks."""

import copy

import pytest
import torch
import torchvision
from torch import nn

from resnet_big import (
    BACKBONES,
    LinearClassifier,
    SupConResNet,
    build_encoder,
    convert_sync_batchnorm,
)

# Quarter width and 32x32 (CIFAR stem) or 64x64 (ImageNet stem) inputs keep every depth fast.
SMALL_WIDTH = 0.25
INPUT_SIZE = {"cifar": 32, "imagenet": 64}


def _count_parameters(module: nn.Module) -> int:
    return sum(parameter.numel() for parameter in module.parameters())


@pytest.mark.parametrize("stem", ["cifar", "imagenet"])
@pytest.mark.parametrize("backbone", list(BACKBONES))
def test_supcon_resnet_shapes_and_unit_norm(backbone: str, stem: str) -> None:
    torch.manual_seed(0)
    model = SupConResNet(backbone, projection_dim=32, stem=stem, width=SMALL_WIDTH)
    size = INPUT_SIZE[stem]
    images = torch.randn(3, 3, size, size)

    projection, embedding = model(images, return_embedding=True)

    expansion = BACKBONES[backbone].block.expansion
    assert model.feature_dim == 16 * 8 * expansion
    assert projection.shape == (3, 32)
    assert embedding.shape == (3, model.feature_dim)
    torch.testing.assert_close(projection.norm(dim=1), torch.ones(3), atol=1e-5, rtol=0)


@pytest.mark.parametrize(
    ("backbone", "feature_dim"),
    [("resnet18", 512), ("resnet34", 512), ("resnet50", 2048), ("resnet101", 2048)],
)
def test_build_encoder_feature_dim_at_full_width(backbone: str, feature_dim: int) -> None:
    encoder, dim = build_encoder(backbone)

    assert dim == feature_dim
    with torch.no_grad():
        assert encoder(torch.randn(1, 3, 32, 32)).shape == (1, feature_dim)


@pytest.mark.parametrize(
    ("backbone", "expected"),
    [("resnet18", 11.17e6), ("resnet50", 23.5e6)],
)
def test_build_encoder_cifar_parameter_count(backbone: str, expected: float) -> None:
    # Sizes of torchvision's ResNets without fc, less the 7x7 stem plus the 3x3 one, within 1%.
    encoder, _ = build_encoder(backbone)

    assert _count_parameters(encoder) == pytest.approx(expected, rel=0.01)


@pytest.mark.parametrize("backbone", ["resnet18", "resnet50"])
def test_build_encoder_imagenet_stem_matches_torchvision(backbone: str) -> None:
    encoder, _ = build_encoder(backbone, stem="imagenet")
    reference = getattr(torchvision.models, backbone)(weights=None)

    expected = _count_parameters(reference) - _count_parameters(reference.fc)
    assert _count_parameters(encoder) == expected


def test_build_encoder_width_scales_channels() -> None:
    _, half = build_encoder("resnet18", width=0.5)
    _, quarter = build_encoder("resnet50", width=0.25)

    assert half == 256
    assert quarter == 512


def test_supcon_resnet_forward_backward_on_cpu() -> None:
    torch.manual_seed(0)
    model = SupConResNet("resnet18", width=SMALL_WIDTH)
    images = torch.randn(4, 3, 32, 32)

    projection = model(images)
    projection.sum().backward()

    assert projection.shape == (4, 128)
    for name, parameter in model.named_parameters():
        assert parameter.grad is not None, name
        assert torch.isfinite(parameter.grad).all(), name
    assert model.encoder.stem[0].weight.grad.abs().sum() > 0


def test_supcon_resnet_return_embedding_matches_encoder() -> None:
    torch.manual_seed(0)
    model = SupConResNet("resnet18", width=SMALL_WIDTH).eval()
    images = torch.randn(2, 3, 32, 32)

    with torch.no_grad():
        projection, embedding = model(images, return_embedding=True)
        projection_only = model(images)
        expected_embedding = model.encoder(images)

    torch.testing.assert_close(projection, projection_only, rtol=0, atol=0)
    torch.testing.assert_close(embedding, expected_embedding, rtol=0, atol=0)


@pytest.mark.parametrize(("head", "num_linear"), [("mlp", 2), ("linear", 1)])
def test_supcon_resnet_head_layers(head: str, num_linear: int) -> None:
    model = SupConResNet("resnet18", head=head, projection_dim=64, width=SMALL_WIDTH)

    linears = [module for module in model.head.modules() if isinstance(module, nn.Linear)]
    assert len(linears) == num_linear
    assert linears[0].in_features == model.feature_dim
    assert linears[-1].out_features == 64


def test_linear_classifier_shapes() -> None:
    classifier = LinearClassifier(feature_dim=128, num_classes=10)

    logits = classifier(torch.randn(5, 128))

    assert logits.shape == (5, 10)


def test_convert_sync_batchnorm_keeps_outputs() -> None:
    torch.manual_seed(0)
    model = SupConResNet("resnet18", width=SMALL_WIDTH)
    reference = copy.deepcopy(model)
    images = torch.randn(4, 3, 32, 32)

    converted = convert_sync_batchnorm(model)

    kinds = {type(module) for module in converted.modules()}
    assert nn.SyncBatchNorm in kinds
    assert nn.BatchNorm2d not in kinds
    # Without a process group, SyncBatchNorm falls back to plain batch norm in training mode.
    torch.testing.assert_close(converted(images), reference(images), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize(
    ("arguments", "message"),
    [
        ({"backbone": "resnet5"}, "unknown backbone 'resnet5'; expected one of ['resnet18'"),
        ({"stem": "tiny"}, "unknown stem 'tiny'; expected one of ['cifar', 'imagenet']"),
        ({"head": "deep"}, "unknown head 'deep'; expected one of ['mlp', 'linear']"),
        ({"width": 0.0}, "invalid width 0.0"),
        ({"width": -0.5}, "invalid width -0.5"),
    ],
)
def test_supcon_resnet_bad_arguments(arguments: dict, message: str) -> None:
    with pytest.raises(ValueError, match=message.replace("[", r"\[")):
        SupConResNet(**arguments)
