"""Both trials end to end with Determined's local Trainer, in one process and under torchrun."""

import json
import os
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F
from determined import experimental as det_experimental
from determined import pytorch

import run
from conftest import ROOT
from losses import ContrastiveLossOutput
from model_def import ContrastiveLearningTrial
from train_eval_model_def import ContrastiveTrainEvalTrial

# A small network on the digits data: a few batches take seconds on a CPU.
SMALL_HPARAMS = {
    "global_batch_size": 32,
    "epochs": 2,
    "backbone": "resnet18",
    "width": 0.125,
    "projection_dim": 16,
    "learning_rate": 0.1,
    "warmup_epochs": 0,
    "knn_k": 5,
}
DIGITS = {"dataset": "digits", "num_workers": 0}


def make_config(hparams=None, data=None):
    return {
        "hyperparameters": {**SMALL_HPARAMS, **(hparams or {})},
        "data": {**DIGITS, **(data or {})},
        "reproducibility": {"experiment_seed": 0},
    }


def fit(trial_class, config, max_length, latest_checkpoint=None, validation_period=None):
    """Build and train a trial locally; return it after training."""
    torch.manual_seed(0)
    with pytorch.init(hparams=config["hyperparameters"], exp_conf=config) as context:
        trial = trial_class(context)
        trainer = pytorch.Trainer(trial, context)
        trainer.fit(
            max_length=max_length,
            latest_checkpoint=latest_checkpoint,
            validation_period=validation_period,
            checkpoint_policy="none",
        )
    return trial


def latest_checkpoint_uuid(storage):
    checkpoints = sorted(storage.iterdir(), key=lambda path: path.stat().st_mtime)
    return checkpoints[-1].name


@pytest.mark.parametrize("trial_class", [ContrastiveLearningTrial, ContrastiveTrainEvalTrial])
def test_trial_reports_validation_metrics(trial_class, local_storage):
    trial = fit(trial_class, make_config(), pytorch.Batch(3))
    metrics = trial.last_validation_metrics
    for name in ("validation_accuracy", "validation_knn_accuracy", "validation_classifier_loss"):
        assert name in metrics
    assert 0.0 <= metrics["validation_accuracy"] <= 1.0
    assert 0.0 <= metrics["validation_knn_accuracy"] <= 1.0


def test_validation_accuracy_counts_uneven_batches(local_storage):
    # 360 validation images in batches of 32 leave a last batch of 8.
    trial = fit(ContrastiveLearningTrial, make_config(), pytorch.Batch(2))
    trial.network.eval()
    correct = seen = 0
    knn_correct = 0
    bank, bank_labels = trial.memory_bank
    for images, labels in torch.utils.data.DataLoader(trial.datasets.val, batch_size=100):
        embeddings = trial.embed(images)
        correct += (trial.classifier_module(embeddings).argmax(1) == labels).sum().item()
        neighbours = run_knn(trial, embeddings, bank, bank_labels)
        knn_correct += (neighbours == labels).sum().item()
        seen += len(labels)
    assert seen == 360
    metrics = trial.last_validation_metrics
    assert metrics["validation_accuracy"] == pytest.approx(correct / seen, abs=1e-12)
    assert metrics["validation_knn_accuracy"] == pytest.approx(knn_correct / seen, abs=1e-12)


def run_knn(trial, embeddings, bank, bank_labels):
    from trial_common import knn_predict

    return knn_predict(
        F.normalize(embeddings, dim=1),
        bank,
        bank_labels,
        trial.datasets.num_classes,
        trial.hparams.knn_k,
        trial.hparams.knn_temperature,
    )


def test_resume_matches_straight_run(local_storage):
    config = make_config()
    # Both runs validate after 3 batches, so both draw the same random numbers.
    period = pytorch.Batch(3)
    straight = fit(ContrastiveLearningTrial, config, pytorch.Batch(6), validation_period=period)

    fit(ContrastiveLearningTrial, config, pytorch.Batch(3), validation_period=period)
    uuid = latest_checkpoint_uuid(local_storage)
    resumed = fit(
        ContrastiveLearningTrial,
        config,
        pytorch.Batch(6),
        latest_checkpoint=uuid,
        validation_period=period,
    )

    for name, tensor in straight.network.state_dict().items():
        torch.testing.assert_close(resumed.network.state_dict()[name], tensor, rtol=0, atol=1e-6)
    for name, tensor in straight.classifier_module.state_dict().items():
        torch.testing.assert_close(
            resumed.classifier_module.state_dict()[name], tensor, rtol=0, atol=1e-6
        )
    straight_state = straight.optimizer.state_dict()["state"]
    resumed_state = resumed.optimizer.state_dict()["state"]
    assert straight_state.keys() == resumed_state.keys()
    for index, state in straight_state.items():
        torch.testing.assert_close(
            resumed_state[index]["momentum_buffer"], state["momentum_buffer"], rtol=0, atol=1e-6
        )
    assert resumed.lr_scheduler.last_epoch == straight.lr_scheduler.last_epoch == 6
    assert resumed.lr_scheduler.get_last_lr() == pytest.approx(straight.lr_scheduler.get_last_lr())
    assert resumed.optimizer.param_groups[0]["lr"] == pytest.approx(
        straight.lr_schedule.learning_rate_at(6)
    )


