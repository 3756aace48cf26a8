"""Learning-rate schedule values at warm-up end, mid-way and the last batch."""

import math

import pytest
import torch

from schedules import LearningRateSchedule, steps_per_epoch


def cosine_schedule(**overrides):
    settings = dict(
        base_lr=0.5,
        total_batches=1000,
        kind="cosine",
        warmup_batches=100,
        warmup_from=0.01,
        final_lr=0.0005,
    )
    settings.update(overrides)
    return LearningRateSchedule(**settings)


def test_cosine_starts_at_warmup_from():
    assert cosine_schedule().learning_rate_at(0) == pytest.approx(0.01)


def test_cosine_warmup_end_meets_decay():
    schedule = cosine_schedule()
    end_of_warmup = schedule.decayed_lr_at(100)
    expected = 0.0005 + (0.5 - 0.0005) * 0.5 * (1 + math.cos(math.pi * 100 / 999))
    assert end_of_warmup == pytest.approx(expected)
    assert schedule.learning_rate_at(100) == pytest.approx(expected)
    # The last warm-up batch sits one linear step below the decay curve.
    step = (expected - 0.01) / 100
    assert schedule.learning_rate_at(99) == pytest.approx(expected - step)


def test_cosine_midway_is_mean_of_ends():
    schedule = cosine_schedule(total_batches=1001, warmup_batches=0)
    assert schedule.learning_rate_at(500) == pytest.approx((0.5 + 0.0005) / 2)


def test_cosine_last_batch_is_final_lr():
    schedule = cosine_schedule()
    assert schedule.learning_rate_at(999) == pytest.approx(0.0005, abs=1e-12)
    assert schedule.learning_rate_at(998) > 0.0005


def test_step_schedule_decays_at_milestones():
    schedule = LearningRateSchedule(
        base_lr=0.5, total_batches=100, kind="step", decay_batches=[50, 80], decay_rate=0.1
    )
    assert schedule.learning_rate_at(49) == pytest.approx(0.5)
    assert schedule.learning_rate_at(50) == pytest.approx(0.05)
    assert schedule.learning_rate_at(79) == pytest.approx(0.05)
    assert schedule.learning_rate_at(80) == pytest.approx(0.005)
    assert schedule.learning_rate_at(99) == pytest.approx(0.005)


def test_step_schedule_warmup_targets_base_lr():
    schedule = LearningRateSchedule(
        base_lr=0.5, total_batches=100, kind="step", warmup_batches=10, warmup_from=0.0
    )
    assert schedule.learning_rate_at(5) == pytest.approx(0.25)
    assert schedule.learning_rate_at(10) == pytest.approx(0.5)


def test_lambda_lr_follows_schedule():
    schedule = cosine_schedule(total_batches=20, warmup_batches=5)
    parameter = torch.nn.Parameter(torch.zeros(1))
    optimizer = torch.optim.SGD([parameter], lr=schedule.base_lr)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, schedule.factor_fn())
    seen = []
    for _ in range(20):
        seen.append(optimizer.param_groups[0]["lr"])
        optimizer.step()
        scheduler.step()
    expected = [schedule.learning_rate_at(batch) for batch in range(20)]
    assert seen == pytest.approx(expected)


def test_schedule_state_dict_omits_function():
    schedule = cosine_schedule(total_batches=20, warmup_batches=5)
    optimizer = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=schedule.base_lr)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, schedule.factor_fn())
    assert scheduler.state_dict()["lr_lambdas"] == [None]


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        ({"kind": "linear"}, "unknown learning-rate schedule 'linear'"),
        ({"total_batches": 0}, "invalid schedule length of 0 batches"),
        ({"warmup_batches": 1000}, "invalid warm-up of 1000 batches"),
    ],
)
def test_schedule_rejects_bad_settings(overrides, message):
    with pytest.raises(ValueError, match=message):
        cosine_schedule(**overrides)


def test_steps_per_epoch_matches_chief_loader():
    # 1000 images, 64 per slot: 15 full per-slot batches, dealt to 2 slots in turn.
    assert steps_per_epoch(1000, 64, 2) == 8
    assert steps_per_epoch(1000, 64, 1) == 15
    assert steps_per_epoch(1000, 100, 5) == 2


@pytest.mark.parametrize(
    ("num_samples", "per_slot", "slots"), [(1000, 64, 2), (1000, 100, 5), (97, 8, 3)]
)
def test_steps_per_epoch_matches_determined(num_samples, per_slot, slots):
    from determined import pytorch

    loader = pytorch.DataLoader(
        torch.utils.data.TensorDataset(torch.zeros(num_samples)),
        batch_size=per_slot,
        shuffle=True,
        drop_last=True,
    )
    chief_loader = loader.get_data_loader(repeat=True, num_replicas=slots, rank=0)
    assert steps_per_epoch(num_samples, per_slot, slots) == len(chief_loader)
