"""Typed, validated settings of the contrastive trials.

Both trials read the experiment's `hyperparameters` and `data` sections once, through
`parse_hparams` and `parse_data_settings`, into frozen dataclasses that are never written back.
A misspelled or unknown key, a value of the wrong type and a value out of range raise
`ValueError` naming the key and the fix, before any model is built.
"""

from __future__ import annotations

import dataclasses
import difflib
import math
import types
import typing
from collections.abc import Mapping
from typing import Any, Literal, TypeVar, get_args, get_origin

Method = Literal["supcon", "simclr"]
ContrastMode = Literal["all", "one"]
Backbone = Literal["resnet18", "resnet34", "resnet50", "resnet101"]
Stem = Literal["cifar", "imagenet"]
Head = Literal["mlp", "linear"]
Optimizer = Literal["sgd", "lars"]
Schedule = Literal["cosine", "step"]
Precision = Literal["fp32", "bf16", "fp16"]


@dataclasses.dataclass(frozen=True)
class HParams:
    """Hyperparameters shared by both trials.

    Defaults follow the CIFAR-10 SupCon recipe of Khosla et al., "Supervised Contrastive
    Learning" (arXiv 2004.11362), and its public reference code.
    """

    # Global batch over all slots; Determined splits it evenly, so it must divide by the slots.
    global_batch_size: int
    # Training length in epochs. It sets `fit(max_length=...)` and the learning-rate schedule.
    epochs: int

    method: Method = "supcon"
    n_views: int = 2
    temperature: float = 0.1
    # The loss is scaled by temperature / base_temperature, which scales the gradients alike.
    base_temperature: float = 0.07
    contrast_mode: ContrastMode = "all"

    backbone: Backbone = "resnet50"
    stem: Stem = "cifar"
    # Channel multiplier of every ResNet stage: 1.0 is the standard network, 0.25 a quick CPU one.
    width: float = 1.0
    head: Head = "mlp"
    projection_dim: int = 128
    # Converts BatchNorm to SyncBatchNorm when more than one process trains.
    sync_batchnorm: bool = False
    precision: Precision = "fp32"

    optimizer: Optimizer = "sgd"
    learning_rate: float = 0.5
    momentum: float = 0.9
    weight_decay: float = 1e-4
    # LARS trust coefficient (eta in You et al., arXiv 1708.03888).
    lars_trust_coefficient: float = 0.001

    lr_schedule: Schedule = "cosine"
    warmup_epochs: float = 10.0
    warmup_from: float = 0.01
    # Learning rate on the last batch of a cosine schedule (the reference code uses lr * 1e-3).
    final_learning_rate: float = 0.0005
    # Step schedule: the learning rate is multiplied by lr_decay_rate at each of these epochs.
    lr_decay_epochs: tuple[int, ...] = (700, 800, 900)
    lr_decay_rate: float = 0.1

    # The linear classifier trained on the frozen embedding, with its own cosine schedule to 0.
    classifier_learning_rate: float = 0.1
    classifier_momentum: float = 0.9
    classifier_weight_decay: float = 0.0

    # Weighted kNN evaluation of the embedding (Wu et al., arXiv 1805.01978).
    knn_k: int = 200
    knn_temperature: float = 0.1

    def __post_init__(self) -> None:
        _check_positive(self, "global_batch_size", "epochs", "n_views", "projection_dim", "knn_k")
        _check_positive(self, "temperature", "base_temperature", "width", "learning_rate")
        _check_positive(self, "classifier_learning_rate", "knn_temperature")
        _check_non_negative(self, "momentum", "weight_decay", "warmup_epochs", "warmup_from")
        _check_non_negative(self, "final_learning_rate", "lars_trust_coefficient")
        _check_non_negative(self, "classifier_momentum", "classifier_weight_decay")
        if self.warmup_epochs >= self.epochs:
            raise ValueError(
                f"invalid hyperparameter warmup_epochs={self.warmup_epochs}: it must be smaller "
                f"than epochs={self.epochs}; shorten the warm-up or train longer"
            )
        if not 0 < self.lr_decay_rate <= 1:
            raise ValueError(
                f"invalid hyperparameter lr_decay_rate={self.lr_decay_rate}: expected a factor "
                "in (0, 1], e.g. 0.1"
            )
        if list(self.lr_decay_epochs) != sorted(self.lr_decay_epochs):
            raise ValueError(
                f"invalid hyperparameter lr_decay_epochs={list(self.lr_decay_epochs)}: list the "
                "epochs in increasing order"
            )
        if self.n_views == 1 and self.method == "simclr":
            raise ValueError(
                "invalid hyperparameter n_views=1 with method='simclr': SimCLR needs at least two "
                "views of each image, because the other views are its only positives"
            )


@dataclasses.dataclass(frozen=True)
class NestedLoopHParams:
    """Hyperparameters of the trial that trains its classifier in a nested loop."""

    # Train the classifier after every this many contrastive epochs (and after the last epoch).
    train_cls_every_n_epochs: int = 10
    # Passes over the classifier's training set in each of those rounds.
    train_cls_epochs: int = 1

    def __post_init__(self) -> None:
        for name in ("train_cls_every_n_epochs", "train_cls_epochs"):
            value = getattr(self, name)
            if value < 1:
                raise ValueError(f"invalid hyperparameter {name}={value}: expected an integer >= 1")


