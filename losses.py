"""The contrastive loss that the SupCon and SimCLR trials call on projection-head outputs.

It follows "Supervised Contrastive Learning" (Khosla et al., arXiv 2004.11362), loss L_out, and
without labels is the NT-Xent loss of "A Simple Framework for Contrastive Learning of Visual
Representations" (Chen et al., arXiv 2002.05709). Departures from the papers: the loss is scaled
by temperature / base_temperature, anchors without a positive are left out of the mean, and the
features are not L2-normalised here, so callers normalise them first.
"""

import logging
import math
import warnings
from typing import NamedTuple

import torch
from torch import Tensor, nn
from torch.autograd.function import once_differentiable

import distributed

logger = logging.getLogger(__name__)

CONTRAST_MODES = ("all", "one")

# Set after the first warning about a global batch without any positive pair.
_no_positive_warned = False


class ContrastiveLossOutput(NamedTuple):
    """Result of `SupConLoss.forward`.

    Attributes:
        loss: Scalar to back-propagate on this rank. Its mean over ranks, which is what DDP's
            gradient averaging computes, equals the loss of the concatenated global batch.
        value: Detached scalar for logging, equal on every rank to the loss of the global batch.
    """

    loss: Tensor
    value: Tensor


class SupConLoss(nn.Module):
    """Supervised contrastive loss (L_out) over every rank's batch; SimCLR without labels.

    Shapes: B per-rank batch, V views per sample, W world size, G global batch (B summed over
    ranks), D feature dim, A anchors on this rank (B*V for contrast_mode "all", B for "one").

    For each anchor, the loss averages the log-softmax of its positives over every view of
    every sample on every rank except the anchor itself, and multiplies the average by
    -temperature / base_temperature. The positives of an anchor are the other views of its own
    sample and every view of each sample that shares its label (or that `mask` marks). The loss
    is the mean over the anchors that have at least one positive. Without labels and mask, each
    sample is its own class, which is SimCLR's NT-Xent loss.

    In a distributed run, the anchors are this rank's samples and the contrast set is gathered
    from every rank with gradients. Per-rank batch sizes may differ, and a rank may have none.
    Every rank must call forward with the same kind of positives (labels, mask or neither), and
    backward on the returned `loss`, because both run collectives.

    Args:
        temperature: Softmax temperature that divides the dot products. Lower values weight the
            most similar negatives more.
        base_temperature: The loss is multiplied by temperature / base_temperature. The factor
            scales every gradient, which under plain SGD acts like a learning-rate multiplier,
            and does not move the minimum. Set it equal to `temperature` for the papers' loss.
        contrast_mode: "all" makes every view of every local sample an anchor, and "one" makes
            only the first view an anchor. The contrast set always contains every view.

    Raises:
        ValueError: If a temperature is not a positive finite number or `contrast_mode` is
            unknown.
    """

    def __init__(
        self, temperature: float = 0.07, base_temperature: float = 0.07, contrast_mode: str = "all"
    ) -> None:
        super().__init__()
        for name, value in (("temperature", temperature), ("base_temperature", base_temperature)):
            if not (math.isfinite(value) and value > 0):
                raise ValueError(f"invalid {name} {value!r}; expected a positive finite number")
        if contrast_mode not in CONTRAST_MODES:
            raise ValueError(
                f"unknown contrast_mode {contrast_mode!r}; expected one of {list(CONTRAST_MODES)}"
            )
        self.temperature = float(temperature)
        self.base_temperature = float(base_temperature)
        self.contrast_mode = contrast_mode

    def extra_repr(self) -> str:
        return (
            f"temperature={self.temperature}, base_temperature={self.base_temperature}, "
            f"contrast_mode={self.contrast_mode!r}"
        )

    def forward(
        self, features: Tensor, labels: Tensor | None = None, mask: Tensor | None = None
    ) -> ContrastiveLossOutput:
        """Compute the loss of this rank's anchors against every rank's samples.

        The computation runs in float32 (float64 inputs stay float64) with autocast disabled,
        so float16 and bfloat16 features and autocast regions give a float32 loss.

        Args:
            features: Projections of shape `(B, V, D)`, usually L2-normalised. V = 1 needs
                `labels` or `mask`, because each sample's other views are its only positives
                otherwise.
            labels: Integer class ids of shape `(B,)`. Samples with equal ids are positives on
                every rank.
            mask: Boolean positive mask of shape `(B, G)`: `mask[i, j]` marks global sample j,
                counted over ranks in rank order, as a positive of local sample i. The entry of
                the sample itself, at column (this rank's offset + i), selects its other views.
                The same view of the same sample never counts. Exclusive with `labels`.

        Returns:
            `loss` to back-propagate, equal to W times this rank's summed anchor losses divided
            by the global count of anchors with a positive, and the detached global `value`.
            If no anchor in the global batch has a positive, both are zero, the gradients are
            zero and a warning is issued once per process.

        Raises:
            ValueError: If a shape or dtype is invalid or both `labels` and `mask` are given.
        """
        _check_features(features)
        batch_size, num_views, _ = features.shape
        if labels is not None and mask is not None:
            raise ValueError("labels and mask are both given; pass one of them or neither")
        if labels is None and mask is None and num_views == 1:
            raise ValueError(
                "features have a single view and neither labels nor mask is given, so no "
                "anchor has a positive; pass at least two views for SimCLR or labels for SupCon"
            )
        if labels is not None:
            _check_labels(labels, batch_size)
            labels = labels.to(features.device)
        if mask is not None:
            _check_mask(mask, batch_size)
            mask = mask.to(features.device)

        compute_dtype = torch.promote_types(features.dtype, torch.float32)
        with torch.autocast(device_type=features.device.type, enabled=False):
            return self._compute(features.to(compute_dtype), labels, mask)

    def _compute(
        self, features: Tensor, labels: Tensor | None, mask: Tensor | None
    ) -> ContrastiveLossOutput:
        batch_size, num_views, dim = features.shape
        gathered, offset = distributed.all_gather_with_grad(features)  # (G, V, D)
        global_size = gathered.shape[0]
        if mask is not None and mask.shape[1] != global_size:
            # NOTE: only ranks whose mask is wrong raise here, and the others then block in the
            # next collective. Masks built the same way on every rank fail together.
            raise ValueError(
                f"mask has {mask.shape[1]} columns but the global batch has {global_size} "
                "samples; build it with one column per sample of every rank, in rank order"
            )

        contrast = gathered.reshape(global_size * num_views, dim)  # (G*V, D)
        if global_size * num_views < 2:
            # An empty batch or a lone view has no contrast sample, so no log-softmax is defined.
            # The product keeps the zero loss connected to the graph.
            return self._reduce(contrast.sum() * 0.0, torch.zeros((), device=features.device))

        positive_sums, positive_counts, self_positive = _positive_samples(
            gathered, offset, batch_size, labels, mask
        )

        # Anchor k belongs to local sample anchor_samples[k] and sits at contrast row
        # self_columns[k], because the gathered rows of this rank are `features` itself.
        local_rows = torch.arange(batch_size, device=features.device)  # (B,)
        if self.contrast_mode == "all":
            anchors = features.reshape(batch_size * num_views, dim)  # (A, D)
            anchor_samples = local_rows.repeat_interleave(num_views)  # (A,)
            self_columns = offset * num_views + torch.arange(
                batch_size * num_views, device=features.device
            )  # (A,)
        else:
            anchors = features[:, 0]  # (A, D)
            anchor_samples = local_rows  # (A,)
            self_columns = (offset + local_rows) * num_views  # (A,)
        scaled_anchors = anchors / self.temperature  # (A, D)

        # Log-softmax denominator over every contrast view except the anchor itself.
        log_normalizers = _ContrastLogSumExp.apply(scaled_anchors, contrast, self_columns)  # (A,)

        # Sum of each anchor's positive logits without an (A, G*V) mask: the dot product with
        # the sum of the positive views equals the sum of the dot products. That sum contains the
        # anchor's own view when its sample is its own positive, so its self logit comes off.
        self_logits = (scaled_anchors * anchors).sum(dim=1)  # (A,)
        anchor_self_positive = self_positive[anchor_samples]  # (A,)
        positive_logit_sums = (scaled_anchors * positive_sums[anchor_samples]).sum(dim=1)  # (A,)
        positive_logit_sums = positive_logit_sums - torch.where(
            anchor_self_positive, self_logits, 0.0
        )
        anchor_positive_counts = (
            num_views * positive_counts[anchor_samples] - anchor_self_positive.long()
        )  # (A,)
        has_positive = anchor_positive_counts > 0  # (A,)

        # Mean over positives of (logit - log_normalizer), with the mean outside the log.
        mean_log_probs = (
            positive_logit_sums / anchor_positive_counts.clamp(min=1) - log_normalizers
        )  # (A,)
        scale = self.temperature / self.base_temperature
        anchor_losses = torch.where(has_positive, -scale * mean_log_probs, 0.0)  # (A,)
        return self._reduce(anchor_losses.sum(), has_positive.sum())

    def _reduce(self, local_sum: Tensor, local_count: Tensor) -> ContrastiveLossOutput:
        """Turn this rank's sum and count of anchor losses into the rank loss and global value."""
        totals = torch.stack([local_sum.detach(), local_count.to(local_sum.dtype)])  # (2,)
        global_sum, global_count = distributed.all_reduce_sum(totals).unbind()
        if global_count.item() == 0:
            _warn_no_positive()
        denominator = global_count.clamp(min=1)
        loss = local_sum * (distributed.world_size() / denominator)
        return ContrastiveLossOutput(loss=loss, value=global_sum / denominator)


