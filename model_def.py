"""Contrastive pre-training with an online linear classifier, one step of each per batch.

Each training batch takes one SupCon or SimCLR step of the encoder and projection head. Then it
takes one step of the linear classifier on the encoder embeddings of the same forward pass,
detached so that the classifier never shapes the encoder. solo-learn evaluates online the same
way. Everything else lives in trial_common.py. The legacy entrypoint
`model_def:ContrastiveLearningTrial` works too, since the trial needs only its context.
"""

from __future__ import annotations

from typing import Any

import torch

from trial_common import ContrastiveTrialBase


class ContrastiveLearningTrial(ContrastiveTrialBase):
    """SupCon or SimCLR with the classifier trained on every batch's embeddings."""

    def train_batch(self, batch: Any, epoch_idx: int, batch_idx: int) -> dict[str, Any]:
        views, labels = batch  # (B, V, C, H, W), (B,)
        n_views = views.shape[1]

        metrics, embeddings = self.contrastive_step(views, labels)  # embeddings (B*V, F)

        # The views of each image are adjacent in `embeddings`, so each label repeats V times.
        view_labels = torch.repeat_interleave(labels, n_views)  # (B*V,)
        metrics.update(self.classifier_step(embeddings, view_labels))
        return metrics
