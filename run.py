"""Runner of the contrastive trials, on a Determined cluster and locally.

On a cluster it is the entrypoint of every experiment config:
    python3 -m determined.launch.torch_distributed \
        python3 run.py --trial model_def:ContrastiveLearningTrial
and takes the hyperparameters, the data config and the latest checkpoint from Determined.

Locally it reads the same YAML, picks the trial from its entrypoint and trains with
Determined's local Trainer, in one process or under torchrun:
    python3 run.py --config supclr_digits.yaml
    python3 run.py --config supclr.yaml --test-mode --set data.dataset=synthetic \
        --set hyperparameters.global_batch_size=64 --set data.num_workers=0
    USE_TORCH_DISTRIBUTED=1 torchrun --nproc_per_node=2 run.py --config supclr_digits.yaml
"""

from __future__ import annotations

import argparse
import importlib
import json
import logging
import math
import os
import random
import shlex
import sys
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import determined as det
import numpy as np
import torch
import torch.distributed as dist
import yaml
from determined import core, pytorch

logger = logging.getLogger("run")

TRAIN_UNITS = {"batches": pytorch.Batch, "epochs": pytorch.Epoch}


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--config",
        type=Path,
        help="experiment YAML to run locally; ignored on a cluster, where Determined supplies it",
    )
    parser.add_argument(
        "--trial",
        help="trial class as module:Class, e.g. model_def:ContrastiveLearningTrial; locally it "
        "defaults to the --trial of the config's entrypoint",
    )
    parser.add_argument(
        "--set",
        dest="overrides",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="override one config value by its dotted path, e.g. data.dataset=synthetic or "
        "hyperparameters.backbone=resnet18; VALUE is parsed as YAML; repeat for more",
    )
    parser.add_argument(
        "--epochs",
        type=int,
        help="training length in epochs; sets hyperparameters.epochs, so the learning-rate "
        "schedule is stretched or shortened to match",
    )
    parser.add_argument(
        "--max-batches",
        type=int,
        help="stop after this many batches, keeping the schedule of the configured epochs "
        "(for short trials of a long recipe)",
    )
    parser.add_argument(
        "--test-mode",
        action="store_true",
        help="train and validate one batch (Trainer.fit(test_mode=True)) to check the set-up",
    )
    parser.add_argument(
        "--resume",
        metavar="CHECKPOINT",
        help="local checkpoint UUID to continue from (listed in the log when a run saves one)",
    )
    parser.add_argument(
        "--metrics-file",
        type=Path,
        help="write the final validation metrics as JSON to this file (rank 0 only)",
    )
    return parser.parse_args(argv)


# Config handling.


def load_config(path: Path, overrides: Sequence[str]) -> dict[str, Any]:
    """Read an experiment YAML and apply `KEY.PATH=VALUE` overrides."""
    if not path.is_file():
        raise ValueError(f"config file '{path}' not found; pass an experiment YAML to --config")
    config = yaml.safe_load(path.read_text()) or {}
    for override in overrides:
        key, separator, raw_value = override.partition("=")
        if not separator or not key:
            raise ValueError(
                f"invalid override '{override}'; expected KEY=VALUE, e.g. data.dataset=synthetic"
            )
        section = config
        *parents, leaf = key.split(".")
        for parent in parents:
            section = section.setdefault(parent, {})
            if not isinstance(section, dict):
                raise ValueError(f"invalid override '{override}': '{parent}' is not a section")
        section[leaf] = yaml.safe_load(raw_value)
    return config