class _ContrastLogSumExp(torch.autograd.Function):
    """Row-wise log-sum-exp of `anchors @ contrast.T` with each anchor's own column left out.

    Autograd through `torch.logsumexp` would keep the (A, G*V) logits from forward to backward
    and allocate several more of that size. This function keeps only its inputs and the result,
    recomputes the logits in backward, and works in place, so one (A, G*V) tensor is alive at a
    time at the cost of one more matrix product.
    """

    @staticmethod
    def forward(ctx, anchors: Tensor, contrast: Tensor, self_columns: Tensor) -> Tensor:
        logits = _masked_logits(anchors, contrast, self_columns)  # (A, G*V)
        # The own column is already -inf, so it cannot set the max that keeps exp finite.
        row_max = logits.amax(dim=1, keepdim=True)  # (A, 1)
        log_normalizers = logits.sub_(row_max).exp_().sum(dim=1).log_() + row_max.squeeze(1)
        ctx.save_for_backward(anchors, contrast, self_columns, log_normalizers)
        return log_normalizers  # (A,)

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_output: Tensor) -> tuple[Tensor | None, Tensor | None, None]:
        anchors, contrast, self_columns, log_normalizers = ctx.saved_tensors
        # The gradient of a log-sum-exp is the softmax of its row: exp(logit - log_normalizer).
        softmax = _masked_logits(anchors, contrast, self_columns)  # (A, G*V)
        softmax.sub_(log_normalizers[:, None]).exp_()
        grad_anchors = grad_contrast = None
        if ctx.needs_input_grad[0]:
            grad_anchors = (softmax @ contrast) * grad_output[:, None]  # (A, D)
        if ctx.needs_input_grad[1]:
            grad_contrast = softmax.T @ (anchors * grad_output[:, None])  # (G*V, D)
        return grad_anchors, grad_contrast, None


