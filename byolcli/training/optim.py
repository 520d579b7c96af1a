"""LARS and BYOL's schedules (learning rate and EMA rate τ)."""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import nn

from byolcli.core.recipe import RECIPE


class LARS(torch.optim.Optimizer):
    """SGD with momentum and layer-wise trust ratio (You et al. 2017), as BYOL uses it.

    For a parameter w with gradient g, in groups with `lars=True`:
        u = g + wd·w;  u ← u · η·‖w‖/‖u‖ (when both norms are non-zero);  m ← μ·m + u;  w ← w − lr·m
    Groups with `lars=False` (biases, batch-norm) get plain momentum SGD without
    weight decay, as in the paper and DeepMind's code. A step overwrites the gradients.
    """

    def __init__(
        self,
        groups: list[dict[str, Any]],
        lr: float,
        momentum: float = RECIPE.lars_momentum,
        weight_decay: float = RECIPE.weight_decay,
        trust_coefficient: float = RECIPE.lars_trust,
    ) -> None:
        defaults = dict(
            lr=lr, momentum=momentum, weight_decay=weight_decay, trust_coefficient=trust_coefficient, lars=True
        )
        super().__init__(groups, defaults)

    @torch.no_grad()
    def step(self, closure: None = None) -> None:  # type: ignore[override]  # BYOL never passes a closure
        for group in self.param_groups:
            params = [p for p in group["params"] if p.grad is not None]
            if not params:
                continue
            grads = [p.grad for p in params]
            buffers = [self._momentum(p) for p in params]
            torch._foreach_mul_(buffers, group["momentum"])
            if group["lars"]:
                # The gradients become the updates, in place: a fresh copy of BYOL's gradients
                # costs page faults every step, and the trainer discards gradients after it anyway.
                torch._foreach_add_(grads, params, alpha=group["weight_decay"])
                updates = grads
                # All trust ratios in a handful of vector ops, on the device: no .item(),
                # no host sync, and no chain of small ops per layer.
                w_norms = torch.stack(torch._foreach_norm(params))
                u_norms = torch.stack(torch._foreach_norm(updates))
                ratios = torch.where(
                    (w_norms > 0) & (u_norms > 0), group["trust_coefficient"] * w_norms / u_norms.clamp_min(1e-12), 1.0
                )
                torch._foreach_addcmul_(buffers, updates, list(ratios.unbind()))
            else:
                torch._foreach_add_(buffers, grads)
            torch._foreach_add_(params, buffers, alpha=-group["lr"])

    def _momentum(self, p: torch.Tensor) -> torch.Tensor:
        state = self.state[p]
        if "momentum" not in state:
            state["momentum"] = torch.zeros_like(p)
        momentum: torch.Tensor = state["momentum"]
        return momentum


def lars_groups(*modules: nn.Module) -> list[dict[str, Any]]:
    """Split parameters: weights of conv/linear layers get LARS and weight decay;
    biases and batch-norm parameters (all 1-D tensors) get neither."""
    adapted: list[nn.Parameter] = []
    excluded: list[nn.Parameter] = []
    for module in modules:
        for p in module.parameters():
            if p.requires_grad:
                (excluded if p.ndim <= 1 else adapted).append(p)
    return [{"params": adapted, "lars": True}, {"params": excluded, "lars": False, "weight_decay": 0.0}]


def learning_rate(step: int, total: int, warmup: int, peak: float) -> float:
    """Linear warm-up to `peak`, then cosine decay to zero at `total`."""
    if step < warmup:
        return peak * (step + 1) / warmup
    progress = (step - warmup) / max(1, total - warmup)
    return peak * 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))


def ema_rate(step: int, total: int, tau_base: float) -> float:
    """τ = 1 − (1 − τ_base)·(cos(πk/K) + 1)/2: from τ_base at the start to 1 at the end."""
    return 1 - (1 - tau_base) * (math.cos(math.pi * min(step, total) / total) + 1) / 2