def resolve_hyperparameters(section: Mapping[str, Any]) -> dict[str, Any]:
    """Turn Determined's hyperparameter definitions into plain values for a local run.

    A `const` gives its value. Only a cluster's searcher can sample a searched hyperparameter,
    so locally it takes a fixed point of its range: the first categorical value, the middle of
    an int or double range, or the geometric middle of a log range. The log states the choice.
    """
    resolved = {}
    for name, spec in section.items():
        if not isinstance(spec, Mapping):
            resolved[name] = spec
            continue
        kind = spec.get("type")
        if kind is None:
            resolved[name] = resolve_hyperparameters(spec)  # a nested group
        elif kind == "const":
            resolved[name] = spec["val"]
        elif kind == "categorical":
            resolved[name] = spec["vals"][0]
        elif kind in ("int", "double"):
            middle = (spec["minval"] + spec["maxval"]) / 2
            resolved[name] = round(middle) if kind == "int" else middle
        elif kind == "log":
            resolved[name] = spec["base"] ** ((spec["minval"] + spec["maxval"]) / 2)
        else:
            raise ValueError(f"unknown type '{kind}' of hyperparameter '{name}'")
        if kind not in (None, "const"):
            logger.info(
                "searched hyperparameter %s set to %r for this local run", name, resolved[name]
            )
    return resolved


def trial_spec_from_entrypoint(config: Mapping[str, Any]) -> str | None:
    """Return the `--trial` value of the config's entrypoint, or None."""
    entrypoint = config.get("entrypoint")
    if not isinstance(entrypoint, str):
        return None
    tokens = shlex.split(entrypoint)
    for index, token in enumerate(tokens):
        if token == "--trial" and index + 1 < len(tokens):
            return tokens[index + 1]
        if token.startswith("--trial="):
            return token.split("=", 1)[1]
    return None


def load_trial_class(spec: str) -> type[pytorch.PyTorchTrial]:
    module_name, separator, class_name = spec.partition(":")
    if not separator:
        raise ValueError(
            f"invalid trial '{spec}'; expected module:Class, "
            "e.g. model_def:ContrastiveLearningTrial"
        )
    try:
        module = importlib.import_module(module_name)
    except ModuleNotFoundError as error:
        raise ValueError(
            f"trial module '{module_name}' not found; expected model_def or "
            "train_eval_model_def, run from the project folder"
        ) from error
    trial_class = getattr(module, class_name, None)
    if trial_class is None:
        raise ValueError(f"trial class '{class_name}' not found in module '{module_name}'")
    return trial_class


def train_unit(period: Mapping[str, int] | None) -> pytorch.TrainUnit | None:
    """Convert a config period such as `{epochs: 10}` into a Determined TrainUnit."""
    if not period:
        return None
    ((unit, value),) = period.items()
    if unit not in TRAIN_UNITS:
        raise ValueError(f"invalid period unit '{unit}'; expected one of {sorted(TRAIN_UNITS)}")
    return TRAIN_UNITS[unit](value)


# Local set-up.


def set_local_seeds(seed: int) -> None:
    """Seed every process alike, as a Determined cluster does with the trial seed."""
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def local_distributed_context() -> core.DistributedContext | None:
    """Join torchrun's process group when USE_TORCH_DISTRIBUTED is set, else train alone."""
    if not os.environ.get("USE_TORCH_DISTRIBUTED"):
        if int(os.environ.get("WORLD_SIZE", "1")) > 1:
            raise ValueError(
                f"torchrun started {os.environ['WORLD_SIZE']} processes but USE_TORCH_DISTRIBUTED "
                "is not set, so each would train alone; run USE_TORCH_DISTRIBUTED=1 torchrun ..."
            )
        return None
    if not dist.is_initialized():
        dist.init_process_group(backend="nccl" if torch.cuda.is_available() else "gloo")
    return core.DistributedContext.from_torch_distributed()