def _masked_logits(anchors: Tensor, contrast: Tensor, self_columns: Tensor) -> Tensor:
    logits = anchors @ contrast.T  # (A, G*V)
    logits[torch.arange(logits.shape[0], device=logits.device), self_columns] = -math.inf
    return logits


def _positive_samples(
    gathered: Tensor, offset: int, batch_size: int, labels: Tensor | None, mask: Tensor | None
) -> tuple[Tensor, Tensor, Tensor]:
    """Sum the views of each local sample's positive samples.

    Returns:
        Three tensors with one row per local sample. The first, of shape `(B, D)`, sums every
        view of every positive sample, the sample itself included when it is its own positive.
        The second, of shape `(B,)`, counts the positive samples. The third, of shape `(B,)`,
        is True where the sample is its own positive.
    """
    view_sums = gathered.sum(dim=1)  # (G, D)
    local = slice(offset, offset + batch_size)
    self_positive = torch.ones(batch_size, dtype=torch.bool, device=gathered.device)  # (B,)

    if mask is not None:
        # The float copy of the (B, G) sample mask is at least V times smaller than the logits.
        positive_sums = mask.to(view_sums.dtype) @ view_sums  # (B, D)
        rows = torch.arange(batch_size, device=gathered.device)
        return positive_sums, mask.sum(dim=1), mask[rows, offset + rows]

    if labels is None:
        # SimCLR: every sample is its own class, so its positives are its other views.
        counts = torch.ones(batch_size, dtype=torch.long, device=gathered.device)  # (B,)
        return view_sums[local], counts, self_positive

    global_labels = distributed.all_gather_variable(labels)  # (G,)
    classes, class_ids = torch.unique(global_labels, return_inverse=True)  # (C,), (G,)
    class_sums = view_sums.new_zeros(len(classes), view_sums.shape[1])  # (C, D)
    class_sums = class_sums.index_add(0, class_ids, view_sums)
    class_counts = torch.bincount(class_ids, minlength=len(classes))  # (C,)
    local_class_ids = class_ids[local]  # (B,)
    return class_sums[local_class_ids], class_counts[local_class_ids], self_positive