class RecordingTrainEvalTrial(ContrastiveTrainEvalTrial):
    """Runs one classifier round in the first batch and records the encoder around it."""

    def train_batch(self, batch, epoch_idx, batch_idx):
        metrics = super().train_batch(batch, epoch_idx, batch_idx)
        self.before = {k: v.clone() for k, v in self.network.state_dict().items()}
        self.classifier_before = {
            k: v.clone() for k, v in self.classifier_module.state_dict().items()
        }
        self.was_training = self.network.training
        self.train_classifier_round(epoch_idx)
        self.after = {k: v.clone() for k, v in self.network.state_dict().items()}
        self.training_after = self.network.training
        return metrics


def test_nested_loop_leaves_encoder_untouched(local_storage):
    trial = fit(RecordingTrainEvalTrial, make_config(), pytorch.Batch(1))
    assert trial.before.keys() == trial.after.keys()
    buffers = [name for name in trial.before if "running_" in name or "num_batches" in name]
    assert buffers, "the encoder should have BatchNorm buffers"
    for name, tensor in trial.before.items():
        assert torch.equal(trial.after[name], tensor), name
    assert trial.was_training
    assert trial.training_after
    # The classifier did train.
    changed = [
        not torch.equal(trial.classifier_module.state_dict()[name], tensor)
        for name, tensor in trial.classifier_before.items()
    ]
    assert any(changed)


def test_nested_loop_steps_classifier_schedule(local_storage):
    trial = fit(RecordingTrainEvalTrial, make_config(), pytorch.Batch(1))
    # One round: train_cls_epochs=1 over 1437 images in batches of 32 -> 44 steps.
    assert trial.classifier_scheduler.last_epoch == 44


def test_non_finite_loss_names_batch(local_storage):
    class NanLossTrial(ContrastiveLearningTrial):
        def __init__(self, context):
            super().__init__(context)
            self.criterion = self.nan_loss

        @staticmethod
        def nan_loss(features, labels=None, mask=None):
            nan = features.sum() * float("nan")
            return ContrastiveLossOutput(loss=nan, value=nan.detach())

    with pytest.raises(FloatingPointError, match="contrastive loss is nan at batch 0"):
        fit(NanLossTrial, make_config(), pytorch.Batch(2))


def test_test_one_batch_builds_from_context(local_storage):
    det_experimental.test_one_batch(ContrastiveLearningTrial, make_config())


def test_global_batch_must_divide_by_slots(tmp_path):
    result = torchrun(
        tmp_path,
        "--config",
        str(ROOT / "supclr_digits.yaml"),
        "--test-mode",
        "--set",
        "hyperparameters.global_batch_size=33",
    )
    assert result.returncode != 0
    assert "global_batch_size=33: it must be divisible by the 2 slots" in result.stderr


def torchrun(tmp_path, *args):
    env = {**os.environ, "USE_TORCH_DISTRIBUTED": "1", "XDG_DATA_HOME": str(tmp_path / "xdg")}
    env["OMP_NUM_THREADS"] = "1"
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2"]
    return subprocess.run(
        [*command, str(ROOT / "run.py"), *args],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )


SHORT_RUN = [
    "--set",
    "hyperparameters.backbone=resnet18",
    "--set",
    "hyperparameters.width=0.125",
    "--set",
    "hyperparameters.global_batch_size=32",
    "--set",
    "data.num_workers=0",
]


