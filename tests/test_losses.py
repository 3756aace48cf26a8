"""Tests of `losses.SupConLoss` on one process, against a loop-based reference of the paper's loss.

The reference writes L_out of "Supervised Contrastive Learning" (arXiv 2004.11362) as plain loops
over anchors and positives in float64, with the temperature / base_temperature factor and the
mean over anchors that have a positive.
"""

import math
import warnings

import pytest
import torch
from torch import Tensor
from torch.nn import functional

import losses
from losses import ContrastiveLossOutput, SupConLoss

# The vectorised loss runs in float64 on float64 input, so it matches the loops closely.
FLOAT64_TOLERANCE = {"rtol": 1e-6, "atol": 1e-6}
# float32 rounding of logits up to 1 / 0.07 gives errors near 1e-6.
FLOAT32_TOLERANCE = {"rtol": 1e-5, "atol": 1e-5}


def reference_loss(
    features: Tensor,
    labels: Tensor | None = None,
    mask: Tensor | None = None,
    temperature: float = 0.07,
    base_temperature: float = 0.07,
    contrast_mode: str = "all",
) -> float:
    """Compute L_out with Python loops over anchors, candidates and positives, in float64."""
    features = features.detach().double()
    batch_size, num_views, _ = features.shape
    views = [(i, v) for i in range(batch_size) for v in range(num_views)]
    anchors = views if contrast_mode == "all" else [(i, 0) for i in range(batch_size)]

    def is_positive_sample(i: int, j: int) -> bool:
        if mask is not None:
            return bool(mask[i, j])
        if labels is not None:
            return int(labels[i]) == int(labels[j])
        return i == j

    def logit(a: tuple[int, int], b: tuple[int, int]) -> float:
        return float(features[a] @ features[b]) / temperature

    anchor_losses = []
    for anchor in anchors:
        candidates = [view for view in views if view != anchor]
        candidate_logits = [logit(anchor, other) for other in candidates]
        # Shifting by the max changes no value and keeps exp finite on unnormalised features.
        shift = max(candidate_logits)
        log_denominator = shift + math.log(sum(math.exp(x - shift) for x in candidate_logits))
        positives = [view for view in candidates if is_positive_sample(anchor[0], view[0])]
        if not positives:
            continue
        log_probs = [logit(anchor, positive) - log_denominator for positive in positives]
        mean_log_prob = sum(log_probs) / len(positives)
        anchor_losses.append(-(temperature / base_temperature) * mean_log_prob)

    if not anchor_losses:
        return 0.0
    return sum(anchor_losses) / len(anchor_losses)


def random_features(
    batch_size: int, num_views: int, dim: int = 8, seed: int = 0, dtype: torch.dtype = torch.float64
) -> Tensor:
    generator = torch.Generator().manual_seed(seed)
    features = torch.randn(batch_size, num_views, dim, generator=generator, dtype=torch.float64)
    return functional.normalize(features, dim=-1).to(dtype)


def random_labels(batch_size: int, num_classes: int, seed: int = 0) -> Tensor:
    generator = torch.Generator().manual_seed(seed)
    return torch.randint(num_classes, (batch_size,), generator=generator)


def random_mask(batch_size: int, seed: int = 0) -> Tensor:
    generator = torch.Generator().manual_seed(seed)
    return torch.rand(batch_size, batch_size, generator=generator) < 0.4


def positive_inputs(kind: str, batch_size: int, seed: int) -> dict[str, Tensor]:
    if kind == "labels":
        return {"labels": random_labels(batch_size, num_classes=3, seed=seed)}
    if kind == "mask":
        return {"mask": random_mask(batch_size, seed=seed)}
    return {}


def scalar(value: float, dtype: torch.dtype = torch.float64) -> Tensor:
    return torch.tensor(value, dtype=dtype)


# SimCLR needs two views, because a sample's other views are its only positives.
REFERENCE_CASES = [
    (kind, num_views, contrast_mode)
    for kind in ("labels", "mask", "simclr")
    for num_views in (1, 2, 3)
    for contrast_mode in ("all", "one")
    if not (kind == "simclr" and num_views == 1)
]


@pytest.mark.parametrize("kind, num_views, contrast_mode", REFERENCE_CASES)
def test_supcon_matches_reference_random(kind: str, num_views: int, contrast_mode: str) -> None:
    for seed in range(3):
        features = random_features(7, num_views, seed=seed)
        extra = positive_inputs(kind, 7, seed)
        loss_fn = SupConLoss(temperature=0.1, base_temperature=0.07, contrast_mode=contrast_mode)

        output = loss_fn(features, **extra)

        expected = reference_loss(features, temperature=0.1, contrast_mode=contrast_mode, **extra)
        torch.testing.assert_close(output.value, scalar(expected), **FLOAT64_TOLERANCE)
        torch.testing.assert_close(output.loss.detach(), scalar(expected), **FLOAT64_TOLERANCE)


