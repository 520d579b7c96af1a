import math

import pytest
import torch
from torchvision.transforms.v2 import functional as TF

from byolcli.core.recipe import RECIPE
from byolcli.training import augment as A


def test_crop_boxes_follow_random_resized_crop():
    torch.manual_seed(0)
    sizes = torch.tensor([[400, 533]] * 500 + [[32, 32]] * 500)
    boxes = A.crop_boxes(sizes)
    x0, y0, w, h = boxes.unbind(1)
    height, width = sizes[:, 0].float(), sizes[:, 1].float()
    assert (x0 >= 0).all() and (y0 >= 0).all() and (x0 + w <= width).all() and (y0 + h <= height).all()
    share = w * h / (width * height)
    assert share.min() > 0.06 and share.max() <= 1.0
    aspect = w / h
    assert aspect.min() > 0.7 and aspect.max() < 1.4  # 3/4 .. 4/3, up to rounding on 32-px images
    assert len(set(map(tuple, boxes.tolist()))) > 900  # drawn per image


def test_full_box_without_flip_is_the_identity_and_flip_mirrors():
    torch.manual_seed(0)
    canvas = torch.rand(2, 3, 24, 24)
    sizes = torch.tensor([[300, 200], [50, 80]])
    full = torch.tensor([[0.0, 0.0, 200.0, 300.0], [0.0, 0.0, 80.0, 50.0]])
    same = A.crop_resize(canvas, sizes, full, torch.tensor([False, False]), 24)
    assert torch.allclose(same, canvas, atol=1e-5)
    mirrored = A.crop_resize(canvas, sizes, full, torch.tensor([True, False]), 24)
    assert torch.allclose(mirrored[0], canvas[0].flip(-1), atol=1e-5) and torch.allclose(
        mirrored[1], canvas[1], atol=1e-5
    )


def test_a_box_selects_that_region_of_the_original():
    canvas = torch.zeros(1, 3, 64, 64)
    canvas[..., :, 32:] = 1.0  # right half white, on a canvas standing for a 100 x 200 (h x w) image
    sizes = torch.tensor([[100, 200]])
    right = A.crop_resize(canvas, sizes, torch.tensor([[120.0, 10.0, 60.0, 60.0]]), torch.tensor([False]), 16)
    left = A.crop_resize(canvas, sizes, torch.tensor([[10.0, 10.0, 60.0, 60.0]]), torch.tensor([False]), 16)
    assert right.mean() > 0.99 and left.mean() < 0.01


def test_hsv_round_trip_and_hue_matches_torchvision():
    torch.manual_seed(0)
    x = torch.rand(4, 3, 8, 8)
    assert torch.allclose(A.hsv_to_rgb(A.rgb_to_hsv(x)), x, atol=1e-5)
    torch.manual_seed(1)
    jittered = A.color_jitter(x, torch.ones(4, dtype=torch.bool), brightness=0, contrast=0, saturation=0, hue=0.1)
    torch.manual_seed(1)
    shifts = (
        torch.empty(4).uniform_(1, 1),
        torch.empty(4).uniform_(1, 1),
        torch.empty(4).uniform_(1, 1),
        torch.empty(4).uniform_(-0.1, 0.1),
    )
    for i in range(4):
        assert torch.allclose(jittered[i], TF.adjust_hue(x[i], shifts[3][i].item()), atol=1e-4)


def test_jitter_and_blur_leave_unselected_images_alone():
    torch.manual_seed(0)
    x = torch.rand(4, 3, 96, 96)
    apply = torch.tensor([True, False, True, False])
    jittered = A.color_jitter(x, apply)
    blurred = A.gaussian_blur(x, apply, RECIPE.blur_kernel(96))
    for out in (jittered, blurred):
        assert torch.equal(out[1], x[1]) and torch.equal(out[3], x[3])
        assert not torch.allclose(out[0], x[0])
    assert blurred[0].std() < x[0].std()  # blurring smooths noise


