"""Taking the encoder elsewhere: ONNX export, --model imagenet, plain torchvision state dicts, HEIC photos."""

import builtins
import json

import numpy as np
import pytest
import torch
import torchvision
from helpers import SHARED_DATA, cache_imagenet_weights, embed_on_cpu, noise_image, run_byol, shapes_folder
from safetensors.torch import save_file

from byolcli.core import embed as e
from byolcli.core.backbones import make_backbone
from byolcli.core.encoder import save_encoder
from byolcli.core.errors import UserError
from byolcli.core.inference import load_for_embedding
from byolcli.core.pixels import MEAN, STD, normalize_images
from byolcli.core.terminal import Reporter

onnx = pytest.importorskip("onnx")
onnxruntime = pytest.importorskip("onnxruntime")


def trained_like_encoder(path, size, seed=0):
    """An encoder file whose batch-norm statistics are not the initial ones, as after training."""
    torch.manual_seed(seed)
    model = make_backbone("resnet18")
    for module in model.modules():
        if isinstance(module, torch.nn.BatchNorm2d):
            module.running_mean.uniform_(-0.5, 0.5)
            module.running_var.uniform_(0.5, 2.0)
            module.weight.data.uniform_(0.5, 1.5)
    save_encoder(
        model,
        path,
        architecture="resnet18",
        image_size=size,
        mean=MEAN,
        std=STD,
        train_images=1,
        epochs=1,
        steps=1,
        source="test",
    )
    return path


def embed_rows(folder, out, model, **flags):
    return embed_on_cpu(folder, out, model, batch_size=8, **flags)


def onnx_rows(model_file, folder, names, size):
    session = onnxruntime.InferenceSession(str(model_file), providers=["CPUExecutionProvider"])
    images = np.stack([load_for_embedding(folder / name, size).numpy() for name in names])
    return session.run(None, {"images": images})[0]


@pytest.mark.parametrize("size", [32, 64])
def test_onnx_export_of_raw_images_matches_byol_embed(tmp_path, size):
    folder = shapes_folder(tmp_path / "photos", count=16, size=48)
    noise_image((90, 60), seed=3).save(folder / "wide.jpg")  # resized and cropped on the way in
    encoder = trained_like_encoder(tmp_path / "encoder.safetensors", size)
    rows, names = embed_rows(folder, tmp_path / "vecs.npy", encoder)

    result = run_byol("export", encoder, "--onnx", tmp_path / "model.onnx", "--batch", "dynamic")
    assert result.returncode == 0, result.stderr
    model = onnx.load(tmp_path / "model.onnx")
    onnx.checker.check_model(model, full_check=True)
    props = {p.key: p.value for p in model.metadata_props}
    assert props["image_size"] == str(size) and props["architecture"] == "resnet18" and props["batch"] == "dynamic"
    assert props["input"].startswith(f"images: uint8 RGB, shape (batch, 3, {size}, {size})")
    got = onnx_rows(tmp_path / "model.onnx", folder, names, size)
    assert got.dtype == np.float32 and got.shape == rows.shape == (17, 512)
    np.testing.assert_allclose(got, rows, atol=1e-4, rtol=0)


def test_fp16_export_stays_within_its_stated_bound_and_a_fixed_batch_is_fixed(tmp_path):
    folder = shapes_folder(tmp_path / "photos", count=4)
    encoder = trained_like_encoder(tmp_path / "encoder.safetensors", 32)
    rows, names = embed_rows(folder, tmp_path / "vecs.npy", encoder)
    result = run_byol("export", encoder, "--onnx", tmp_path / "half.onnx", "--fp16", "--batch", "4")
    assert result.returncode == 0, result.stderr
    got = onnx_rows(tmp_path / "half.onnx", folder, names, 32)
    assert np.abs(got - rows).max() <= 1e-2 * np.abs(rows).max()  # the bound export.py states for fp16
    cosine = (got * rows).sum(1) / np.linalg.norm(got, axis=1) / np.linalg.norm(rows, axis=1)
    assert cosine.min() > 0.9999
    session = onnxruntime.InferenceSession(str(tmp_path / "half.onnx"), providers=["CPUExecutionProvider"])
    assert session.get_inputs()[0].shape == [4, 3, 32, 32]
    assert (tmp_path / "half.onnx").stat().st_size < 0.6 * 4 * 11.2e6  # half of ResNet-18's fp32 weights


