"""Image tensors as the networks see them: the statistics they are normalised with, the
normalisation itself, and the square canvas images are decoded onto for augmentation on the
training device."""

from __future__ import annotations

import functools
from collections.abc import Iterable, Sequence
from typing import TYPE_CHECKING

if TYPE_CHECKING:  # torch is imported where tensors are made: the planner's rules read this module too
    import torch

# ImageNet statistics: what torchvision backbones and most users expect.
MEAN = (0.485, 0.456, 0.406)
STD = (0.229, 0.224, 0.225)


def canvas_side(size: int) -> int:
    """The side of the canvas an image is decoded onto for views of `size` px: larger than the
    views, so that small crops keep some detail."""
    return size * 3 // 2


def normalize_images(images: torch.Tensor, mean: Sequence[float] = MEAN, std: Sequence[float] = STD) -> torch.Tensor:
    """A batch (n, 3, h, w) to normalised float: uint8 is scaled to 0..1 first."""
    if not images.is_floating_point():
        images = images.float() / 255
    shape = (1, 3, 1, 1)
    return (images - constant(mean, images, shape)) / constant(std, images, shape)


def constant(values: Iterable[float], like: torch.Tensor, shape: tuple[int, ...]) -> torch.Tensor:
    """`values` as a tensor of `like`'s device and dtype, made once: a tensor made from Python
    numbers is copied to the GPU, and that copy waits for the work queued before it."""
    return _constant(tuple(values), like.device, like.dtype, shape)


@functools.lru_cache(maxsize=64)
def _constant(
    values: tuple[float, ...], device: torch.device, dtype: torch.dtype, shape: tuple[int, ...]
) -> torch.Tensor:
    import torch

    return torch.tensor(values, dtype=dtype).view(shape).to(device)