@pytest.mark.parametrize("kind", ["labels", "mask", "simclr"])
def test_supcon_matches_reference_float32(kind: str) -> None:
    features = random_features(9, 2, dim=16, seed=3, dtype=torch.float32)
    extra = positive_inputs(kind, 9, seed=3)

    output = SupConLoss()(features, **extra)

    expected = reference_loss(features, **extra)
    assert output.loss.dtype == torch.float32
    torch.testing.assert_close(
        output.loss.detach(), scalar(expected, torch.float32), **FLOAT32_TOLERANCE
    )


def test_supcon_matches_reference_handmade() -> None:
    # Two classes on the axes of a plane, with a third sample between them.
    features = torch.tensor(
        [
            [[1.0, 0.0], [0.8, 0.6]],
            [[0.6, 0.8], [0.0, 1.0]],
            [[0.7071, 0.7071], [-1.0, 0.0]],
            [[0.0, -1.0], [1.0, 0.0]],
        ],
        dtype=torch.float64,
    )
    labels = torch.tensor([0, 1, 0, 1])
    mask = torch.tensor(
        [
            [False, True, False, False],
            [True, True, False, False],
            [False, False, True, True],
            [False, False, False, False],
        ]
    )

    for extra in ({"labels": labels}, {"mask": mask}, {}):
        for contrast_mode in ("all", "one"):
            loss_fn = SupConLoss(temperature=0.5, base_temperature=0.5, contrast_mode=contrast_mode)
            output = loss_fn(features, **extra)
            expected = reference_loss(
                features,
                temperature=0.5,
                base_temperature=0.5,
                contrast_mode=contrast_mode,
                **extra,
            )
            torch.testing.assert_close(output.value, scalar(expected), **FLOAT64_TOLERANCE)


@pytest.mark.parametrize("num_views", [1, 2, 3])
def test_supcon_identical_features_closed_form(num_views: int) -> None:
    # Every logit is equal, so each log-softmax is -log(number of candidates).
    batch_size = 5
    features = functional.normalize(
        torch.ones(batch_size, num_views, 4, dtype=torch.float64), dim=-1
    )
    labels = torch.tensor([0, 0, 1, 1, 1])
    loss_fn = SupConLoss(temperature=0.2, base_temperature=0.1)

    output = loss_fn(features, labels=labels)

    candidates = batch_size * num_views - 1
    expected = (0.2 / 0.1) * math.log(candidates)
    torch.testing.assert_close(output.value, scalar(expected), **FLOAT64_TOLERANCE)


def test_supcon_orthogonal_classes_closed_form() -> None:
    # Each class sits on its own axis: n_pos positives with logit 1/T, n_neg negatives with
    # logit 0, so every anchor loss is log(n_pos * e^(1/T) + n_neg) - 1/T.
    features = torch.zeros(6, 2, 3, dtype=torch.float64)
    labels = torch.tensor([0, 0, 1, 1, 2, 2])
    features[torch.arange(6), :, labels] = 1.0
    temperature = 0.5

    output = SupConLoss(temperature=temperature, base_temperature=temperature)(features, labels)

    positives, negatives = 3, 8
    expected = math.log(positives * math.exp(1 / temperature) + negatives) - 1 / temperature
    torch.testing.assert_close(output.value, scalar(expected), **FLOAT64_TOLERANCE)


def test_supcon_distinct_labels_equal_simclr() -> None:
    features = random_features(6, 2, seed=4).requires_grad_()
    loss_fn = SupConLoss(temperature=0.5)

    simclr = loss_fn(features)
    (simclr_grad,) = torch.autograd.grad(simclr.loss, features)
    supcon = loss_fn(features, labels=torch.arange(10, 16))
    (supcon_grad,) = torch.autograd.grad(supcon.loss, features)

    torch.testing.assert_close(supcon.loss, simclr.loss, **FLOAT64_TOLERANCE)
    torch.testing.assert_close(supcon_grad, simclr_grad, **FLOAT64_TOLERANCE)


def test_supcon_label_mask_equals_labels() -> None:
    features = random_features(8, 2, seed=5)
    labels = random_labels(8, num_classes=3, seed=5)
    mask = labels[:, None] == labels[None, :]

    from_labels = SupConLoss()(features, labels=labels)
    from_mask = SupConLoss()(features, mask=mask)

    torch.testing.assert_close(from_mask.value, from_labels.value, **FLOAT64_TOLERANCE)


