"""The BYOL module with its EMA target network, and BYOL's heads and loss.

Online network: encoder f_θ → projector g_θ → predictor q_θ.
Target network: f_ξ → g_ξ, an exponential moving average of the online weights,
never trained by gradient. Only f_θ survives training (see encoder.py).
"""

from __future__ import annotations

import copy

import torch
import torch.nn.functional as F
from torch import nn

from byolcli.core.backbones import BACKBONES, PerViewBatchNorm1d, PerViewBatchNorm2d, PerViewStatistics, make_backbone
from byolcli.core.recipe import RECIPE


def mlp(in_dim: int, hidden: int = RECIPE.projection_hidden, out_dim: int = RECIPE.projection_dim) -> nn.Sequential:
    """Linear → BN → ReLU → Linear: BYOL's projector and predictor (their batch norm per view)."""
    return nn.Sequential(
        nn.Linear(in_dim, hidden), PerViewBatchNorm1d(hidden), nn.ReLU(inplace=True), nn.Linear(hidden, out_dim)
    )


def regression_loss(prediction: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """2 − 2·cos(p, z′) per sample: the MSE between L2-normalised vectors."""
    return 2 - 2 * F.cosine_similarity(prediction, target.detach(), dim=-1)


class BYOL(nn.Module):
    def __init__(self, backbone: str, stem: str = "standard") -> None:
        super().__init__()
        feature_dim = BACKBONES[backbone][1]
        self.online_encoder = make_backbone(backbone, norm_layer=PerViewBatchNorm2d, stem=stem)
        self.online_projector = mlp(feature_dim)
        self.predictor = mlp(RECIPE.projection_dim)
        self.target_encoder = copy.deepcopy(self.online_encoder)
        self.target_projector = copy.deepcopy(self.online_projector)
        for p in self.target_parameters():
            p.requires_grad_(False)

    @torch.no_grad()
    def start_from(self, backbone_state: dict[str, torch.Tensor]) -> None:
        """Online and target encoders both start from these weights (BYOL's target starts as a copy)."""
        self.online_encoder.load_state_dict(backbone_state)
        self.target_encoder.load_state_dict(backbone_state)

    @property
    def joint_pass(self) -> bool:
        """Both views in one pass needs batch norm that tells them apart (per-view statistics, which
        byolcli's synchronised batch norm keeps too); with any other, each view has its own pass."""
        return all(
            isinstance(m, PerViewStatistics) for m in self.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)
        )

    def online_parameters(self) -> list[nn.Parameter]:
        return [*self.online_encoder.parameters(), *self.online_projector.parameters()]

    def target_parameters(self) -> list[nn.Parameter]:
        return [*self.target_encoder.parameters(), *self.target_projector.parameters()]

    def forward(self, view1: torch.Tensor, view2: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Symmetrised BYOL loss (batch mean) and the online projections of view 1 (for monitoring).

        Batch-norm statistics are per view, as in the paper: both views share one
        pass through per-view batch norm, or each view has its own pass.
        """
        if self.joint_pass:
            both = torch.cat([view1, view2])
            z = self.online_projector(self.online_encoder(both))
            p1, p2 = self.predictor(z).chunk(2)
            z1 = z[: len(view1)]
            with torch.no_grad():
                t1, t2 = self.target_projector(self.target_encoder(both)).chunk(2)
        else:
            z1 = self.online_projector(self.online_encoder(view1))
            z2 = self.online_projector(self.online_encoder(view2))
            p1, p2 = self.predictor(z1), self.predictor(z2)
            with torch.no_grad():
                t1 = self.target_projector(self.target_encoder(view1))
                t2 = self.target_projector(self.target_encoder(view2))
        loss = regression_loss(p1, t2).mean() + regression_loss(p2, t1).mean()
        return loss, z1.detach()

    @torch.no_grad()
    def update_target(self, tau: float) -> None:
        """ξ ← τ·ξ + (1 − τ)·θ, as one multi-tensor lerp (a single pass over the weights), and one
        multi-tensor copy of the buffers.

        Batch-norm running statistics are copied: the target always runs in
        training mode (batch statistics), so its buffers only matter for export.
        """
        target: list[torch.Tensor] = [*self.target_parameters()]
        online: list[torch.Tensor] = [*self.online_parameters()]
        torch._foreach_lerp_(target, online, 1 - tau)
        torch._foreach_copy_(self._target_buffers(), self._online_buffers())

    def _online_buffers(self) -> list[torch.Tensor]:
        return [*self.online_encoder.buffers(), *self.online_projector.buffers()]

    def _target_buffers(self) -> list[torch.Tensor]:
        return [*self.target_encoder.buffers(), *self.target_projector.buffers()]
