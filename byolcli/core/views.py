"""BYOL's two views of an image, with random parameters drawn per image: what training's per-image
loader feeds the networks and what the label-free judge embeds for view retrieval and alignment.

Each item decodes one file (at reduced scale when the size is small) and applies BYOL's two asymmetric
augmentation pipelines (recipe.py) to it; every image gets its own crop, flip, jitter, blur and solarize
draw: nothing is shared across a batch. The draws for an item are a pure function of (seed, epoch,
index): a run resumed from a checkpoint sees exactly the views the uninterrupted run would have seen,
whatever the number of loader processes.
"""

from __future__ import annotations

import warnings
from pathlib import Path

import torch
from torch.utils.data import Dataset
from torchvision.transforms import v2

from byolcli.core.images import open_rgb
from byolcli.core.pixels import MEAN, STD
from byolcli.core.recipe import RECIPE, Recipe


def byol_view(size: int, blur_p: float, solarize_p: float, recipe: Recipe = RECIPE) -> v2.Compose:
    """One of BYOL's views, on a uint8 CHW tensor."""
    jitter = v2.ColorJitter(
        brightness=recipe.brightness, contrast=recipe.contrast, saturation=recipe.saturation, hue=recipe.hue
    )
    steps = [
        v2.RandomResizedCrop(size, scale=recipe.crop_scale, ratio=recipe.crop_ratio, antialias=True),
        v2.RandomHorizontalFlip(p=recipe.flip_p),
        # ColorJitter applies its four adjustments in a random order, as in the paper.
        v2.RandomApply([jitter], p=recipe.jitter_p),
        v2.RandomGrayscale(p=recipe.grayscale_p),
    ]
    kernel = recipe.blur_kernel(size)
    if kernel and blur_p > 0:
        steps.append(v2.RandomApply([v2.GaussianBlur(kernel, sigma=recipe.blur_sigma)], p=blur_p))
    if solarize_p > 0:
        steps.append(v2.RandomSolarize(threshold=128, p=solarize_p))
    steps += [v2.ToDtype(torch.float32, scale=True), v2.Normalize(MEAN, STD)]
    return v2.Compose(steps)


class TwoViewDataset(Dataset[tuple[torch.Tensor, torch.Tensor]]):
    """Item (epoch, i): two augmented views of image i, as float tensors (3, size, size)."""

    def __init__(self, paths: list[Path], size: int, seed: int = 0) -> None:
        self.paths = [str(p) for p in paths]
        self.size = size
        self.seed = seed
        (blur1, solarize1), (blur2, solarize2) = RECIPE.views()
        self.view1 = byol_view(size, blur_p=blur1, solarize_p=solarize1)
        self.view2 = byol_view(size, blur_p=blur2, solarize_p=solarize2)
        self.to_tensor = v2.PILToTensor()

    def __len__(self) -> int:
        return len(self.paths)

    def load(self, index: int, min_side: int | None = None) -> torch.Tensor:
        """Decode image `index` as uint8 CHW; a file that broke since the scan is replaced by its
        neighbour rather than ending a long run."""
        for offset in range(len(self.paths)):
            path = self.paths[(index + offset) % len(self.paths)]
            try:
                image: torch.Tensor = self.to_tensor(open_rgb(path, min_side=min_side or self.size))
                return image
            except Exception as exc:  # noqa: BLE001 - any unreadable file is skipped the same way
                warnings.warn(f"{path}: skipped during training ({exc})", stacklevel=1)
        raise RuntimeError("no image in the dataset could be decoded")

    def __getitem__(self, key: tuple[int, int]) -> tuple[torch.Tensor, torch.Tensor]:
        epoch, index = key
        image = self.load(index)
        # torchvision's transforms draw from the global generator: seed a private
        # copy of it for this item, leaving the caller's random state untouched.
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(item_seed(self.seed, epoch, index))
            return self.view1(image), self.view2(image)


def item_seed(seed: int, epoch: int, index: int) -> int:
    return ((seed * 1_000_003 + epoch) * 10_000_019 + index) % 2**63
