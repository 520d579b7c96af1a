"""BYOL's recipe (Grill et al. 2020, Table 6 and §3.2, and DeepMind's reference code): one frozen value
that the per-image augmentation (views.py), the batched one (training/augment.py), the heads
(training/byol.py) and the optimizer (training/optim.py, training/plan.py) all read, so the two
augmentation paths cannot drift apart."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Recipe:
    crop_scale: tuple[float, float] = (0.08, 1.0)  # share of the image's area a crop covers
    crop_ratio: tuple[float, float] = (3 / 4, 4 / 3)
    flip_p: float = 0.5
    brightness: float = 0.4
    contrast: float = 0.4
    saturation: float = 0.2
    hue: float = 0.1
    jitter_p: float = 0.8
    grayscale_p: float = 0.2
    blur_sigma: tuple[float, float] = (0.1, 2.0)
    blur_share: float = 0.1  # the blur kernel spans about this share of the side
    # solo-learn's CIFAR recipe drops the blur at small sizes: a 3-pixel kernel mostly erases
    # the little detail a 32-px image has.
    blur_min_size: int = 65
    blur_p: tuple[float, float] = (1.0, 0.1)  # view 1, view 2: the asymmetry is the paper's
    solarize_p: tuple[float, float] = (0.0, 0.2)
    projection_hidden: int = 4096
    projection_dim: int = 256
    lars_trust: float = 1e-3
    lars_momentum: float = 0.9
    weight_decay: float = 1.5e-6

    def blur_kernel(self, size: int) -> int | None:
        """The odd blur kernel for views of `size` pixels, or None where the recipe does not blur."""
        if size < self.blur_min_size:
            return None
        return max(3, int(size * self.blur_share) // 2 * 2 + 1)

    def views(self) -> tuple[tuple[float, float], tuple[float, float]]:
        """(blur probability, solarize probability) of view 1 and of view 2."""
        (blur1, blur2), (solarize1, solarize2) = self.blur_p, self.solarize_p
        return (blur1, solarize1), (blur2, solarize2)


RECIPE = Recipe()
