"""The backbones: torchvision ResNets with byolcli's batch norm per view, the small-image stem, and
which stem a state dict holds."""

from __future__ import annotations

from typing import Any

import torch
import torchvision
from torch import nn

from byolcli.core.inputs import ARCHITECTURES, STEMS
from byolcli.core.small_maps import use_small_map_convolutions

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

    training: bool

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        norm: Any = super()  # the batch norm class mixed in after this one
        if not self.training:
            out: torch.Tensor = norm.forward(x)
            return out
        first, second = x.chunk(2)
        return torch.cat([norm.forward(first), norm.forward(second)])


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
    strided: nn.Conv2d = model.get_submodule("conv1")  # type: ignore[assignment]  # torchvision's ResNet
    model.conv1 = nn.Conv2d(3, strided.out_channels, kernel_size=3, stride=1, padding=1, bias=False)
    nn.init.kaiming_normal_(model.conv1.weight, mode="fan_out", nonlinearity="relu")  # torchvision's init
    model.maxpool = nn.Identity()
    return model


def stem_of(state: dict[str, torch.Tensor]) -> str:
    """Which stem a ResNet state dict was trained with, from its first convolution's kernel (the
    standard one when it has none: loading it then says what is missing)."""
    return "small" if "conv1.weight" in state and state["conv1.weight"].shape[-1] == 3 else "standard"