def _warn_no_positive() -> None:
    global _no_positive_warned
    if _no_positive_warned:
        return
    _no_positive_warned = True
    warnings.warn(
        "no anchor in the global batch has a positive, so the contrastive loss and its "
        "gradients are zero; use at least two views per sample or batches with repeated labels "
        "(this warning is issued once per process)",
        RuntimeWarning,
        stacklevel=1,
    )


def _check_features(features: Tensor) -> None:
    if not isinstance(features, Tensor):
        raise ValueError(f"features must be a torch.Tensor; got {type(features).__name__}")
    if features.dim() != 3:
        raise ValueError(
            f"features must have shape (batch, views, dim); got shape {tuple(features.shape)}. "
            "Add a views dimension with features.unsqueeze(1) or flatten extra dims with "
            "features.flatten(2)"
        )
    if not features.dtype.is_floating_point:
        raise ValueError(f"features must be a floating-point tensor; got dtype {features.dtype}")


def _check_labels(labels: Tensor, batch_size: int) -> None:
    if not isinstance(labels, Tensor):
        raise ValueError(f"labels must be a torch.Tensor of class ids; got {type(labels).__name__}")
    if labels.dim() != 1:
        raise ValueError(
            f"labels must have shape (batch,) with integer class ids; got shape "
            f"{tuple(labels.shape)}. Convert one-hot labels with labels.argmax(dim=1)"
        )
    if labels.dtype == torch.bool or labels.dtype.is_floating_point or labels.dtype.is_complex:
        raise ValueError(
            f"labels must be integer class ids; got dtype {labels.dtype}. "
            "Convert them with labels.long() if they hold whole numbers"
        )
    if labels.shape[0] != batch_size:
        raise ValueError(
            f"labels has {labels.shape[0]} entries but features has a batch of {batch_size}; "
            "pass one label per sample"
        )


def _check_mask(mask: Tensor, batch_size: int) -> None:
    if not isinstance(mask, Tensor):
        raise ValueError(f"mask must be a boolean torch.Tensor; got {type(mask).__name__}")
    if mask.dtype != torch.bool:
        raise ValueError(
            f"mask must have dtype torch.bool; got {mask.dtype}. Convert it with mask.bool()"
        )
    if mask.dim() != 2 or mask.shape[0] != batch_size:
        raise ValueError(
            f"mask must have shape (batch, global batch) = ({batch_size}, G); got shape "
            f"{tuple(mask.shape)}"
        )
