"""Contrastive pre-training with the linear classifier trained in a nested loop.

Training batches update only the encoder and projection head with the SupCon or SimCLR loss.
After every `train_cls_every_n_epochs` epochs, and after the last one, the trial freezes the
encoder: eval mode, no gradients, BatchNorm statistics untouched. It then trains the linear
classifier for `train_cls_epochs` passes over its own sharded loader. The linear evaluation of
Khosla et al. (arXiv 2004.11362) does the same once, after pre-training. Shared parts live in
trial_common.py.
"""

from __future__ import annotations

from typing import Any

import torch
from determined import pytorch

from hparams import NestedLoopHParams
from trial_common import ContrastiveTrialBase, ExactMeanReducer


class ContrastiveTrainEvalTrial(ContrastiveTrialBase):
    """SupCon or SimCLR with a periodic, nested training loop of the linear classifier."""

    extra_hparams = NestedLoopHParams
    # The classifier's schedule advances with classifier steps, not with training batches.
    classifier_schedule_step_mode = pytorch.LRScheduler.StepMode.MANUAL_STEP

    def __init__(self, context: pytorch.PyTorchTrialContext) -> None:
        super().__init__(context)
        self.round_metrics = context.wrap_reducer(
            ExactMeanReducer(), name=None, for_validation=False
        )

    def classifier_total_steps(self) -> int:
        rounds = -(-self.hparams.epochs // self.extra.train_cls_every_n_epochs)  # ceiling
        return rounds * self.extra.train_cls_epochs * self._classifier_steps_per_epoch()

    def train_batch(self, batch: Any, epoch_idx: int, batch_idx: int) -> dict[str, Any]:
        views, labels = batch  # (B, V, C, H, W), (B,)

        metrics, _ = self.contrastive_step(views, labels)

        # Counted from the scheduler rather than epoch_idx, so that a resumed run keeps count.
        batches_done = self.batches_trained + 1  # this batch included
        epochs_done, batches_into_epoch = divmod(batches_done, self.steps_per_epoch)
        if batches_into_epoch == 0 and (
            epochs_done % self.extra.train_cls_every_n_epochs == 0
            or epochs_done == self.hparams.epochs
        ):
            self.train_classifier_round(epochs_done - 1)
        return metrics

    def train_classifier_round(self, epoch_idx: int) -> None:
        """Train the classifier for `train_cls_epochs` epochs on the frozen encoder.

        Every rank takes the same number of steps, because the sampler gives each rank an
        equal shard and the loader drops incomplete batches. The classifier's loss and learning
        rate reach the training metrics through a reducer, since only some batches run a round.
        """
        loader = self._classifier_loader()
        was_training = self.network.training
        self.network.eval()

        for round_epoch in range(self.extra.train_cls_epochs):
            loader.sampler.set_epoch(epoch_idx * self.extra.train_cls_epochs + round_epoch)
            for images, labels in loader:
                images, labels = self.context.to_device((images, labels))
                step_metrics = self.classifier_step(self.embed(images), labels)
                self.classifier_scheduler.step()
                for name, value in step_metrics.items():
                    self.round_metrics.update(name, torch.as_tensor(value), 1)

        self.network.train(was_training)

    def _classifier_steps_per_epoch(self) -> int:
        shard_size = len(self.datasets.classifier_train) // self.num_slots
        return shard_size // self.per_slot_batch_size

    def _classifier_loader(self) -> torch.utils.data.DataLoader:
        sampler = torch.utils.data.DistributedSampler(
            self.datasets.classifier_train,
            num_replicas=self.num_slots,
            rank=self.context.distributed.get_rank(),
            shuffle=True,
            seed=self.seed,
            drop_last=True,
        )
        return torch.utils.data.DataLoader(
            self.datasets.classifier_train,
            batch_size=self.per_slot_batch_size,
            sampler=sampler,
            drop_last=True,
            **self._loader_options(),
        )
