"""LARS: trust-ratio scaling and the exclusion of BatchNorm and bias parameters."""

import torch
from torch import nn

from lars import LARS, parameter_groups


def test_parameter_groups_exclude_vectors():
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.Flatten(), nn.Linear(4, 2))
    adapted, excluded = parameter_groups(model, weight_decay=1e-4)
    assert [p.ndim for p in adapted["params"]] == [4, 2]
    assert all(p.ndim == 1 for p in excluded["params"])
    assert len(excluded["params"]) == 4  # conv bias, BN weight and bias, linear bias
    assert excluded["weight_decay"] == 0.0
    assert excluded["lars_exclude"] is True


def test_lars_scales_update_by_trust_ratio():
    weight = nn.Parameter(torch.tensor([3.0, 4.0]))  # norm 5
    weight.grad = torch.tensor([0.0, 10.0])  # norm 10
    optimizer = LARS([weight], lr=1.0, momentum=0.0, trust_coefficient=0.02)
    optimizer.step()
    # trust = 0.02 * 5 / 10 = 0.01, so the step is 0.01 * grad.
    torch.testing.assert_close(weight.detach(), torch.tensor([3.0, 3.9]))


def test_lars_adds_weight_decay_before_adaptation():
    weight = nn.Parameter(torch.tensor([3.0, 4.0]))
    weight.grad = torch.zeros(2)
    optimizer = LARS([weight], lr=1.0, momentum=0.0, weight_decay=0.5, trust_coefficient=1.0)
    optimizer.step()
    # update = 0.5 * w has norm 2.5; trust = 5 / 2.5 = 2, so the step is w itself.
    torch.testing.assert_close(weight.detach(), torch.zeros(2))


def test_lars_excluded_group_is_plain_sgd():
    bias = nn.Parameter(torch.tensor([1.0, 1.0]))
    bias.grad = torch.tensor([0.5, -0.5])
    groups = [{"params": [bias], "weight_decay": 0.1, "lars_exclude": True}]
    LARS(groups, lr=0.1, momentum=0.0, trust_coefficient=0.001).step()
    torch.testing.assert_close(bias.detach(), torch.tensor([0.95, 1.05]))


def test_lars_zero_weight_falls_back_to_gradient():
    weight = nn.Parameter(torch.zeros(2))
    weight.grad = torch.tensor([1.0, 2.0])
    LARS([weight], lr=0.1, momentum=0.0).step()
    torch.testing.assert_close(weight.detach(), torch.tensor([-0.1, -0.2]))


def test_lars_momentum_accumulates():
    weight = nn.Parameter(torch.tensor([1.0]))
    optimizer = LARS([{"params": [weight], "lars_exclude": True}], lr=1.0, momentum=0.9)
    for _ in range(2):
        weight.grad = torch.tensor([1.0])
        optimizer.step()
    # Steps of 1 and 1.9.
    torch.testing.assert_close(weight.detach(), torch.tensor([1.0 - 1.0 - 1.9]))