def test_export_refuses_bad_flags_and_names_the_missing_extra(tmp_path, monkeypatch):
    from byolcli.core.export import export_onnx

    encoder = trained_like_encoder(tmp_path / "encoder.safetensors", 32)
    for args, message in (
        ((encoder, tmp_path / "m.onnx", "many", False), "--batch 'many'"),
        ((encoder, tmp_path / "m.txt", "1", False), "must end in .onnx"),
        ((tmp_path / "gone.safetensors", tmp_path / "m.onnx", "1", False), "no such model file"),
    ):
        with pytest.raises(UserError, match=message):
            export_onnx(*args, Reporter(quiet=True))
    real_import = builtins.__import__

    def without_onnxruntime(name, *args, **kwargs):
        if name == "onnxruntime":
            raise ImportError("No module named 'onnxruntime'", name=name)
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", without_onnxruntime)
    with pytest.raises(UserError, match=r'onnxruntime is missing\): pip install "byolcli\[onnx\]"'):
        export_onnx(encoder, tmp_path / "m.onnx", "1", False, Reporter(quiet=True))
    assert not (tmp_path / "m.onnx").exists()


# --- models that are not byolcli encoders ------------------------------------------------------


def test_embed_and_evaluate_with_torchvisions_imagenet_weights(tmp_path, monkeypatch):
    folder = shapes_folder(tmp_path / "photos", count=10)
    weights = cache_imagenet_weights(tmp_path / "torch", seed=1)
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))
    rows, names = embed_rows(folder, tmp_path / "vecs.npy", "imagenet", image_size=32)
    reference = make_backbone("resnet18")
    reference.load_state_dict(weights)
    images = torch.stack([load_for_embedding(folder / n, 32) for n in names])
    with torch.no_grad():
        expected = reference.eval()(normalize_images(images, MEAN, STD))
    np.testing.assert_allclose(rows, expected.numpy(), atol=1e-4)
    meta = json.loads(e.sidecars(tmp_path / "vecs.npy")["meta"].read_text())
    assert (meta["model"], meta["image_size"], meta["architecture"]) == ("imagenet:resnet18", 32, "resnet18")

    csv = tmp_path / "labels.csv"
    csv.write_text("path,label\n" + "".join(f"photos/{n},{'ab'[i % 2]}\n" for i, n in enumerate(names)))
    env = {"TORCH_HOME": str(tmp_path / "torch")}
    result = run_byol(
        "evaluate",
        "--labels",
        csv,
        "--model",
        "imagenet",
        "--image-size",
        "32",
        "--json",
        tmp_path / "r.json",
        env_extra=env,
    )
    assert result.returncode == 0, result.stderr
    report = json.loads((tmp_path / "r.json").read_text())
    assert set(report["results"]) == {"encoder", "random init"}
    assert "ImageNet resnet18 (32 px)" in report["sources"]["encoder"]
    # As a user would: `byol embed` then `byol evaluate --embeddings`, each in the precision it picks.
    vectors = tmp_path / "user.npy"
    embedded = run_byol("embed", folder, "--out", vectors, "--model", "imagenet", "--image-size", "32", env_extra=env)
    assert embedded.returncode == 0, embedded.stderr
    embedded = run_byol(
        "evaluate", "--labels", csv, "--embeddings", vectors, "--json", tmp_path / "e.json", env_extra=env
    )
    assert embedded.returncode == 0, embedded.stderr
    assert json.loads((tmp_path / "e.json").read_text())["results"]["embeddings"] == report["results"]["encoder"]