def test_supcon_base_temperature_scales_loss() -> None:
    features = random_features(6, 2, seed=6)
    labels = random_labels(6, num_classes=2, seed=6)

    unscaled = SupConLoss(temperature=0.1, base_temperature=0.1)(features, labels)
    scaled = SupConLoss(temperature=0.1, base_temperature=0.05)(features, labels)

    torch.testing.assert_close(scaled.value, 2 * unscaled.value, **FLOAT64_TOLERANCE)


@pytest.mark.parametrize(
    "kind, num_views, contrast_mode",
    [("labels", 2, "all"), ("labels", 1, "all"), ("mask", 2, "all"), ("simclr", 3, "one")],
)
def test_supcon_gradcheck(kind: str, num_views: int, contrast_mode: str) -> None:
    features = random_features(4, num_views, dim=3, seed=7).requires_grad_()
    # Fixed labels give every sample a positive even with one view.
    if kind == "labels":
        extra = {"labels": torch.tensor([0, 1, 0, 1])}
    else:
        extra = positive_inputs(kind, 4, seed=7)
    loss_fn = SupConLoss(temperature=0.5, contrast_mode=contrast_mode)

    assert torch.autograd.gradcheck(lambda x: loss_fn(x, **extra).loss, (features,))


def test_supcon_value_equals_loss_on_one_process() -> None:
    features = random_features(5, 2, seed=8).requires_grad_()

    output = SupConLoss()(features)

    assert isinstance(output, ContrastiveLossOutput)
    assert output.loss.requires_grad
    assert not output.value.requires_grad
    torch.testing.assert_close(output.value, output.loss.detach(), rtol=0, atol=0)


def test_supcon_anchor_without_positive_excluded() -> None:
    # Sample 2 has one view and a label no other sample shares, so it is no anchor.
    features = random_features(3, 1, seed=9).requires_grad_()
    labels = torch.tensor([4, 4, 7])

    output = SupConLoss()(features, labels)
    output.loss.backward()

    expected = reference_loss(features, labels)
    torch.testing.assert_close(output.value, scalar(expected), **FLOAT64_TOLERANCE)
    # Only anchors 0 and 1 count: each has one positive among two candidates.
    logits = (features[:, 0] @ features[:, 0].T).detach() / 0.07
    pair_loss = [
        torch.logsumexp(logits[i, [j for j in range(3) if j != i]], 0) - logits[i, 1 - i]
        for i in range(2)
    ]
    torch.testing.assert_close(output.value, (pair_loss[0] + pair_loss[1]) / 2, **FLOAT64_TOLERANCE)
    assert torch.isfinite(features.grad).all()


@pytest.fixture
def fresh_warning(monkeypatch: pytest.MonkeyPatch) -> None:
    """Let the once-per-process warning about missing positives fire again."""
    monkeypatch.setattr(losses, "_no_positive_warned", False)


@pytest.mark.parametrize("batch_size", [0, 1, 4])
def test_supcon_no_positive_zero_loss(fresh_warning: None, batch_size: int) -> None:
    features = random_features(batch_size, 1, seed=10).requires_grad_()
    labels = torch.arange(batch_size)

    with pytest.warns(RuntimeWarning, match="no anchor in the global batch has a positive"):
        output = SupConLoss()(features, labels)
    output.loss.backward()

    assert output.loss.grad_fn is not None
    torch.testing.assert_close(output.loss.detach(), scalar(0.0), rtol=0, atol=0)
    torch.testing.assert_close(output.value, scalar(0.0), rtol=0, atol=0)
    torch.testing.assert_close(features.grad, torch.zeros_like(features), rtol=0, atol=0)


def test_supcon_no_positive_warns_once(fresh_warning: None) -> None:
    features = random_features(3, 1, seed=11)
    labels = torch.arange(3)

    with pytest.warns(RuntimeWarning):
        SupConLoss()(features, labels)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        SupConLoss()(features, labels)

    assert caught == []


