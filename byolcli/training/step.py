"""One BYOL optimisation step (Grill et al. 2020, Algorithm 1), written once for training and for
the planner's probe: both views through the online and target networks under autocast, the
symmetrised loss (scaled under fp16), LARS on the online network and predictor, then the EMA
step of the target network. With gradient accumulation, several micro-batches feed one step."""

from __future__ import annotations

import torch
from torch import nn

from byolcli.core.hardware import mixed_precision, precision_dtype
from byolcli.core.recipe import RECIPE
from byolcli.training.byol import BYOL
from byolcli.training.optim import LARS, lars_groups


class ByolStep:
    """The optimizer and loss scaler of a BYOL model, and the step they take together."""

    def __init__(
        self,
        model: BYOL,
        precision: str,
        device_type: str,
        lr: float,
        weight_decay: float = RECIPE.weight_decay,
        forward: nn.Module | None = None,
    ) -> None:
        self.model = model
        self.forward = forward or model  # with several processes, DistributedDataParallel around the model
        self.optimizer = LARS(
            lars_groups(model.online_encoder, model.online_projector, model.predictor), lr=lr, weight_decay=weight_decay
        )
        self.scaler = torch.amp.GradScaler(device_type, enabled=precision == "fp16")
        self.device_type = device_type
        self.dtype = precision_dtype(precision)

    def set_learning_rate(self, lr: float) -> None:
        for group in self.optimizer.param_groups:
            group["lr"] = lr

    def accumulate(
        self, view1: torch.Tensor, view2: torch.Tensor, accumulation: int = 1
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Forward and backward pass of one of `accumulation` micro-batches. Returns its loss
        (detached) and the online projections of view 1."""
        with mixed_precision(self.device_type, self.dtype):
            loss, projections = self.forward(view1, view2)
        self.scaler.scale(loss / accumulation).backward()
        return loss.detach(), projections

    def finish(self, tau: float) -> torch.Tensor | None:
        """The optimizer step on the accumulated gradients (skipped by the scaler on an fp16
        overflow), then the target's EMA step ξ ← τ·ξ + (1 − τ)·θ.

        Under fp16, returns whether the scaler skipped the step, as a tensor on the device (no
        wait): it lowers its scale exactly when it found non-finite gradients, which a finite
        loss does not rule out.
        """
        enabled = self.scaler.is_enabled()
        # The scale tensor update() changes in place; a disabled scaler has none.
        before = self.scaler._scale.clone() if enabled and self.scaler._scale is not None else None
        self.scaler.step(self.optimizer)
        self.scaler.update()
        self.optimizer.zero_grad(set_to_none=True)
        self.model.update_target(tau)
        after = self.scaler._scale if enabled else None
        return None if before is None or after is None else after < before
