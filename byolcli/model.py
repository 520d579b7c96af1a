"""Backbones, the BYOL heads, and the BYOL module with its EMA target network.

Online network: encoder f_θ → projector g_θ → predictor q_θ.
Target network: f_ξ → g_ξ, an exponential moving average of the online weights,
never trained by gradient. Only f_θ survives training (see encoder.py).
"""

from __future__ import annotations

import copy

import torch
import torch.nn.functional as F
import torchvision
from torch import nn

from byolcli.inputs import ARCHITECTURES, STEMS
from byolcli.recipe import RECIPE
from byolcli.small_maps import use_small_map_convolutions

# name -> (torchvision constructor, feature dimension after global pooling)
BACKBONES = {name: (getattr(torchvision.models, name), dim) for name, dim in ARCHITECTURES.items()}


class PerViewStatistics:
    """Batch norm for a batch that stacks two views of the same images, [view 1; view 2].

    In training each half is normalised with its own statistics, exactly as when each
    view has a forward pass of its own (the paper's semantics: statistics mixed across
    the views change what the network learns), while every convolution and linear
    layer runs once over both halves: fewer, larger kernels. Evaluation uses the
    running statistics, as any batch norm does.
    """

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.training:
            return super().forward(x)
        first, second = x.chunk(2)
        return torch.cat([super().forward(first), super().forward(second)])


class PerViewBatchNorm1d(PerViewStatistics, nn.BatchNorm1d):
    pass


class PerViewBatchNorm2d(PerViewStatistics, nn.BatchNorm2d):
    pass


def make_backbone(name: str, norm_layer: type[nn.Module] = nn.BatchNorm2d, stem: str = "standard") -> nn.Module:
    """A stock torchvision ResNet, randomly initialised, with `fc` replaced by Identity.

    Keeping torchvision's module names means the exported weights load into
    `torchvision.models.<name>()` (with `fc = Identity()`, and for the small stem the two
    lines of `small_stem`) as they are, whichever batch-norm class trained them. On a CPU
    its convolutions on maps of a pixel or two run as one matrix product (small_maps.py):
    same weights, same results.
    """
    if name not in BACKBONES:
        raise ValueError(f"unknown backbone {name!r}; choose one of {', '.join(BACKBONES)}")
    if stem not in STEMS:
        raise ValueError(f"unknown stem {stem!r}; choose one of {', '.join(STEMS)}")
    model = BACKBONES[name][0](weights=None, norm_layer=norm_layer)
    model.fc = nn.Identity()
    if stem == "small":
        small_stem(model)
    return use_small_map_convolutions(model)


def small_stem(model: nn.Module) -> nn.Module:
    """Give a torchvision ResNet the small-image stem, in place: only `conv1.weight` changes shape."""
    model.conv1 = nn.Conv2d(3, model.conv1.out_channels, kernel_size=3, stride=1, padding=1, bias=False)
    nn.init.kaiming_normal_(model.conv1.weight, mode="fan_out", nonlinearity="relu")  # torchvision's init
    model.maxpool = nn.Identity()
    return model


def stem_of(state: dict) -> str:
    """Which stem a ResNet state dict was trained with, from its first convolution's kernel (the
    standard one when it has none: loading it then says what is missing)."""
    return "small" if "conv1.weight" in state and state["conv1.weight"].shape[-1] == 3 else "standard"


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
    def start_from(self, backbone_state: dict) -> None:
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
        target, online = self.target_parameters(), self.online_parameters()
        torch._foreach_lerp_(target, online, 1 - tau)
        torch._foreach_copy_(self._target_buffers(), self._online_buffers())

    def _online_buffers(self):
        return [*self.online_encoder.buffers(), *self.online_projector.buffers()]

    def _target_buffers(self):
        return [*self.target_encoder.buffers(), *self.target_projector.buffers()]
