import pytest
import torch
import torchvision
from torch import nn

from byolcli.core.backbones import make_backbone
from byolcli.core.small_maps import SmallMapConv2d, dense_layout

# (channels in, channels out, map height, map width, kernel, stride, padding, bias)
SMALL_MAPS = [
    (8, 6, 1, 1, 3, 1, 1, False),  # ResNet layer4 at 32 px: only the centre tap meets data
    (8, 6, 2, 2, 3, 1, 1, False),  # layer3 at 32 px: every tap is used
    (8, 6, 2, 2, 3, 2, 1, True),  # layer4's first convolution: 2×2 to 1×1
    (5, 7, 1, 2, 3, 1, 1, True),  # not square
]


def no_convolution_kernel(self, *args):
    raise AssertionError("the convolution kernel ran: the matrix-product path was not taken")


@pytest.mark.parametrize("memory_format", [torch.contiguous_format, torch.channels_last])
@pytest.mark.parametrize("c_in,c_out,h,w,k,stride,pad,bias", SMALL_MAPS)
def test_small_map_convolution_equals_the_convolution_with_the_same_gradients(
    monkeypatch, memory_format, c_in, c_out, h, w, k, stride, pad, bias
):
    torch.manual_seed(0)
    reference = nn.Conv2d(c_in, c_out, k, stride, pad, bias=bias).double()
    small = SmallMapConv2d(c_in, c_out, k, stride, pad, bias=bias).double()
    small.load_state_dict(reference.state_dict())
    small.to(memory_format=memory_format)  # training makes weights channels-last too
    x = torch.randn(4, c_in, h, w, dtype=torch.double).contiguous(memory_format=memory_format)
    x_ref, x_small = x.clone().requires_grad_(), x.clone().requires_grad_()
    expected = reference(x_ref)
    upstream = torch.randn_like(expected)
    expected.backward(upstream)

    monkeypatch.setattr(nn.Conv2d, "_conv_forward", no_convolution_kernel)
    got = small(x_small)
    got.backward(upstream)

    torch.testing.assert_close(got, expected)
    torch.testing.assert_close(x_small.grad, x_ref.grad)
    torch.testing.assert_close(small.weight.grad, reference.weight.grad)
    if bias:
        torch.testing.assert_close(small.bias.grad, reference.bias.grad)


def test_maps_that_some_output_pixel_cannot_see_whole_keep_the_convolution():
    assert dense_layout(4, 4, (3, 3), (1, 1), (1, 1)) is None  # layer2 at 32 px
    assert dense_layout(3, 3, (3, 3), (1, 1), (1, 1)) is None
    assert dense_layout(2, 2, (1, 1), (2, 2), (0, 0)) is None  # the 1×1 stride-2 shortcut reads one pixel
    assert dense_layout(2, 2, (3, 3), (1, 1), (1, 1)) is not None


def test_a_backbone_at_32px_computes_what_stock_torchvision_does():
    torch.manual_seed(0)
    ours = make_backbone("resnet18").double()
    stock = torchvision.models.resnet18().double()
    stock.fc = nn.Identity()
    stock.load_state_dict(ours.state_dict())  # same names, same shapes
    assert any(isinstance(m, SmallMapConv2d) for m in ours.modules())
    images = torch.randn(4, 3, 32, 32, dtype=torch.double)
    for training in (True, False):
        ours.train(training)
        stock.train(training)
        torch.testing.assert_close(ours(images), stock(images))


@pytest.mark.parametrize("h,w,stride", [(1, 1, 1), (2, 2, 1), (2, 2, 2)])
def test_the_weight_gradient_comes_in_the_channels_last_layout_training_gives_the_weight(h, w, stride):
    # Another layout would cost a full-size copy of it per step (benchmarks/small_maps.py).
    small = SmallMapConv2d(8, 6, 3, stride, 1, bias=False).to(memory_format=torch.channels_last)
    x = torch.randn(4, 8, h, w).contiguous(memory_format=torch.channels_last)
    y = small(x)
    (grad,) = torch.autograd.grad(y, small.weight, torch.randn_like(y))
    assert grad.stride() == small.weight.stride()
