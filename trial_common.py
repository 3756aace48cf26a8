"""Parts shared by both contrastive trials: model, loss, optimizers, schedules, data, validation.

`model_def.py` (classifier step interleaved with every contrastive step) and
`train_eval_model_def.py` (classifier trained in a nested loop) subclass `ContrastiveTrialBase`
and add only their training step. The method is SupCon (Khosla et al., "Supervised Contrastive
Learning", arXiv 2004.11362) or SimCLR (Chen et al., arXiv 2002.05709), chosen by the `method`
hyperparameter. Validation reports the linear classifier's top-1 accuracy and loss and the
weighted kNN top-1 accuracy of the frozen embedding (Wu et al., arXiv 1805.01978).
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import logging
from collections.abc import Iterator
from pathlib import Path
from typing import Any, ClassVar

import appdirs
import determined as det
import numpy as np
import torch
import torch.nn.functional as F
from determined import pytorch
from torch import nn

import data
import distributed
from hparams import parse_data_settings, parse_hparams
from lars import LARS, parameter_groups
from losses import SupConLoss
from resnet_big import LinearClassifier, SupConResNet, convert_sync_batchnorm
from schedules import LearningRateSchedule, steps_per_epoch

logger = logging.getLogger(__name__)

AUTOCAST_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}


def allow_numpy_rng_state_in_checkpoints() -> None:
    """Let Determined's checkpoint loader read back the NumPy RNG state it saves.

    Determined 0.38.1 restores checkpoints with `torch.load` and its default `weights_only`,
    which is True since torch 2.6 and rejects the NumPy array inside `np.random.get_state()`.
    This allows exactly the NumPy types of that state, instead of disabling the safe loader.
    """
    try:
        from numpy._core.multiarray import _reconstruct  # NumPy 2
    except ImportError:  # NumPy 1
        from numpy.core.multiarray import _reconstruct
    rng_state_dtype = type(np.random.get_state()[1].dtype)
    torch.serialization.add_safe_globals([_reconstruct, np.ndarray, np.dtype, rng_state_dtype])


allow_numpy_rng_state_in_checkpoints()


class ExactMeanReducer(pytorch.MetricReducer):
    """Sums (total, count) pairs over batches and ranks and divides once, at the end.

    A mean of per-batch means would weigh a last batch of 16 images as much as a full one;
    these sums do not.
    """

    def __init__(self) -> None:
        self.reset()

    def reset(self) -> None:
        self.sums: dict[str, list[torch.Tensor | float]] = {}

    def update(self, name: str, total: torch.Tensor, count: int | torch.Tensor) -> None:
        """Add `total` (e.g. correct predictions) over `count` samples to the metric `name`."""
        current = self.sums.setdefault(name, [0.0, 0.0])
        current[0] = current[0] + total.detach().double()
        current[1] = current[1] + count

    def per_slot_reduce(self) -> dict[str, tuple[float, float]]:
        return {name: (float(total), float(count)) for name, (total, count) in self.sums.items()}

    def cross_slot_reduce(
        self, per_slot_metrics: list[dict[str, tuple[float, float]]]
    ) -> dict[str, float]:
        totals: dict[str, list[float]] = {}
        for slot_metrics in per_slot_metrics:
            for name, (total, count) in slot_metrics.items():
                current = totals.setdefault(name, [0.0, 0.0])
                current[0] += total
                current[1] += count
        return {name: total / count for name, (total, count) in totals.items() if count > 0}


def knn_predict(
    queries: torch.Tensor,
    bank: torch.Tensor,
    bank_labels: torch.Tensor,
    num_classes: int,
    k: int,
    temperature: float,
) -> torch.Tensor:
    """Predict classes by a vote of the k most cosine-similar bank entries, weighted exp(s/T).

    Args:
        queries: L2-normalised embeddings, (Q, F).
        bank: L2-normalised embeddings of the training set, (N, F).
        bank_labels: Class ids of the bank, (N,).
        num_classes: Number of classes.
        k: Neighbours that vote; at most N are used.
        temperature: Softness of the vote weights.

    Returns:
        Predicted class ids, (Q,).
    """
    similarities = queries @ bank.T  # (Q, N)
    top_similarities, top_indices = similarities.topk(min(k, bank.shape[0]), dim=1)  # (Q, k)
    weights = (top_similarities / temperature).exp()  # (Q, k)
    votes = torch.zeros(queries.shape[0], num_classes, device=queries.device)  # (Q, C)
    votes.scatter_add_(1, bank_labels[top_indices], weights)
    return votes.argmax(dim=1)


class ShuffledBatchSampler(torch.utils.data.Sampler[list[int]]):
    """Endless per-slot batches, each epoch a new permutation seeded by (seed, epoch).

    The order is a pure function of the seed and the position in the stream, so a run resumed
    at `start_batch` receives exactly the batches of a straight run. One epoch is
    `len(self)` full batches; the remainder of each permutation is dropped.
    """

    def __init__(self, num_samples: int, batch_size: int, seed: int, start_batch: int = 0) -> None:
        self.num_samples = num_samples
        self.batch_size = batch_size
        self.seed = seed
        self.start_batch = start_batch

    def __len__(self) -> int:
        return self.num_samples // self.batch_size

    def __iter__(self) -> Iterator[list[int]]:
        batches_per_epoch = len(self)
        epoch, offset = divmod(self.start_batch, batches_per_epoch)
        while True:
            generator = torch.Generator().manual_seed(self.seed + epoch)
            order = torch.randperm(self.num_samples, generator=generator).tolist()
            for index in range(offset, batches_per_epoch):
                yield order[index * self.batch_size : (index + 1) * self.batch_size]
            epoch, offset = epoch + 1, 0


class ResumePositionCallback(pytorch.PyTorchCallback):
    """Restores the position in the training data when a local run continues a checkpoint.

    On a cluster Determined skips the batches already trained. Its local Trainer (0.38.1)
    restores weights, optimizers and RNG state but restarts the data at batch 0, so this reads
    the checkpoint's batch count before the training loader is built.
    """

    def __init__(self, trial: ContrastiveTrialBase) -> None:
        self.trial = trial

    def on_trial_startup(self, first_batch_idx: int, checkpoint_uuid: str | None) -> None:
        if first_batch_idx > 0 or checkpoint_uuid is None:
            return  # Determined skips the trained batches itself.
        # Determined's local checkpoint storage: $XDG_DATA_HOME/determined/<uuid>.
        metadata = Path(appdirs.user_data_dir("determined"), checkpoint_uuid, "metadata.json")
        if metadata.is_file():
            self.trial.resume_batch = int(json.loads(metadata.read_text())["steps_completed"])
            logger.info(
                "continuing checkpoint %s at batch %d", checkpoint_uuid, self.trial.resume_batch
            )


class KnnMemoryBankCallback(pytorch.PyTorchCallback):
    """Embeds the training set on every rank before each validation, for the kNN metric."""

    def __init__(self, trial: ContrastiveTrialBase) -> None:
        self.trial = trial

    def on_validation_start(self) -> None:
        self.trial.refresh_memory_bank()


class ContrastiveTrialBase(pytorch.PyTorchTrial):
    """Builds everything but the training step; subclasses define `train_batch`.

    Subclasses set `extra_hparams` to a dataclass of their own hyperparameters, and
    `classifier_total_steps` to the number of classifier steps of the whole run, which the
    classifier's cosine schedule spans.
    """

    extra_hparams: ClassVar[type | None] = None
    classifier_schedule_step_mode: ClassVar[pytorch.LRScheduler.StepMode] = (
        pytorch.LRScheduler.StepMode.STEP_EVERY_BATCH
    )

    def __init__(self, context: pytorch.PyTorchTrialContext) -> None:
        self.context = context

        # Settings, validated once.
        self.hparams, self.extra = parse_hparams(context.get_hparams(), self.extra_hparams)
        self.data_settings = parse_data_settings(context.get_data_config())
        self.num_slots = context.distributed.get_size()
        global_batch_size = self.hparams.global_batch_size
        if global_batch_size % self.num_slots != 0:
            nearest = max(global_batch_size // self.num_slots, 1) * self.num_slots
            raise ValueError(
                f"invalid hyperparameter global_batch_size={global_batch_size}: it must be "
                f"divisible by the {self.num_slots} slots of this trial; use a multiple of "
                f"{self.num_slots}, e.g. {nearest}"
            )
        self.per_slot_batch_size = self.hparams.global_batch_size // self.num_slots
        self.seed = _data_order_seed(context)

        # Data. Datasets that need a download take a file lock, so one process per node fetches.
        settings = self.data_settings
        self.datasets = data.build_datasets(
            settings.dataset,
            settings.data_dir,
            n_views=self.hparams.n_views,
            augmentation=dict(settings.augmentation),
            download=settings.download,
            **dict(settings.options),
        )
        self.steps_per_epoch = steps_per_epoch(
            len(self.datasets.contrastive_train), self.per_slot_batch_size, self.num_slots
        )
        if self.steps_per_epoch == 0:
            raise ValueError(
                f"invalid hyperparameter global_batch_size={self.hparams.global_batch_size}: the "
                f"training set has only {len(self.datasets.contrastive_train)} images; use a "
                "smaller global batch"
            )

        # Model: encoder with projection head, and the linear classifier on the embedding.
        hp = self.hparams
        network = SupConResNet(
            backbone=hp.backbone,
            head=hp.head,
            projection_dim=hp.projection_dim,
            stem=hp.stem,
            width=hp.width,
        )
        if hp.sync_batchnorm and self.num_slots > 1:
            network = convert_sync_batchnorm(network)
        classifier = LinearClassifier(network.feature_dim, self.datasets.num_classes)
        # fp16 needs loss scaling; Determined requires the scaler before any model is wrapped.
        self.scaler = None
        if hp.precision == "fp16":
            self.scaler = context.wrap_scaler(torch.amp.GradScaler(context.device.type))
        self.model = context.wrap_model(network)
        self.classifier = context.wrap_model(classifier)
        # The unwrapped modules, for forward passes without gradients: they skip the buffer
        # broadcast that DistributedDataParallel does before each forward.
        self.network = network
        self.classifier_module = classifier

        # Loss.
        self.criterion = SupConLoss(
            temperature=hp.temperature,
            base_temperature=hp.base_temperature,
            contrast_mode=hp.contrast_mode,
        )

        # Optimizers and schedules.
        self.optimizer = context.wrap_optimizer(self._build_optimizer(network))
        self.lr_schedule = self._build_lr_schedule()
        self.lr_scheduler = context.wrap_lr_scheduler(
            torch.optim.lr_scheduler.LambdaLR(self.optimizer, self.lr_schedule.factor_fn()),
            step_mode=pytorch.LRScheduler.StepMode.STEP_EVERY_BATCH,
        )
        self.classifier_optimizer = context.wrap_optimizer(
            torch.optim.SGD(
                classifier.parameters(),
                lr=hp.classifier_learning_rate,
                momentum=hp.classifier_momentum,
                weight_decay=hp.classifier_weight_decay,
            )
        )
        classifier_schedule = LearningRateSchedule(
            base_lr=hp.classifier_learning_rate, total_batches=self.classifier_total_steps()
        )
        self.classifier_scheduler = context.wrap_lr_scheduler(
            torch.optim.lr_scheduler.LambdaLR(
                self.classifier_optimizer, classifier_schedule.factor_fn()
            ),
            step_mode=self.classifier_schedule_step_mode,
        )

        # Validation metrics, reduced exactly over batches and ranks.
        self.validation_metrics = context.wrap_reducer(
            ExactMeanReducer(), name=None, for_training=False
        )
        self.memory_bank: tuple[torch.Tensor, torch.Tensor] | None = None
        # Batches already trained by the checkpoint a local run continues from.
        self.resume_batch = 0
        self.last_validation_metrics: dict[str, Any] = {}

        if context.distributed.get_rank() == 0:
            self._log_setup()

    def classifier_total_steps(self) -> int:
        """Return the number of classifier steps in the whole run."""
        return self.hparams.epochs * self.steps_per_epoch

    # Building blocks.

    def _build_optimizer(self, network: nn.Module) -> torch.optim.Optimizer:
        hp = self.hparams
        if hp.optimizer == "lars":
            return LARS(
                parameter_groups(network, hp.weight_decay),
                lr=hp.learning_rate,
                momentum=hp.momentum,
                trust_coefficient=hp.lars_trust_coefficient,
            )
        return torch.optim.SGD(
            network.parameters(),
            lr=hp.learning_rate,
            momentum=hp.momentum,
            weight_decay=hp.weight_decay,
        )

    def _build_lr_schedule(self) -> LearningRateSchedule:
        hp = self.hparams
        per_epoch = self.steps_per_epoch
        return LearningRateSchedule(
            base_lr=hp.learning_rate,
            total_batches=hp.epochs * per_epoch,
            kind=hp.lr_schedule,
            warmup_batches=round(hp.warmup_epochs * per_epoch),
            warmup_from=hp.warmup_from,
            final_lr=hp.final_learning_rate,
            decay_batches=[epoch * per_epoch for epoch in hp.lr_decay_epochs],
            decay_rate=hp.lr_decay_rate,
        )

    def _log_setup(self) -> None:
        logger.info("hyperparameters: %s", dataclasses.asdict(self.hparams))
        if self.extra is not None:
            logger.info("trial hyperparameters: %s", dataclasses.asdict(self.extra))
        logger.info(
            "dataset %s: %d training images (%d batches of %d per epoch), %d validation images, "
            "%d classes, %d slots",
            self.data_settings.dataset,
            len(self.datasets.contrastive_train),
            self.steps_per_epoch,
            self.hparams.global_batch_size,
            len(self.datasets.val),
            self.datasets.num_classes,
            self.num_slots,
        )

    def autocast(self) -> contextlib.AbstractContextManager:
        """Return the mixed-precision context of forward passes (a no-op for fp32)."""
        precision = self.hparams.precision
        if precision == "fp32":
            return contextlib.nullcontext()
        return torch.autocast(self.context.device.type, dtype=AUTOCAST_DTYPES[precision])

    # Data loaders.

    def build_training_data_loader(self) -> pytorch.DataLoader:
        # Every rank draws the same seeded order of per-slot batches, and Determined deals them
        # out to the ranks in turn.
        sampler = ShuffledBatchSampler(
            len(self.datasets.contrastive_train),
            self.per_slot_batch_size,
            seed=self.seed,
            start_batch=self.resume_batch * self.num_slots,
        )
        return pytorch.DataLoader(
            self.datasets.contrastive_train, batch_sampler=sampler, **self._loader_options()
        )

    def build_validation_data_loader(self) -> pytorch.DataLoader:
        return pytorch.DataLoader(
            self.datasets.val, batch_size=self.per_slot_batch_size, **self._loader_options()
        )

    def build_callbacks(self) -> dict[str, pytorch.PyTorchCallback]:
        return {
            "resume_position": ResumePositionCallback(self),
            "knn_memory_bank": KnnMemoryBankCallback(self),
            "metrics": _KeepMetrics(self),
        }

    def _loader_options(self) -> dict[str, Any]:
        workers = self.data_settings.num_workers
        return {
            "num_workers": workers,
            "pin_memory": self.context.device.type == "cuda",
            "persistent_workers": workers > 0,
        }

    # Training steps.

    @property
    def batches_trained(self) -> int:
        """Return the number of batches trained before the current one.

        The scheduler steps once per batch and is checkpointed, so unlike the batch index of a
        local Trainer this count survives a resumed run.
        """
        return self.lr_scheduler.last_epoch

    def contrastive_step(
        self, views: torch.Tensor, labels: torch.Tensor
    ) -> tuple[dict[str, Any], torch.Tensor]:
        """Take one optimizer step of the encoder and head on the contrastive loss.

        Args:
            views: Augmented views, (B, V, C, H, W).
            labels: Class ids, (B,); ignored by SimCLR.

        Returns:
            The training metrics and the encoder embeddings of all views, (B*V, F), detached.
        """
        batch_size, n_views = views.shape[:2]
        images = views.flatten(0, 1)  # (B*V, C, H, W), the views of each image adjacent

        with self.autocast():
            projections, embeddings = self.model(
                images, return_embedding=True
            )  # (B*V, P), (B*V, F)
        features = projections.unflatten(0, (batch_size, n_views))  # (B, V, P)
        output = self.criterion(features, labels if self.hparams.method == "supcon" else None)
        _raise_if_not_finite(output.value, "contrastive loss", self.batches_trained)

        self.context.backward(self.scaler.scale(output.loss) if self.scaler else output.loss)
        self.context.step_optimizer(self.optimizer, scaler=self.scaler)
        if self.scaler is not None:
            self.scaler.update()

        metrics = {"contrastive_loss": output.value, "lr": self.lr_scheduler.get_last_lr()[0]}
        return metrics, embeddings.detach()

    def classifier_step(self, embeddings: torch.Tensor, labels: torch.Tensor) -> dict[str, Any]:
        """Take one optimizer step of the linear classifier on detached embeddings (N, F)."""
        # A single linear layer is cheap, so it runs in float32 and needs no loss scaling.
        logits = self.classifier(embeddings.float())  # (N, C)
        loss = F.cross_entropy(logits, labels)
        self.context.backward(loss)
        self.context.step_optimizer(self.classifier_optimizer)
        return {
            "classifier_loss": loss.detach(),
            "classifier_lr": self.classifier_scheduler.get_last_lr()[0],
        }

    # Validation.

    @torch.no_grad()
    def embed(self, images: torch.Tensor) -> torch.Tensor:
        """Return the frozen encoder's embeddings (N, F) in float32, without gradients."""
        with self.autocast():
            _, embeddings = self.network(images, return_embedding=True)
        return embeddings.float()

    @torch.no_grad()
    def refresh_memory_bank(self) -> None:
        """Embed the training set (eval transform) over all ranks and keep it for kNN."""
        was_training = self.network.training
        self.network.eval()
        shard = torch.utils.data.Subset(
            self.datasets.memory,
            range(distributed.rank(), len(self.datasets.memory), self.num_slots),
        )
        loader = torch.utils.data.DataLoader(
            shard, batch_size=self.per_slot_batch_size, **self._loader_options()
        )
        embeddings, labels = [], []
        for images, batch_labels in loader:
            images, batch_labels = self.context.to_device((images, batch_labels))
            embeddings.append(F.normalize(self.embed(images), dim=1))
            labels.append(batch_labels)
        feature_dim = self.network.feature_dim
        local_bank = torch.cat(embeddings) if embeddings else torch.empty(0, feature_dim)
        local_labels = torch.cat(labels) if labels else torch.empty(0, dtype=torch.long)
        local_bank, local_labels = self.context.to_device((local_bank, local_labels))
        self.memory_bank = (
            distributed.all_gather_variable(local_bank),  # (N, F)
            distributed.all_gather_variable(local_labels),  # (N,)
        )
        self.network.train(was_training)

    def evaluate_batch(self, batch: Any, batch_idx: int) -> dict[str, Any]:
        images, labels = batch
        embeddings = self.embed(images)  # (B, F)
        logits = self.classifier_module(embeddings)  # (B, C)
        count = labels.shape[0]

        metrics = self.validation_metrics
        metrics.update("validation_accuracy", (logits.argmax(dim=1) == labels).sum(), count)
        loss_sum = F.cross_entropy(logits, labels, reduction="sum")
        metrics.update("validation_classifier_loss", loss_sum, count)
        if self.memory_bank is not None:
            bank, bank_labels = self.memory_bank
            predictions = knn_predict(
                F.normalize(embeddings, dim=1),
                bank,
                bank_labels,
                self.datasets.num_classes,
                self.hparams.knn_k,
                self.hparams.knn_temperature,
            )
            metrics.update("validation_knn_accuracy", (predictions == labels).sum(), count)
        # Every metric comes from the reducer, which sums over batches and ranks.
        return {}


