"""BYOL's view augmentations for a whole batch at once, on the training device.

At 224 px, CPU workers cannot produce BYOL's two augmented views as fast as a
GPU consumes them. So on CUDA the loader only decodes each image onto a fixed
square canvas (uint8, cheap to ship), and this module makes both views on the
GPU. Every random parameter is still drawn per image: crop box, flip, jitter
strengths and their order, grayscale, blur sigma, solarize.

Crop boxes are sampled in each image's original width × height, exactly as
torchvision's RandomResizedCrop does, then mapped onto the canvas, so aspect
ratios mean the same as on the CPU path even though the canvas is square.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from byolcli.core.pixels import constant, normalize_images
from byolcli.core.recipe import RECIPE

ATTEMPTS = 10  # torchvision's RandomResizedCrop tries 10 boxes before falling back to a centre crop


def crop_boxes(
    sizes: torch.Tensor, scale: tuple[float, float] = RECIPE.crop_scale, ratio: tuple[float, float] = RECIPE.crop_ratio
) -> torch.Tensor:
    """Per-image crop boxes (x0, y0, w, h), in pixels of each image's original (height, width)."""
    n, device = len(sizes), sizes.device
    height, width = sizes[:, 0:1].float(), sizes[:, 1:2].float()
    area = height * width
    target = area * torch.empty(n, ATTEMPTS, device=device).uniform_(*scale)
    log_ratio = torch.empty(n, ATTEMPTS, device=device).uniform_(math.log(ratio[0]), math.log(ratio[1]))
    aspect = log_ratio.exp()
    w = (target * aspect).sqrt().round()
    h = (target / aspect).sqrt().round()
    valid = (w > 0) & (h > 0) & (w <= width) & (h <= height)
    first = torch.where(valid.any(1), valid.float().argmax(1), torch.full((n,), -1, device=device))
    pick = first.clamp_min(0)[:, None]
    w, h = w.gather(1, pick).squeeze(1), h.gather(1, pick).squeeze(1)
    # Fallback when no attempt fits: the largest centred box within the ratio range.
    in_ratio = (width / height).squeeze(1)
    fw = torch.where(
        in_ratio < ratio[0],
        width.squeeze(1),
        torch.where(in_ratio > ratio[1], (height.squeeze(1) * ratio[1]).round(), width.squeeze(1)),
    )
    fh = torch.where(in_ratio < ratio[0], (width.squeeze(1) / ratio[0]).round(), height.squeeze(1))
    fallback = first < 0
    w, h = torch.where(fallback, fw, w), torch.where(fallback, fh, h)
    x0 = ((width.squeeze(1) - w + 1) * torch.rand(n, device=device)).floor()
    y0 = ((height.squeeze(1) - h + 1) * torch.rand(n, device=device)).floor()
    x0 = torch.where(fallback, ((width.squeeze(1) - w) / 2).floor(), x0)
    y0 = torch.where(fallback, ((height.squeeze(1) - h) / 2).floor(), y0)
    return torch.stack([x0, y0, w, h], dim=1)


def crop_resize(
    canvas: torch.Tensor, sizes: torch.Tensor, boxes: torch.Tensor, flip: torch.Tensor, out: int
) -> torch.Tensor:
    """Cut each box out of its canvas and resize it to out × out (bilinear), mirrored where `flip`."""
    height, width = sizes[:, 0].float(), sizes[:, 1].float()
    x0, y0, w, h = boxes.unbind(1)
    # In normalised canvas coordinates (-1..1 edge to edge) the box spans
    # [2·x0/W − 1, 2·(x0 + w)/W − 1]; the canvas stretch from W×H cancels out.
    sx, sy = w / width, h / height
    tx, ty = (2 * x0 + w) / width - 1, (2 * y0 + h) / height - 1
    sx = torch.where(flip, -sx, sx)
    zero = torch.zeros_like(sx)
    theta = torch.stack([torch.stack([sx, zero, tx], 1), torch.stack([zero, sy, ty], 1)], 1)
    grid = F.affine_grid(theta, [len(canvas), 3, out, out], align_corners=False)
    # Border padding, written as a grid held to the outermost pixel centres: MPS lacks
    # padding_mode="border" in some torch releases byolcli takes, and one form runs everywhere.
    edge = 1 - 1 / canvas.shape[-1]  # the canvas is square
    return F.grid_sample(canvas, grid.clamp(-edge, edge), mode="bilinear", padding_mode="zeros", align_corners=False)


def grayscale(x: torch.Tensor) -> torch.Tensor:
    return (0.299 * x[:, 0:1] + 0.587 * x[:, 1:2] + 0.114 * x[:, 2:3]).expand_as(x)


def rgb_to_hsv(x: torch.Tensor) -> torch.Tensor:
    r, g, b = x.unbind(1)
    high, low = x.amax(1), x.amin(1)  # max(1)/min(1) also find indices, far slower (benchmarks/augment_cost.py)
    span = high - low
    safe = torch.where(span > 0, span, torch.ones_like(span))
    hue = (
        torch.where(high == r, ((g - b) / safe) % 6, torch.where(high == g, (b - r) / safe + 2, (r - g) / safe + 4)) / 6
    )
    hue = torch.where(span > 0, hue, torch.zeros_like(hue))
    saturation = torch.where(
        high > 0, span / torch.where(high > 0, high, torch.ones_like(high)), torch.zeros_like(high)
    )
    return torch.stack([hue, saturation, high], 1)


