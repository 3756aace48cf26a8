"""Validation of the hyperparameters and data settings."""

import pytest

from hparams import HParams, NestedLoopHParams, parse_data_settings, parse_hparams

MINIMAL = {"global_batch_size": 256, "epochs": 100}


def test_parse_hparams_applies_defaults():
    hparams, extra = parse_hparams(MINIMAL)
    assert hparams == HParams(global_batch_size=256, epochs=100)
    assert extra is None


def test_parse_hparams_widens_int_to_float():
    hparams, _ = parse_hparams({**MINIMAL, "learning_rate": 1})
    assert isinstance(hparams.learning_rate, float)


def test_parse_hparams_reads_list_as_tuple():
    hparams, _ = parse_hparams({**MINIMAL, "lr_decay_epochs": [10, 20]})
    assert hparams.lr_decay_epochs == (10, 20)


def test_parse_hparams_reads_trial_fields():
    raw = {**MINIMAL, "train_cls_every_n_epochs": 5}
    _, extra = parse_hparams(raw, NestedLoopHParams)
    assert extra == NestedLoopHParams(train_cls_every_n_epochs=5)


def test_parse_hparams_suggests_misspelled_key():
    with pytest.raises(ValueError, match="unknown hyperparameter 'learnig_rate'.*'learning_rate'"):
        parse_hparams({**MINIMAL, "learnig_rate": 0.1})


def test_parse_hparams_rejects_trial_field_elsewhere():
    with pytest.raises(ValueError, match="unknown hyperparameter 'train_cls_epochs'"):
        parse_hparams({**MINIMAL, "train_cls_epochs": 2})


def test_parse_hparams_requires_epochs():
    with pytest.raises(ValueError, match="missing hyperparameter 'epochs'"):
        parse_hparams({"global_batch_size": 256})


@pytest.mark.parametrize(
    ("key", "value", "message"),
    [
        ("optimizer", "adam", r"invalid hyperparameter optimizer='adam'; expected one of \['sgd'"),
        ("lr_schedule", "linear", "invalid hyperparameter lr_schedule='linear'"),
        ("backbone", "resnet5", "invalid hyperparameter backbone='resnet5'"),
        ("method", "byol", "invalid hyperparameter method='byol'"),
        ("precision", "fp8", "invalid hyperparameter precision='fp8'"),
        ("epochs", 2.5, "invalid hyperparameter epochs=2.5; expected an integer"),
        ("sync_batchnorm", "yes", "expected true or false"),
        ("temperature", 0, "invalid hyperparameter temperature=0.0"),
        ("learning_rate", float("nan"), "expected a finite number"),
        ("warmup_epochs", 100, "warmup_epochs=100.0: it must be smaller than epochs=100"),
        ("lr_decay_rate", 2.0, "invalid hyperparameter lr_decay_rate=2.0"),
        ("lr_decay_epochs", [20, 10], "list the epochs in increasing order"),
    ],
)
def test_parse_hparams_rejects_bad_value(key, value, message):
    with pytest.raises(ValueError, match=message):
        parse_hparams({**MINIMAL, key: value})


def test_parse_hparams_rejects_simclr_single_view():
    with pytest.raises(ValueError, match="n_views=1 with method='simclr'"):
        parse_hparams({**MINIMAL, "method": "simclr", "n_views": 1})


@pytest.mark.parametrize("every", [0, -1])
def test_nested_loop_rejects_period_below_one(every):
    with pytest.raises(ValueError, match=f"train_cls_every_n_epochs={every}: expected an integer"):
        parse_hparams({**MINIMAL, "train_cls_every_n_epochs": every}, NestedLoopHParams)


def test_parse_data_settings_defaults():
    settings = parse_data_settings(None)
    assert settings.dataset == "cifar10"
    assert dict(settings.augmentation) == {}


def test_parse_data_settings_freezes_mappings():
    settings = parse_data_settings({"dataset": "digits", "augmentation": {"crop_scale": [0.5, 1]}})
    with pytest.raises(TypeError):
        settings.augmentation["crop_scale"] = (0.1, 1.0)


def test_parse_data_settings_suggests_misspelled_key():
    with pytest.raises(ValueError, match="unknown data setting 'data_dri'.*'data_dir'"):
        parse_data_settings({"data_dri": "/tmp"})


def test_parse_data_settings_rejects_negative_workers():
    with pytest.raises(ValueError, match="num_workers=-1"):
        parse_data_settings({"num_workers": -1})
