"""Convolutions over feature maps of a pixel or two, computed as one matrix product.

At 32 px a ResNet's last stages see 2×2 and 1×1 maps: layer3's 3×3 convolutions run on
2×2, layer4's on 1×1, where eight of a 3×3 kernel's nine taps only meet padding. CPU
convolution kernels are built for large maps and run these slower than the matrix product
that is the same linear map (benchmarks/small_maps.py). When every output pixel sees every
input pixel, the convolution is y = x·Mᵀ, with x the flattened map and M the kernel taps laid
out per (output pixel, input pixel) pair; the weight gets the convolution's gradient, in its
own layout (zero for taps that only meet padding).

Only on CPU: GPU convolution libraries have not been measured against it.
"""

from __future__ import annotations

from functools import cache
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

# (rows, cols, taps, out_height, out_width): see dense_layout
Layout = tuple[slice, slice, torch.Tensor, int, int]


@cache
def dense_layout(
    height: int, width: int, kernel: tuple[int, int], stride: tuple[int, int], padding: tuple[int, int]
) -> Layout | None:
    """How a convolution over a height×width map reads its kernel, if every output pixel
    sees every input pixel; else None.

    Returns (rows, cols, taps, out_height, out_width): the kernel window that is used
    (rows, cols as slices) and, for each (output pixel, input pixel) pair in that order,
    the index of its tap within the window.
    """
    out_h = (height + 2 * padding[0] - kernel[0]) // stride[0] + 1
    out_w = (width + 2 * padding[1] - kernel[1]) // stride[1] + 1
    pairs = []
    for i in range(out_h):
        for j in range(out_w):
            for p in range(height):
                for q in range(width):
                    a, b = p - i * stride[0] + padding[0], q - j * stride[1] + padding[1]
                    if not (0 <= a < kernel[0] and 0 <= b < kernel[1]):
                        return None
                    pairs.append((a, b))
    a0, b0 = min(a for a, _ in pairs), min(b for _, b in pairs)
    window_w = max(b for _, b in pairs) - b0 + 1
    taps = torch.tensor([(a - a0) * window_w + (b - b0) for a, b in pairs])
    rows = slice(a0, max(a for a, _ in pairs) + 1)
    return rows, slice(b0, b0 + window_w), taps, out_h, out_w


class _KernelAsMatrix(torch.autograd.Function):
    """The kernel's used taps laid out as the matrix M of y = x·Mᵀ: rows (output pixel,
    out channel), columns (input pixel, in channel).

    Written out rather than left to autograd through slicing and gathering, whose backward
    built the weight's gradient in another memory layout than the channels-last one the weight
    has in training, zero-filled at full size, and then copied it over: layer4's convolutions
    at 32 px ran markedly slower that way (benchmarks/small_maps.py).
    """

    @staticmethod
    def forward(ctx: Any, weight: torch.Tensor, layout: Layout) -> torch.Tensor:
        rows, cols, taps, out_h, out_w = layout
        o, c = weight.shape[:2]
        window = weight[:, :, rows, cols].permute(0, 2, 3, 1)  # (o, window rows, window cols, c)
        ctx.layout, ctx.window_shape, ctx.kernel_size = layout, window.shape, weight.shape[2:]
        pairs = window.reshape(o, -1, c).index_select(1, taps)  # (o, output pixel × input pixel, c)
        return pairs.view(o, out_h * out_w, -1, c).transpose(0, 1).reshape(out_h * out_w * o, -1)

    @staticmethod
    def backward(ctx: Any, grad_matrix: torch.Tensor) -> tuple[torch.Tensor, None]:
        rows, cols, taps, out_h, out_w = ctx.layout
        o, window_h, window_w, c = ctx.window_shape
        pairs = grad_matrix.view(out_h * out_w, o, -1, c).transpose(0, 1).reshape(o, -1, c)
        window = pairs.new_zeros(o, window_h * window_w, c).index_add_(1, taps, pairs)
        grad = window.view(o, window_h, window_w, c)
        if grad.shape[1:3] != ctx.kernel_size:  # taps that only meet padding get zero
            grad, window = pairs.new_zeros(o, *ctx.kernel_size, c), grad
            grad[:, rows, cols] = window
        # (o, c, kh, kw) with channels-last strides, the weight's layout in training: it
        # becomes .grad as it is.
        return grad.permute(0, 3, 1, 2), None


class SmallMapConv2d(nn.Conv2d):
    """nn.Conv2d, same parameters and state-dict names, that runs as a matrix product on
    CPU when the input map is small enough for every output pixel to see all of it."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        layout = None
        if (
            x.device.type == "cpu"
            and self.groups == 1
            and self.dilation == (1, 1)
            and self.padding_mode == "zeros"
            and not isinstance(self.padding, str)
        ):
            layout = dense_layout(x.shape[2], x.shape[3], self.kernel_size, self.stride, self.padding)
        if layout is None:
            return super().forward(x)
        n, c, h, w = x.shape
        out_h, out_w = layout[3:]
        matrix = _KernelAsMatrix.apply(self.weight, layout)
        bias = None if self.bias is None else self.bias.repeat(out_h * out_w)
        # (n, h, w, c) order: free for channels-last input, and the output comes back channels-last.
        y = F.linear(x.permute(0, 2, 3, 1).reshape(n, h * w * c), matrix, bias)
        return y.view(n, out_h, out_w, self.out_channels).permute(0, 3, 1, 2)


def use_small_map_convolutions(model: nn.Module) -> nn.Module:
    """Let every plain nn.Conv2d in `model` take the matrix-product path (in place)."""
    for module in model.modules():
        if type(module) is nn.Conv2d:
            module.__class__ = SmallMapConv2d
    return model