def test_jitter_is_the_same_whether_it_selects_the_chosen_images_or_masks_the_rest():
    torch.manual_seed(0)
    x = torch.rand(16, 3, 8, 8)
    apply = torch.rand(16) < 0.8
    torch.manual_seed(1)
    selected = A.color_jitter(x, apply, select=True)
    torch.manual_seed(1)
    masked = A.color_jitter(x, apply, select=False)
    assert torch.allclose(selected, masked, atol=1e-6)
    assert torch.equal(selected[~apply], x[~apply]) and not torch.allclose(selected[apply], x[apply])


def test_blur_is_the_same_whether_it_selects_the_chosen_images_or_masks_the_rest():
    torch.manual_seed(0)
    x = torch.rand(16, 3, 24, 24)
    apply = torch.rand(16) < 0.3
    torch.manual_seed(1)
    selected = A.gaussian_blur(x, apply, 3, select=True)
    torch.manual_seed(1)
    masked = A.gaussian_blur(x, apply, 3, select=False)
    assert torch.allclose(selected, masked, atol=1e-6)
    assert torch.equal(selected[~apply], x[~apply]) and not torch.allclose(selected[apply], x[apply])


def test_views_are_cut_without_border_padding_which_mps_lacks_yet_pad_as_it_does(monkeypatch):
    real = A.F.grid_sample

    def without_border(*args, padding_mode="zeros", **kwargs):
        if padding_mode == "border":
            raise NotImplementedError("MPS: Unsupported Border padding mode")
        return real(*args, padding_mode=padding_mode, **kwargs)

    monkeypatch.setattr(A.F, "grid_sample", without_border)
    torch.manual_seed(0)
    canvas = torch.rand(4, 3, 48, 48)
    sizes = torch.tensor([[30, 60], [60, 30], [48, 48], [100, 70]])
    whole = torch.stack([torch.zeros(4), torch.zeros(4), sizes[:, 1].float(), sizes[:, 0].float()], 1)
    flip = torch.tensor([True, False, True, False])
    mirrored = torch.where(flip[:, None, None, None], canvas.flip(-1), canvas)
    for out in (24, 48, 64):  # upsampling reads past the outermost pixel centres: border padding's case
        expected = torch.nn.functional.interpolate(mirrored, size=out, mode="bilinear", align_corners=False)
        assert (A.crop_resize(canvas, sizes, whole, flip, out) - expected).abs().max() < 1e-5
    A.byol_views((canvas * 255).to(torch.uint8), sizes, 32)  # and the whole augmentation runs


def test_views_are_drawn_per_image_and_normalised():
    torch.manual_seed(0)
    canvas = (torch.rand(1, 3, 48, 48) * 255).to(torch.uint8).expand(8, -1, -1, -1)
    sizes = torch.tensor([[300, 400]] * 8)
    view1, view2 = A.byol_views(canvas, sizes, 96)
    assert view1.shape == view2.shape == (8, 3, 96, 96)
    assert len({tuple(v.flatten()[:50].tolist()) for v in view1}) == 8
    assert not torch.allclose(view1, view2)
    assert math.isfinite(view1.sum().item()) and -3 < view1.mean().item() < 3


def test_both_augmentation_paths_read_one_recipe(monkeypatch):
    import dataclasses

    from torchvision.transforms import v2

    from byolcli.core import views

    with pytest.raises(dataclasses.FrozenInstanceError):
        RECIPE.blur_p = (0.5, 0.5)
    view = views.byol_view(96, *RECIPE.views()[0])
    jitter = next(t for t in view.transforms if isinstance(t, v2.RandomApply)).transforms[0]
    assert jitter.brightness == (1 - RECIPE.brightness, 1 + RECIPE.brightness)
    blur = next(
        t for t in view.transforms if isinstance(t, v2.RandomApply) and isinstance(t.transforms[0], v2.GaussianBlur)
    ).transforms[0]
    assert list(blur.kernel_size) == [RECIPE.blur_kernel(96)] * 2
    # The batched path asks the same recipe for its kernel and its view probabilities.
    seen = []
    monkeypatch.setattr(A, "gaussian_blur", lambda x, apply, kernel, **k: seen.append(kernel) or x)
    A.byol_views(torch.randint(0, 256, (4, 3, 144, 144), dtype=torch.uint8), torch.full((4, 2), 144), 96)
    assert seen == [RECIPE.blur_kernel(96)] * 2
