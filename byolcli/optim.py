"""LARS and BYOL's schedules (learning rate and EMA rate τ)."""

from __future__ import annotations

import math

import torch
from torch import nn


class LARS(torch.optim.Optimizer):
    """SGD with momentum and layer-wise trust ratio (You et al. 2017), as BYOL uses it.

    For a parameter w with gradient g, in groups with `lars=True`:
        u = g + wd·w;  u ← u · η·‖w‖/‖u‖ (when both norms are non-zero);  m ← μ·m + u;  w ← w − lr·m
    Groups with `lars=False` (biases, batch-norm) get plain momentum SGD without
    weight decay, as in the paper and DeepMind's code.
    """

    def __init__(self, groups, lr: float, momentum: float = 0.9, weight_decay: float = 1.5e-6,
                 trust_coefficient: float = 1e-3) -> None:
        defaults = dict(lr=lr, momentum=momentum, weight_decay=weight_decay,
                        trust_coefficient=trust_coefficient, lars=True)
        super().__init__(groups, defaults)

    @torch.no_grad()
    def step(self, closure=None):
        for group in self.param_groups:
            params = [p for p in group["params"] if p.grad is not None]
            if not params:
                continue
            grads = [p.grad for p in params]
            if group["lars"]:
                updates = torch._foreach_add(grads, params, alpha=group["weight_decay"])
                # Trust ratios stay on the device: no .item(), no host sync per step.
                w_norms = torch._foreach_norm(params)
                u_norms = torch._foreach_norm(updates)
                for update, w_norm, u_norm in zip(updates, w_norms, u_norms):
                    ratio = torch.where(
                        (w_norm > 0) & (u_norm > 0),
                        group["trust_coefficient"] * w_norm / u_norm.clamp_min(1e-12),
                        torch.ones_like(w_norm),
                    )
                    update.mul_(ratio)
            else:
                updates = grads
            buffers = []
            for p, update in zip(params, updates):
                state = self.state[p]
                if "momentum" not in state:
                    state["momentum"] = torch.zeros_like(p)
                buffers.append(state["momentum"])
            torch._foreach_mul_(buffers, group["momentum"])
            torch._foreach_add_(buffers, updates)
            torch._foreach_add_(params, buffers, alpha=-group["lr"])


def lars_groups(*modules: nn.Module) -> list[dict]:
    """Split parameters: weights of conv/linear layers get LARS and weight decay;
    biases and batch-norm parameters (all 1-D tensors) get neither."""
    adapted, excluded = [], []
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
