"""Training throughput of the Determined trial against a plain PyTorch loop doing the same work.

Both train SupCon with the interleaved classifier step of model_def.py: a ResNet-18 on 32x32
synthetic images, a per-step batch of 128 images in two views, SGD, one process on the CPU, no
data-loading workers. The plain loop uses the same modules, loss, optimizers, schedule and
sampler, so the difference is what Determined's Trainer and the trial add per step. Each side
runs `--rounds` times in alternation; the table gives the median images per second (images,
not views) measured over the steps after the warm-up.

    python3 benchmarks/train_bench.py [--steps 8] [--warmup 2] [--rounds 2]
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from determined import pytorch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import data  # noqa: E402
from losses import SupConLoss  # noqa: E402
from model_def import ContrastiveLearningTrial  # noqa: E402
from resnet_big import LinearClassifier, SupConResNet  # noqa: E402
from schedules import LearningRateSchedule  # noqa: E402
from trial_common import ShuffledBatchSampler  # noqa: E402

BATCH_SIZE = 128
HPARAMS = {
    "global_batch_size": BATCH_SIZE,
    "epochs": 10,
    "backbone": "resnet18",
    "width": 1.0,
    "learning_rate": 0.1,
    "warmup_epochs": 1,
}
DATA = {"dataset": "synthetic", "num_workers": 0, "options": {"size": 512}}


class TimedTrial(ContrastiveLearningTrial):
    """The interleaved trial, recording when each training batch starts."""

    def __init__(self, context: pytorch.PyTorchTrialContext) -> None:
        super().__init__(context)
        self.batch_starts: list[float] = []

    def train_batch(self, batch, epoch_idx, batch_idx):
        self.batch_starts.append(time.perf_counter())
        return super().train_batch(batch, epoch_idx, batch_idx)


def trial_images_per_second(steps: int, warmup: int) -> float:
    config = {"hyperparameters": HPARAMS, "data": DATA}
    torch.manual_seed(0)
    with pytorch.init(
        hparams=HPARAMS, exp_conf=config, enable_tensorboard_logging=False
    ) as context:
        trial = TimedTrial(context)
        trainer = pytorch.Trainer(trial, context)
        trainer.fit(max_length=pytorch.Batch(warmup + steps + 1), checkpoint_policy="none")
    # The interval between the starts of batch `warmup` and of the last batch covers `steps`
    # whole steps, with Determined's work between batches included.
    elapsed = trial.batch_starts[-1] - trial.batch_starts[warmup]
    return steps * BATCH_SIZE / elapsed


def plain_images_per_second(steps: int, warmup: int) -> float:
    torch.manual_seed(0)
    datasets = data.build_datasets("synthetic", None, n_views=2, size=512)
    sampler = ShuffledBatchSampler(len(datasets.contrastive_train), BATCH_SIZE, seed=0)
    loader = torch.utils.data.DataLoader(datasets.contrastive_train, batch_sampler=sampler)
    network = SupConResNet(backbone="resnet18", width=1.0)
    classifier = LinearClassifier(network.feature_dim, datasets.num_classes)
    criterion = SupConLoss(temperature=0.1, base_temperature=0.07)
    optimizer = torch.optim.SGD(network.parameters(), lr=0.1, momentum=0.9, weight_decay=1e-4)
    classifier_optimizer = torch.optim.SGD(classifier.parameters(), lr=0.1, momentum=0.9)
    steps_per_epoch = len(sampler)
    schedule = LearningRateSchedule(
        base_lr=0.1,
        total_batches=10 * steps_per_epoch,
        warmup_batches=steps_per_epoch,
        warmup_from=0.01,
        final_lr=0.0005,
    )
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, schedule.factor_fn())
    network.train()

    start = 0.0
    for step, (views, labels) in enumerate(loader):
        if step == warmup:
            start = time.perf_counter()
        if step == warmup + steps:
            break
        batch_size, n_views = views.shape[:2]
        projections, embeddings = network(views.flatten(0, 1), return_embedding=True)
        output = criterion(projections.unflatten(0, (batch_size, n_views)), labels)
        optimizer.zero_grad()
        output.loss.backward()
        optimizer.step()
        scheduler.step()

        logits = classifier(embeddings.detach())
        classifier_loss = F.cross_entropy(logits, labels.repeat_interleave(n_views))
        classifier_optimizer.zero_grad()
        classifier_loss.backward()
        classifier_optimizer.step()
        if not torch.isfinite(output.value):
            raise FloatingPointError("non-finite loss")
    return steps * BATCH_SIZE / (time.perf_counter() - start)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", type=int, default=8, help="timed steps per run")
    parser.add_argument("--warmup", type=int, default=2, help="untimed steps before timing")
    parser.add_argument("--rounds", type=int, default=2, help="runs of each side, alternating")
    args = parser.parse_args()
    os.environ.setdefault("XDG_DATA_HOME", tempfile.mkdtemp(prefix="train-bench-"))

    plain, trial = [], []
    for _ in range(args.rounds):
        plain.append(plain_images_per_second(args.steps, args.warmup))
        trial.append(trial_images_per_second(args.steps, args.warmup))
    plain_median, trial_median = statistics.median(plain), statistics.median(trial)

    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, batch {BATCH_SIZE}")
    print("| loop | images/s (median) | runs | overhead |")
    print("|---|---:|---|---:|")
    print(f"| plain PyTorch | {plain_median:.1f} | {', '.join(f'{v:.1f}' for v in plain)} | - |")
    overhead = 100 * (plain_median / trial_median - 1)
    runs = ", ".join(f"{v:.1f}" for v in trial)
    print(f"| Determined trial | {trial_median:.1f} | {runs} | {overhead:+.1f}% |")


if __name__ == "__main__":
    main()
