"""LARS: SGD with momentum and a layer-wise trust ratio (You et al., arXiv 1708.03888).

SimCLR (Chen et al., arXiv 2002.05709) trains with it at large batch sizes. As in SimCLR,
BatchNorm and bias parameters are excluded from both weight decay and the trust-ratio
adaptation: `parameter_groups` puts them in a group with `lars_exclude=True`.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import torch
from torch import nn


def parameter_groups(model: nn.Module, weight_decay: float) -> list[dict[str, Any]]:
    """Split parameters into adapted ones and BatchNorm/bias ones (vectors) that are excluded."""
    adapted, excluded = [], []
    for parameter in model.parameters():
        if not parameter.requires_grad:
            continue
        # Weights of convolutions and linear layers are matrices, while BatchNorm scales and all
        # biases are vectors.
        (excluded if parameter.ndim <= 1 else adapted).append(parameter)
    return [
        {"params": adapted, "weight_decay": weight_decay, "lars_exclude": False},
        {"params": excluded, "weight_decay": 0.0, "lars_exclude": True},
    ]


class LARS(torch.optim.Optimizer):
    """SGD with momentum whose update of each tensor is scaled by a trust ratio.

    For a parameter w with gradient g (weight decay already added), the update direction is
    g * trust_coefficient * ||w|| / ||g||, or g unchanged when either norm is zero or the
    parameter group sets `lars_exclude`.

    Args:
        params: Parameters or parameter groups, e.g. from `parameter_groups`.
        lr: Learning rate.
        momentum: Momentum factor.
        weight_decay: L2 penalty added to the gradient before adaptation.
        trust_coefficient: The trust coefficient eta of the paper.
    """

    def __init__(
        self,
        params: Iterable[Any],
        lr: float,
        momentum: float = 0.9,
        weight_decay: float = 0.0,
        trust_coefficient: float = 0.001,
    ) -> None:
        if lr <= 0:
            raise ValueError(f"invalid learning rate {lr}; expected a value > 0")
        if trust_coefficient < 0:
            raise ValueError(f"invalid trust_coefficient {trust_coefficient}; expected >= 0")
        defaults = {
            "lr": lr,
            "momentum": momentum,
            "weight_decay": weight_decay,
            "trust_coefficient": trust_coefficient,
            "lars_exclude": False,
        }
        super().__init__(params, defaults)

    @torch.no_grad()
    def step(self, closure: Any = None) -> Any:  # noqa: D102
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()

        for group in self.param_groups:
            for parameter in group["params"]:
                if parameter.grad is None:
                    continue
                update = parameter.grad
                if not group["lars_exclude"]:
                    update = update.add(parameter, alpha=group["weight_decay"])
                    weight_norm = torch.linalg.vector_norm(parameter)
                    update_norm = torch.linalg.vector_norm(update)
                    trust = torch.where(
                        (weight_norm > 0) & (update_norm > 0),
                        group["trust_coefficient"] * weight_norm / update_norm,
                        torch.ones_like(weight_norm),
                    )
                    update = update.mul(trust)

                state = self.state[parameter]
                if "momentum_buffer" not in state:
                    state["momentum_buffer"] = torch.clone(update).detach()
                else:
                    state["momentum_buffer"].mul_(group["momentum"]).add_(update)
                parameter.add_(state["momentum_buffer"], alpha=-group["lr"])
        return loss