@pytest.mark.parametrize(
    ("config", "trial_options"),
    [
        ("supclr.yaml", ["--set", "data.dataset=digits"]),
        ("supclr_digits.yaml", ["--set", "hyperparameters.train_cls_every_n_epochs=1"]),
    ],
)
def test_torchrun_two_processes(config, trial_options, tmp_path):
    metrics_file = tmp_path / "metrics.json"
    result = torchrun(
        tmp_path,
        "--config",
        str(ROOT / config),
        "--epochs",
        "1",
        "--set",
        "hyperparameters.warmup_epochs=0",
        "--metrics-file",
        str(metrics_file),
        *trial_options,
        *SHORT_RUN,
    )
    assert result.returncode == 0, result.stderr[-4000:]
    metrics = json.loads(metrics_file.read_text())
    assert 0.0 <= metrics["validation_accuracy"] <= 1.0
    assert 0.0 <= metrics["validation_knn_accuracy"] <= 1.0
    # 1437 images, 16 per slot, 2 slots: 89 per-slot batches, 45 on the chief.
    assert metrics["batches"] == 45
    assert "contrastive_loss" in result.stdout + result.stderr
    assert "Final validation: classifier top-1" in result.stderr


def test_run_rejects_malformed_override(tmp_path):
    with pytest.raises(ValueError, match="invalid override 'epochs'; expected KEY=VALUE"):
        run.main(["--config", str(ROOT / "supclr_digits.yaml"), "--set", "epochs"])


def test_run_rejects_missing_config(tmp_path):
    with pytest.raises(ValueError, match="config file '.*nope.yaml' not found"):
        run.main(["--config", str(tmp_path / "nope.yaml")])


def test_run_rejects_unknown_trial_class():
    with pytest.raises(ValueError, match="trial class 'Missing' not found in module 'model_def'"):
        run.load_trial_class("model_def:Missing")


def test_resolve_hyperparameters_fixes_searched_values():
    resolved = run.resolve_hyperparameters(
        {
            "a": {"type": "const", "val": 3},
            "b": {"type": "categorical", "vals": ["x", "y"]},
            "c": {"type": "int", "minval": 2, "maxval": 6},
            "d": {"type": "double", "minval": 0.1, "maxval": 0.3},
            "e": {"type": "log", "base": 10, "minval": -3, "maxval": -1},
            "f": 7,
        }
    )
    assert resolved == pytest.approx({"a": 3, "b": "x", "c": 4, "d": 0.2, "e": 0.01, "f": 7})


def test_trial_spec_read_from_entrypoint():
    config = {
        "entrypoint": "python3 -m determined.launch.torch_distributed python3 run.py "
        "--trial train_eval_model_def:ContrastiveTrainEvalTrial"
    }
    assert (
        run.trial_spec_from_entrypoint(config) == "train_eval_model_def:ContrastiveTrainEvalTrial"
    )


def test_digits_demo_learns(local_storage, tmp_path):
    # A quarter of the demo's 40 epochs already separates the digits well. Logistic regression
    # on the raw pixels reaches about 96.7%, so 95% catches a pipeline that stopped learning.
    metrics_file = tmp_path / "metrics.json"
    run.main(
        [
            "--config",
            str(ROOT / "supclr_digits.yaml"),
            "--epochs",
            "10",
            "--set",
            "data.num_workers=0",
            "--metrics-file",
            str(metrics_file),
        ]
    )
    metrics = json.loads(metrics_file.read_text())
    assert metrics["validation_accuracy"] >= 0.95
    assert metrics["validation_knn_accuracy"] >= 0.95


def test_run_rejects_nonpositive_max_batches():
    with pytest.raises(ValueError, match="invalid --max-batches 0; expected a count >= 1"):
        run.main(["--config", str(ROOT / "supclr_digits.yaml"), "--max-batches", "0"])


def test_run_rejects_torchrun_without_flag(monkeypatch):
    monkeypatch.delenv("USE_TORCH_DISTRIBUTED", raising=False)
    monkeypatch.setenv("WORLD_SIZE", "2")
    with pytest.raises(ValueError, match="USE_TORCH_DISTRIBUTED is not set"):
        run.local_distributed_context()


def test_run_rejects_unknown_trial_module():
    with pytest.raises(ValueError, match="trial module 'nomodule' not found"):
        run.load_trial_class("nomodule:Trial")


def test_run_resume_stops_at_configured_length(local_storage, tmp_path):
    options = [
        "--config",
        str(ROOT / "supclr_digits.yaml"),
        "--epochs",
        "1",
        "--set",
        "hyperparameters.warmup_epochs=0",
        "--set",
        "data.num_workers=0",
        *SHORT_RUN,
    ]
    run.main([*options, "--max-batches", "10"])
    metrics = run.main([*options, "--resume", latest_checkpoint_uuid(local_storage)])
    # 1437 images in batches of 32: one epoch is 44 batches, 10 before and 34 after the resume.
    assert metrics["batches"] == 44
