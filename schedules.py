"""Learning-rate schedules as pure functions of the number of batches trained.

The contrastive optimizer warms up linearly from `warmup_from`, then follows a cosine or a step
decay, as in the SupCon reference recipe (Khosla et al., arXiv 2004.11362). Unlike the reference
code, which changes the rate per epoch after warm-up, every value here is a function of the batch
index alone, so a run resumed from a checkpoint continues on exactly the same curve. The trials
turn these functions into `LambdaLR` factors and step them once per batch.
"""

from __future__ import annotations

import bisect
import dataclasses
import math
from collections.abc import Callable, Sequence


@dataclasses.dataclass(frozen=True)
class LearningRateSchedule:
    """A warm-up followed by a cosine or step decay, in units of batches.

    Batch b (0-based) of `total_batches` trains with `learning_rate_at(b)`. A cosine schedule
    reaches `final_lr` exactly on the last batch, b = total_batches - 1.
    """

    base_lr: float
    total_batches: int
    kind: str = "cosine"
    warmup_batches: int = 0
    warmup_from: float = 0.0
    final_lr: float = 0.0
    decay_batches: Sequence[int] = ()
    decay_rate: float = 0.1

    def __post_init__(self) -> None:
        if self.kind not in ("cosine", "step"):
            raise ValueError(
                f"unknown learning-rate schedule '{self.kind}'; expected one of ['cosine', 'step']"
            )
        if self.total_batches < 1:
            raise ValueError(
                f"invalid schedule length of {self.total_batches} batches; the training set must "
                "give at least one full global batch per epoch: lower global_batch_size"
            )
        if not 0 <= self.warmup_batches < self.total_batches:
            raise ValueError(
                f"invalid warm-up of {self.warmup_batches} batches for a schedule of "
                f"{self.total_batches} batches; shorten warmup_epochs"
            )

    def decayed_lr_at(self, batch: int) -> float:
        """Return the rate of the decay alone, as if there were no warm-up."""
        if self.kind == "step":
            return self.base_lr * self.decay_rate ** bisect.bisect_right(self.decay_batches, batch)
        progress = min(batch, self.total_batches - 1) / max(self.total_batches - 1, 1)
        cosine = 0.5 * (1.0 + math.cos(math.pi * progress))
        return self.final_lr + (self.base_lr - self.final_lr) * cosine

    def learning_rate_at(self, batch: int) -> float:
        """Return the learning rate of the 0-based `batch`."""
        if batch < self.warmup_batches:
            # The warm-up ends where the decay would be, so the curve has no jump.
            target = self.decayed_lr_at(self.warmup_batches)
            return self.warmup_from + (target - self.warmup_from) * batch / self.warmup_batches
        return self.decayed_lr_at(batch)

    def factor_fn(self) -> Callable[[int], float]:
        """Return the multiplier of `base_lr` for `torch.optim.lr_scheduler.LambdaLR`.

        It is a plain function on purpose: LambdaLR leaves functions out of its checkpointed
        state, so a resumed trial follows the schedule of its current hyperparameters.
        """

        def factor(batch: int) -> float:
            return self.learning_rate_at(batch) / self.base_lr

        return factor


def steps_per_epoch(num_samples: int, per_slot_batch_size: int, num_slots: int) -> int:
    """Return the number of global batches in one epoch, as Determined counts them.

    The training loader drops the last incomplete per-slot batch, and Determined hands the
    per-slot batches out to the slots in turn, so the chief's loader has the most of them.
    """
    per_slot_batches = num_samples // per_slot_batch_size
    return math.ceil(per_slot_batches / num_slots)