# Training.


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    args = parse_args(argv)
    info = det.get_cluster_info()
    on_cluster = info is not None and info.task_type == "TRIAL"

    if on_cluster:
        hparams, exp_conf, distributed = info.trial.hparams, None, None
        latest_checkpoint = info.latest_checkpoint
        trial_spec = args.trial
    else:
        if args.config is None:
            raise ValueError("missing --config; pass an experiment YAML such as supclr_digits.yaml")
        exp_conf = load_config(args.config, args.overrides)
        if args.epochs is not None:
            exp_conf.setdefault("hyperparameters", {})["epochs"] = args.epochs
        hparams = resolve_hyperparameters(exp_conf.get("hyperparameters") or {})
        distributed = local_distributed_context()
        set_local_seeds(int((exp_conf.get("reproducibility") or {}).get("experiment_seed", 0)))
        latest_checkpoint = args.resume
        trial_spec = args.trial or trial_spec_from_entrypoint(exp_conf)
    if trial_spec is None:
        raise ValueError(
            "missing --trial; pass module:Class, e.g. --trial model_def:ContrastiveLearningTrial"
        )
    trial_class = load_trial_class(trial_spec)

    if "epochs" not in hparams:
        raise ValueError("missing hyperparameter 'epochs'; add the training length in epochs")
    if args.max_batches is not None and args.max_batches < 1:
        raise ValueError(f"invalid --max-batches {args.max_batches}; expected a count >= 1")

    started = time.monotonic()
    with pytorch.init(hparams=hparams, exp_conf=exp_conf, distributed=distributed) as context:
        trial = trial_class(context)
        config = context.get_experiment_config()
        max_length = training_length(args, hparams, trial, on_cluster)
        trainer = pytorch.Trainer(trial, context)
        # Determined 0.38.1's local Trainer restarts its batch index at 0 when it continues a
        # checkpoint and checks the training length only at reporting boundaries, so a resumed
        # local run reports every batch to stop exactly at max_length.
        # NOTE: periodic validations of a resumed local run are offset by the batches it resumed
        # from; the final validation still runs at the end.
        resumed_locally = not on_cluster and latest_checkpoint is not None
        trainer.fit(
            max_length=max_length,
            validation_period=train_unit(config.get("min_validation_period")),
            checkpoint_period=train_unit(config.get("min_checkpoint_period")),
            reporting_period=pytorch.Batch(1 if resumed_locally else 100),
            checkpoint_policy=config.get("checkpoint_policy", "best"),
            latest_checkpoint=latest_checkpoint,
            test_mode=args.test_mode,
        )
        metrics = dict(getattr(trial, "last_validation_metrics", {}))
        is_chief = context.distributed.get_rank() == 0

    if distributed is not None:
        dist.destroy_process_group()
    if is_chief:
        log_summary(metrics, time.monotonic() - started)
        if args.metrics_file is not None:
            args.metrics_file.write_text(json.dumps(_plain(metrics), indent=2) + "\n")
    return metrics


def training_length(
    args: argparse.Namespace,
    hparams: Mapping[str, Any],
    trial: pytorch.PyTorchTrial,
    on_cluster: bool,
) -> pytorch.TrainUnit:
    """Return the `max_length` of `Trainer.fit`.

    Locally the length is counted in batches, the unit in which Determined compares it with the
    batches a resumed run has already trained. On a cluster it stays in epochs, the unit of
    ASHA's `max_time`.
    """
    if args.test_mode:
        return pytorch.Batch(1)
    if args.max_batches is not None:
        return pytorch.Batch(args.max_batches)
    steps_per_epoch = getattr(trial, "steps_per_epoch", None)
    if on_cluster or steps_per_epoch is None:
        return pytorch.Epoch(int(hparams["epochs"]))
    return pytorch.Batch(int(hparams["epochs"]) * steps_per_epoch)


def log_summary(metrics: Mapping[str, Any], seconds: float) -> None:
    def percent(name: str) -> str:
        value = metrics.get(name)
        return "n/a" if value is None or not math.isfinite(value) else f"{100 * value:.2f}%"

    logger.info(
        "Final validation: classifier top-1 %s, kNN top-1 %s, classifier loss %s, after %s "
        "batches (%.0f s)",
        percent("validation_accuracy"),
        percent("validation_knn_accuracy"),
        f"{metrics['validation_classifier_loss']:.4f}"
        if "validation_classifier_loss" in metrics
        else "n/a",
        metrics.get("batches", "n/a"),
        seconds,
    )


def _plain(metrics: Mapping[str, Any]) -> dict[str, Any]:
    return {
        name: value.item() if hasattr(value, "item") else value for name, value in metrics.items()
    }


if __name__ == "__main__":
    logging.basicConfig(
        level=logging.INFO,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        stream=sys.stderr,
    )
    main()