class _KeepMetrics(pytorch.PyTorchCallback):
    """Keeps the last validation metrics on the trial, for the runner's summary."""

    def __init__(self, trial: ContrastiveTrialBase) -> None:
        self.trial = trial

    def on_validation_end(self, metrics: dict[str, Any]) -> None:
        self.trial.last_validation_metrics = {**metrics, "batches": self.trial.batches_trained}


def _raise_if_not_finite(value: torch.Tensor, name: str, batch_idx: int) -> None:
    # `value` is reduced over ranks, so every rank raises together.
    if not torch.isfinite(value).item():
        raise FloatingPointError(
            f"{name} is {value.item()} at batch {batch_idx}; training stopped. Lower the "
            "learning rate, lengthen the warm-up or use precision 'fp32' or 'bf16'"
        )


def _data_order_seed(context: pytorch.PyTorchTrialContext) -> int:
    """Return the seed of the training shuffle: the trial seed on a cluster, else the config's."""
    info = det.get_cluster_info()
    if info is not None and info.task_type == "TRIAL":
        return context.get_trial_seed()
    try:
        config = context.get_experiment_config()
    except ValueError:  # A context made without an experiment config, as in some tests.
        config = {}
    return int((config.get("reproducibility") or {}).get("experiment_seed") or 0)