def test_a_plain_torchvision_state_dict_embeds_with_arch_and_image_size(tmp_path):
    folder = shapes_folder(tmp_path / "photos", count=6)
    torch.manual_seed(3)
    stock = torchvision.models.resnet18()
    plain = tmp_path / "plain.safetensors"
    save_file(stock.state_dict(), plain)  # fc included, as torchvision saves it
    rows, names = embed_rows(folder, tmp_path / "vecs.npy", plain, arch="resnet18", image_size=64)
    stock.fc = torch.nn.Identity()
    images = torch.stack([load_for_embedding(folder / n, 64) for n in names])
    with torch.no_grad():
        expected = stock.eval()(normalize_images(images, MEAN, STD))
    np.testing.assert_allclose(rows, expected.numpy(), atol=1e-4)

    refused = run_byol("embed", folder, "--out", tmp_path / "x.npy", "--model", plain)
    assert refused.returncode == 2 and len(refused.stderr.strip().splitlines()) == 1, refused.stderr
    assert f"{plain}: a plain state dict without byolcli metadata; add --arch and --image-size" in refused.stderr
    for flags, message in (
        ({"image_size": 64}, "add --arch to say what it is"),
        ({"arch": "resnet50", "image_size": 64}, "weights do not match a resnet50"),
    ):
        with pytest.raises(UserError, match=message):
            embed_rows(folder, tmp_path / "x.npy", plain, **flags)
    assert not (tmp_path / "x.npy").exists()


# --- HEIC ---------------------------------------------------------------------------------------


def test_a_real_heic_photo_goes_through_scan_train_and_embed_upright(tmp_path):
    pillow_heif = pytest.importorskip("pillow_heif")
    from PIL import Image

    from byolcli.core.images import open_rgb

    folder = shapes_folder(tmp_path / "photos", count=16)
    # Stored as 64×32 (red left half, blue right) with EXIF orientation 6: shown rotated 90° clockwise,
    # 32×64 with red on top.
    stored = Image.new("RGB", (64, 32), (220, 20, 20))
    stored.paste((20, 20, 220), (32, 0, 64, 32))
    exif = stored.getexif()
    exif[0x0112] = 6
    pillow_heif.register_heif_opener()
    stored.save(folder / "phone.heic", quality=95, exif=exif.tobytes())
    upright = np.asarray(open_rgb(folder / "phone.heic")).astype(int)
    assert upright.shape == (64, 32, 3)
    assert upright[:24, :, 0].mean() > 150 > upright[40:, :, 0].mean()  # red above, blue below

    scanned = run_byol("scan", folder)
    assert scanned.returncode == 0 and "HEIF" in scanned.stdout, scanned.stdout
    trained = run_byol(
        "train",
        folder,
        "--epochs",
        "1",
        "--image-size",
        "32",
        "--batch-size",
        "8",
        "--workers",
        "0",
        "--precision",
        "fp32",
        "--out",
        tmp_path / "run",
    )
    assert trained.returncode == 0, trained.stderr
    assert "phone.heic" in (tmp_path / "run" / "images.txt").read_text()
    rows, names = embed_rows(folder, tmp_path / "vecs.npy", tmp_path / "run" / "encoder.safetensors")
    assert "phone.heic" in names and len(names) == 17


@pytest.mark.skipif(not (SHARED_DATA / "cifar10-5k").is_dir(), reason="needs ../shared/data")
def test_onnx_rows_equal_byol_embed_on_real_photos(tmp_path):
    source = SHARED_DATA / "cifar10-5k" / "test"
    folder = tmp_path / "photos"
    folder.mkdir()
    for image in sorted(p for p in source.rglob("*.jpg"))[:16]:
        (folder / image.name).symlink_to(image)
    encoder = trained_like_encoder(tmp_path / "encoder.safetensors", 32)
    rows, names = embed_rows(folder, tmp_path / "vecs.npy", encoder)
    assert run_byol("export", encoder, "--onnx", tmp_path / "m.onnx", "--batch", "16").returncode == 0
    np.testing.assert_allclose(onnx_rows(tmp_path / "m.onnx", folder, names, 32), rows, atol=1e-4, rtol=0)