@pytest.mark.parametrize(
    "features_shape, extra, match",
    [
        ((4, 8), {}, r"shape \(batch, views, dim\); got shape \(4, 8\)"),
        ((4, 1, 8), {}, "single view and neither labels nor mask"),
        ((4, 2, 8), {"labels": torch.tensor([0, 1, 0])}, "labels has 3 entries"),
        ((4, 2, 8), {"labels": torch.tensor([0.0, 1.0, 0.0, 1.0])}, "integer class ids"),
        ((4, 2, 8), {"labels": torch.eye(4, dtype=torch.long)}, r"labels\.argmax\(dim=1\)"),
        ((4, 2, 8), {"labels": torch.tensor([True, False, True, False])}, "torch.bool"),
        (
            (4, 2, 8),
            {"labels": torch.arange(4), "mask": torch.ones(4, 4, dtype=torch.bool)},
            "labels and mask are both given",
        ),
        ((4, 2, 8), {"mask": torch.ones(4, 4)}, r"mask\.bool\(\)"),
        ((4, 2, 8), {"mask": torch.ones(3, 4, dtype=torch.bool)}, r"shape \(batch, global batch\)"),
        ((4, 2, 8), {"mask": torch.ones(4, 5, dtype=torch.bool)}, "5 columns but the global batch"),
    ],
)
def test_supcon_bad_input_raises(features_shape: tuple[int, ...], extra: dict, match: str) -> None:
    features = torch.randn(features_shape)

    with pytest.raises(ValueError, match=match):
        SupConLoss()(features, **extra)


def test_supcon_integer_features_raise() -> None:
    with pytest.raises(ValueError, match="floating-point"):
        SupConLoss()(torch.ones(4, 2, 8, dtype=torch.long))


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"temperature": 0.0}, "invalid temperature 0.0"),
        ({"temperature": -0.1}, "invalid temperature -0.1"),
        ({"temperature": math.nan}, "invalid temperature nan"),
        ({"base_temperature": 0.0}, "invalid base_temperature 0.0"),
        (
            {"contrast_mode": "both"},
            r"unknown contrast_mode 'both'; expected one of \['all', 'one'\]",
        ),
    ],
)
def test_supcon_bad_settings_raise(kwargs: dict, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        SupConLoss(**kwargs)


def test_supcon_int32_labels_accepted() -> None:
    features = random_features(6, 2, seed=12)
    labels = random_labels(6, num_classes=2, seed=12)

    as_int32 = SupConLoss()(features, labels.int())
    as_int64 = SupConLoss()(features, labels)

    torch.testing.assert_close(as_int32.value, as_int64.value, rtol=0, atol=0)


def test_supcon_bfloat16_autocast_close_to_float32() -> None:
    torch.manual_seed(13)
    head = torch.nn.Linear(16, 8)
    inputs = torch.randn(32, 2, 16)
    labels = torch.randint(4, (32,))
    loss_fn = SupConLoss()

    with torch.autocast(device_type="cpu", dtype=torch.bfloat16):
        projections = functional.normalize(head(inputs), dim=-1)
        low_precision = loss_fn(projections, labels)
    low_precision.loss.backward()
    full_precision = loss_fn(functional.normalize(head(inputs), dim=-1), labels)

    assert projections.dtype == torch.bfloat16
    assert low_precision.loss.dtype == torch.float32
    assert all(torch.isfinite(p.grad).all() for p in head.parameters())
    # bfloat16 keeps 8 significant bits, and logits up to 1 / 0.07 amplify the rounding. The
    # tolerance is about five times the largest difference seen over five seeds, for a loss near 11.
    torch.testing.assert_close(
        low_precision.value, full_precision.value.detach(), rtol=0, atol=2e-2
    )


# About seven times the largest difference seen over five seeds, for a loss near 9.
@pytest.mark.parametrize(("dtype", "atol"), [(torch.float16, 1e-3), (torch.bfloat16, 1e-2)])
def test_supcon_half_inputs_close_to_float32(dtype: torch.dtype, atol: float) -> None:
    features = random_features(32, 2, dim=16, seed=14, dtype=torch.float32)
    labels = random_labels(32, num_classes=4, seed=14)
    half_features = features.to(dtype).requires_grad_()

    output = SupConLoss()(half_features, labels)
    output.loss.backward()

    assert output.loss.dtype == torch.float32
    assert half_features.grad.dtype == dtype
    assert torch.isfinite(half_features.grad).all()
    expected = SupConLoss()(features, labels).value
    torch.testing.assert_close(output.value, expected, rtol=0, atol=atol)


@pytest.mark.parametrize("dtype", [torch.float16, torch.float32])
def test_supcon_unnormalised_features_finite(dtype: torch.dtype) -> None:
    # Dot products near 1e5 overflow float16 and make exp overflow without max subtraction.
    features = (50 * torch.randn(16, 2, 32)).to(dtype).requires_grad_()
    labels = random_labels(16, num_classes=3, seed=15)

    output = SupConLoss()(features, labels)
    output.loss.backward()

    assert torch.isfinite(output.loss)
    assert torch.isfinite(features.grad).all()
    expected = reference_loss(features.float(), labels)
    torch.testing.assert_close(output.value.double(), scalar(expected), rtol=1e-4, atol=1e-4)
