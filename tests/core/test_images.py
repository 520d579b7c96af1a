import numpy as np
from helpers import noise_image
from PIL import Image

from byolcli.core.images import open_rgb


def test_alpha_modes_composite_on_white(tmp_path):
    rgba = Image.new("RGBA", (20, 20), (255, 0, 0, 0))  # fully transparent red
    rgba.paste((0, 0, 255, 255), (0, 0, 10, 20))  # opaque blue left half
    rgba.save(tmp_path / "a.png")
    la = Image.new("LA", (20, 20), (0, 0))
    la.save(tmp_path / "la.png")
    rgb = np.asarray(open_rgb(tmp_path / "a.png"))
    assert rgb.shape == (20, 20, 3)
    assert tuple(rgb[0, 0]) == (0, 0, 255)
    assert tuple(rgb[0, 15]) == (255, 255, 255)
    assert (np.asarray(open_rgb(tmp_path / "la.png")) == 255).all()


def test_palette_with_transparency_becomes_white(tmp_path):
    img = Image.new("P", (20, 20), 0)
    img.putpalette([0, 0, 0, 200, 10, 10] + [0] * 762)
    img.paste(1, (0, 0, 10, 20))
    img.save(tmp_path / "p.png", transparency=0)
    rgb = np.asarray(open_rgb(tmp_path / "p.png"))
    assert tuple(rgb[5, 5]) == (200, 10, 10)
    assert tuple(rgb[5, 15]) == (255, 255, 255)


def test_sixteen_bit_is_rescaled_not_clipped(tmp_path):
    values = np.zeros((20, 20), dtype=np.uint16)
    values[:, 10:] = 65535
    values[:, :10] = 32896  # 128 * 257
    Image.fromarray(values).save(tmp_path / "deep.png")
    rgb = np.asarray(open_rgb(tmp_path / "deep.png"))
    assert tuple(rgb[0, 0]) == (128, 128, 128)
    assert tuple(rgb[0, 15]) == (255, 255, 255)


def test_one_bit_cmyk_and_gray_become_rgb(tmp_path):
    bilevel = Image.new("1", (20, 20), 0)
    bilevel.paste(1, (0, 0, 10, 20))
    bilevel.save(tmp_path / "b.png")
    rgb = np.asarray(open_rgb(tmp_path / "b.png"))
    assert tuple(rgb[0, 0]) == (255, 255, 255) and tuple(rgb[0, 15]) == (0, 0, 0)
    Image.new("CMYK", (20, 20), (0, 255, 255, 0)).save(tmp_path / "c.jpg", quality=100)
    red = np.asarray(open_rgb(tmp_path / "c.jpg")).astype(int)
    assert red[..., 0].mean() > 200 and red[..., 1].mean() < 60 and red[..., 2].mean() < 60
    noise_image(mode="L").save(tmp_path / "g.png")
    assert open_rgb(tmp_path / "g.png").mode == "RGB"


def test_exif_orientation_is_applied(tmp_path):
    img = Image.new("RGB", (40, 20), (0, 0, 0))
    img.paste((255, 255, 255), (0, 0, 20, 20))  # white left half
    exif = Image.Exif()
    exif[0x0112] = 6  # stored rotated: display turned 90 degrees clockwise
    img.save(tmp_path / "o.jpg", exif=exif, quality=100)
    upright = open_rgb(tmp_path / "o.jpg")
    assert upright.size == (20, 40)
    arr = np.asarray(upright).astype(int)
    assert arr[:15].mean() > 200 and arr[25:].mean() < 50  # white ends up on top


def test_large_jpeg_decodes_at_reduced_scale(tmp_path):
    noise_image((400, 300)).save(tmp_path / "big.jpg")
    assert open_rgb(tmp_path / "big.jpg").size == (400, 300)
    small = open_rgb(tmp_path / "big.jpg", min_side=64)
    assert small.size == (100, 75)  # 1/4 scale: both sides still >= 64
    assert open_rgb(tmp_path / "big.jpg", min_side=200).size == (400, 300)