@dataclasses.dataclass(frozen=True)
class DataSettings:
    """The experiment config's `data` section."""

    # A name registered in data.py: cifar10, cifar100, image_folder, digits or synthetic.
    dataset: str = "cifar10"
    # Where datasets are downloaded or read. Every process of a node shares it.
    data_dir: str | None = None
    download: bool = True
    # Data-loading worker processes per training process.
    num_workers: int = 4
    # Overrides of the dataset's augmentation strengths (fields of data.AugmentationConfig).
    augmentation: Mapping[str, Any] = dataclasses.field(default_factory=dict)
    # Dataset-specific options passed to data.build_datasets (e.g. image_size, mean, std).
    options: Mapping[str, Any] = dataclasses.field(default_factory=dict)

    def __post_init__(self) -> None:
        _check_non_negative(self, "num_workers")


SettingsT = TypeVar("SettingsT")


def parse_hparams(
    raw: Mapping[str, Any], extra: type[SettingsT] | None = None
) -> tuple[HParams, SettingsT | None]:
    """Validate the `hyperparameters` section into `HParams`, plus a trial's own `extra` fields.

    Raises:
        ValueError: on a missing, unknown or misspelled key, a wrong type or a value out of range.
    """
    classes = [HParams] + ([extra] if extra is not None else [])
    known = {field.name for cls in classes for field in dataclasses.fields(cls)}
    _reject_unknown_keys(raw, known, "hyperparameter", "hyperparameters")
    base = _build(HParams, raw, "hyperparameter")
    return base, (_build(extra, raw, "hyperparameter") if extra is not None else None)


def parse_data_settings(raw: Mapping[str, Any] | None) -> DataSettings:
    """Validate the experiment config's `data` section into `DataSettings`."""
    raw = raw or {}
    known = {field.name for field in dataclasses.fields(DataSettings)}
    _reject_unknown_keys(raw, known, "data setting", "data")
    return _build(DataSettings, raw, "data setting")


def _reject_unknown_keys(raw: Mapping[str, Any], known: set[str], kind: str, section: str) -> None:
    for key in raw:
        if key not in known:
            close = difflib.get_close_matches(key, sorted(known), n=1)
            hint = f"did you mean '{close[0]}'?" if close else f"expected one of {sorted(known)}"
            raise ValueError(f"unknown {kind} '{key}' in the '{section}' section; {hint}")


def _build(cls: type[SettingsT], raw: Mapping[str, Any], kind: str) -> SettingsT:
    hints = typing.get_type_hints(cls)
    values = {}
    for field in dataclasses.fields(cls):  # type: ignore[arg-type]
        if field.name in raw:
            values[field.name] = _coerce(raw[field.name], hints[field.name], field.name, kind)
        elif field.default is dataclasses.MISSING and field.default_factory is dataclasses.MISSING:
            raise ValueError(f"missing {kind} '{field.name}'; add it to the experiment config")
    return cls(**values)


def _coerce(value: Any, annotation: Any, name: str, kind: str) -> Any:
    """Check `value` against a field's annotation, widening int to float where a float is due."""
    origin = get_origin(annotation)
    if origin is Literal:
        allowed = get_args(annotation)
        if value not in allowed:
            raise ValueError(f"invalid {kind} {name}={value!r}; expected one of {list(allowed)}")
        return value
    if origin in (types.UnionType, typing.Union):
        members = get_args(annotation)
        if value is None and type(None) in members:
            return None
        (annotation,) = [member for member in members if member is not type(None)]
        return _coerce(value, annotation, name, kind)
    if origin is tuple:
        if not isinstance(value, list | tuple):
            raise ValueError(f"invalid {kind} {name}={value!r}; expected a list")
        (item_type, _) = get_args(annotation)
        return tuple(_coerce(item, item_type, name, kind) for item in value)
    if origin is Mapping:
        if not isinstance(value, Mapping):
            raise ValueError(
                f"invalid {kind} {name}={value!r}; expected a mapping of keys to values"
            )
        return types.MappingProxyType(dict(value))
    if annotation is bool:
        if not isinstance(value, bool):
            raise ValueError(f"invalid {kind} {name}={value!r}; expected true or false")
        return value
    if annotation is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ValueError(f"invalid {kind} {name}={value!r}; expected an integer")
        return value
    if annotation is float:
        if (
            isinstance(value, bool)
            or not isinstance(value, int | float)
            or not math.isfinite(value)
        ):
            raise ValueError(f"invalid {kind} {name}={value!r}; expected a finite number")
        return float(value)
    if annotation is str:
        if not isinstance(value, str):
            raise ValueError(f"invalid {kind} {name}={value!r}; expected a string")
        return value
    raise TypeError(f"unsupported annotation {annotation!r} of {name}")


def _check_positive(settings: object, *names: str) -> None:
    for name in names:
        value = getattr(settings, name)
        if value <= 0:
            raise ValueError(f"invalid hyperparameter {name}={value}: expected a value > 0")


def _check_non_negative(settings: object, *names: str) -> None:
    for name in names:
        value = getattr(settings, name)
        if value < 0:
            raise ValueError(f"invalid setting {name}={value}: expected a value >= 0")