def hsv_to_rgb(x: torch.Tensor) -> torch.Tensor:
    hue, saturation, value = x.unbind(1)
    k = (constant((5.0, 3.0, 1.0), x, (1, 3, 1, 1)) + hue[:, None] * 6) % 6
    return value[:, None] - value[:, None] * saturation[:, None] * (torch.minimum(k, 4 - k).clamp(0, 1))


def color_jitter(
    x: torch.Tensor,
    apply: torch.Tensor,
    brightness: float = RECIPE.brightness,
    contrast: float = RECIPE.contrast,
    saturation: float = RECIPE.saturation,
    hue: float = RECIPE.hue,
    select: bool | None = None,
) -> torch.Tensor:
    """torchvision's ColorJitter per image: own strengths, own random order, only where `apply`.

    Each of the 4 order slots applies one of 4 ops per image. `select` (the default on
    a CPU) runs each op only on the images that chose it there: a quarter of the work.
    Otherwise every op runs on the whole batch and is kept where chosen: more
    arithmetic, but no index lists, whose sizes would make the host wait for a GPU.
    """
    n, device = len(x), x.device
    if select is None:
        select = device.type == "cpu"
    factors = torch.stack(
        [
            torch.empty(n, device=device).uniform_(1 - brightness, 1 + brightness),
            torch.empty(n, device=device).uniform_(1 - contrast, 1 + contrast),
            torch.empty(n, device=device).uniform_(1 - saturation, 1 + saturation),
            torch.empty(n, device=device).uniform_(-hue, hue),
        ],
        1,
    )[:, :, None, None, None]
    order = torch.rand(n, 4, device=device).argsort(1)
    for slot in range(4):
        for op in range(4):
            chosen = apply & (order[:, slot] == op)
            if select:
                rows = chosen.nonzero().squeeze(1)
                x = x.index_copy(0, rows, _adjust(op, x[rows], factors[rows, op]))
            else:
                x = torch.where(chosen[:, None, None, None], _adjust(op, x, factors[:, op]), x)
    return x


def _adjust(op: int, img: torch.Tensor, f: torch.Tensor) -> torch.Tensor:
    """One jitter op with per-image factors f (n, 1, 1, 1): brightness, contrast, saturation or hue."""
    if op == 0:
        return (img * f).clamp(0, 1)
    if op == 1:
        mean = grayscale(img)[:, :1].mean((2, 3), keepdim=True)
        return (f * img + (1 - f) * mean).clamp(0, 1)
    if op == 2:
        return (f * img + (1 - f) * grayscale(img)).clamp(0, 1)
    hsv = rgb_to_hsv(img)
    hsv = torch.stack([(hsv[:, 0] + f[:, 0]) % 1.0, hsv[:, 1], hsv[:, 2]], 1)
    return hsv_to_rgb(hsv)


def gaussian_blur(
    x: torch.Tensor,
    apply: torch.Tensor,
    kernel: int,
    sigma: tuple[float, float] = RECIPE.blur_sigma,
    select: bool | None = None,
) -> torch.Tensor:
    """Separable Gaussian blur with σ drawn per image, where `apply`. `select`: as in color_jitter,
    blur only the images that drew it (a tenth of view 2's) rather than all and keep some."""
    sigmas = torch.empty(len(x), device=x.device).uniform_(*sigma)
    if select is None:
        select = x.device.type == "cpu"
    if select:
        rows = apply.nonzero().squeeze(1)
        return x.index_copy(0, rows, _blur(x[rows], sigmas[rows], kernel))
    return torch.where(apply[:, None, None, None], _blur(x, sigmas, kernel), x)


def _blur(x: torch.Tensor, sigmas: torch.Tensor, kernel: int) -> torch.Tensor:
    n, channels, size = len(x), x.shape[1], x.shape[-1]
    t = torch.arange(kernel, device=x.device, dtype=x.dtype) - kernel // 2
    weights = torch.exp(-(t[None] ** 2) / (2 * sigmas[:, None] ** 2))
    weights = (weights / weights.sum(1, keepdim=True)).repeat_interleave(channels, 0)  # (n·c, k)
    flat = x.reshape(1, n * channels, size, size)
    pad = kernel // 2
    flat = F.conv2d(F.pad(flat, (pad, pad, 0, 0), mode="reflect"), weights[:, None, None, :], groups=n * channels)
    flat = F.conv2d(F.pad(flat, (0, 0, pad, pad), mode="reflect"), weights[:, None, :, None], groups=n * channels)
    return flat.reshape_as(x)


def byol_views(
    canvas: torch.Tensor, sizes: torch.Tensor, out: int, select: bool | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Both BYOL views of a batch of uint8 canvases (n, 3, C, C) with original (height, width) `sizes`.

    The two views differ in their blur and solarize probabilities (recipe.py).
    `select`: as in color_jitter (by default, the CPU's way on a CPU and the GPU's on a GPU).
    """
    images = canvas.float() / 255
    kernel = RECIPE.blur_kernel(out)
    n = len(images)

    def coin(p: float) -> torch.Tensor:
        return torch.rand(n, device=canvas.device) < p

    views = []
    for blur_p, solarize_p in RECIPE.views():
        x = crop_resize(images, sizes, crop_boxes(sizes), coin(RECIPE.flip_p), out).clamp(0, 1)
        x = color_jitter(x, coin(RECIPE.jitter_p), select=select)
        x = torch.where(coin(RECIPE.grayscale_p)[:, None, None, None], grayscale(x), x)
        if kernel and blur_p > 0:
            x = gaussian_blur(x, coin(blur_p), kernel, select=select)
        if solarize_p > 0:
            x = torch.where(coin(solarize_p)[:, None, None, None] & (x >= 0.5), 1 - x, x)
        views.append(normalize_images(x))
    return views[0], views[1]
