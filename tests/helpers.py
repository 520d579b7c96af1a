"""What the tests share: running the CLI, making images and plans, waiting on a process."""

import os
import struct
import subprocess
import sys
import time
import traceback
import zlib
from pathlib import Path

import numpy as np
from PIL import Image

REPO = Path(__file__).resolve().parents[1]
SHARED_DATA = REPO.parent / "shared" / "data"


# A training small enough for a test: 32 px, batch 8, in this process's threads, fp32 on any CPU.
TRAIN_ARGS = ("--image-size", "32", "--batch-size", "8", "--workers", "0", "--precision", "fp32")


def run_byol(*args, cwd=None, env_extra=None, umask=None):
    """`byol ARGS` in this process, as a subprocess would see it: exit code, stdout, stderr (with the
    traceback of an unexpected exception). Torch is imported once for the session instead of once per
    call, which is most of a small command's time. `run_byol_process` is for what needs a process."""
    import torch
    from typer.testing import CliRunner

    from byolcli.cli import app

    here, threads = Path.cwd(), torch.get_num_threads()
    previous_umask = None if umask is None else os.umask(umask)
    try:
        os.chdir(cwd or here)
        result = CliRunner().invoke(app, [str(a) for a in args], env=env_extra)
    finally:
        os.chdir(here)
        torch.set_num_threads(threads)
        if previous_umask is not None:
            os.umask(previous_umask)
    stderr = result.stderr
    if result.exception is not None and not isinstance(result.exception, SystemExit):
        stderr += "".join(traceback.format_exception(*result.exc_info))
    return subprocess.CompletedProcess(args, result.exit_code, result.stdout, stderr)


def run_byol_process(*args, cwd=None, env_extra=None, timeout=600):
    """`byol ARGS` in its own process: where the process itself matters (how it encodes names it prints)."""
    return subprocess.run(
        [sys.executable, "-m", "byolcli", *map(str, args)],
        cwd=cwd,
        env=dict(os.environ, **(env_extra or {})),
        capture_output=True,
        text=True,
        timeout=timeout,
    )


def start_training(folder, cwd, epochs=40):
    """`byol -q train` in the background, checkpointing as often as it can: for tests that stop it."""
    command = [sys.executable, "-m", "byolcli", "-q", "train", folder, "--epochs", str(epochs), *TRAIN_ARGS]
    command += ["--checkpoint-every", "0.01", "--init", "random"]  # its own process: no download to try
    return subprocess.Popen(command, cwd=cwd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def noise_image(size=(40, 32), seed=0, mode="RGB"):
    rng = np.random.default_rng(seed)
    channels = {"RGB": 3, "L": 1}[mode]
    pixels = rng.integers(0, 256, (size[1], size[0], channels), dtype=np.uint8)
    return Image.fromarray(pixels.squeeze(-1) if channels == 1 else pixels, mode)


def bomb_png(path: Path, width=20000, height=20000):
    """A tiny PNG whose header claims more pixels than Pillow's safety limit."""
    small = path.with_suffix(".tmp.png")
    Image.new("L", (16, 16)).save(small)
    data = bytearray(small.read_bytes())
    small.unlink()
    ihdr = data.index(b"IHDR")
    data[ihdr + 4 : ihdr + 12] = struct.pack(">II", width, height)
    crc = zlib.crc32(bytes(data[ihdr : ihdr + 17])) & 0xFFFFFFFF
    data[ihdr + 17 : ihdr + 21] = struct.pack(">I", crc)
    path.write_bytes(bytes(data))


def good_images(folder: Path) -> dict[str, str]:
    """One good image per mode and format; returns relative path -> expected format."""
    folder.mkdir(parents=True, exist_ok=True)
    expected = {}

    def save(rel, img, fmt, **kw):
        target = folder / rel
        target.parent.mkdir(parents=True, exist_ok=True)
        img.save(target, fmt, **kw)
        expected[rel] = fmt

    rgb = noise_image()
    save("rgb.jpg", rgb, "JPEG")
    save("UPPER.JPG", rgb, "JPEG")
    save("nested/deeper/rgb.png", rgb, "PNG")
    save("rgb.webp", rgb, "WEBP")
    save("rgb.bmp", rgb, "BMP")
    save("rgb.tiff", rgb, "TIFF")
    save("rgb.tif", rgb, "TIFF")
    save("gray_l.png", noise_image(mode="L"), "PNG")
    la = Image.merge("LA", [noise_image(mode="L"), Image.new("L", (40, 32), 128)])
    save("gray_alpha_la.png", la, "PNG")
    palette = rgb.convert("P", palette=Image.Palette.ADAPTIVE, colors=16)
    palette.info["transparency"] = 0
    save("palette_transparent.png", palette, "PNG", transparency=0)
    save("palette.gif", rgb.convert("P"), "GIF")
    rgba = rgb.convert("RGBA")
    rgba.putalpha(200)
    save("rgba.png", rgba, "PNG")
    save("cmyk.jpg", rgb.convert("CMYK"), "JPEG")
    save("deep_i16.png", Image.fromarray(np.full((32, 40), 40000, dtype=np.uint16)), "PNG")
    save("bilevel_1bit.png", rgb.convert("1"), "PNG")
    return expected


def broken_files(folder: Path) -> dict[str, str]:
    """One broken file of each kind; returns relative path -> expected reason key."""
    from byolcli.core import scan as s

    folder.mkdir(parents=True, exist_ok=True)
    (folder / "empty.jpg").write_bytes(b"")
    (folder / "notes.png").write_text("this is not a picture\n" * 20)
    jpeg = folder / "whole.tmp"
    noise_image((200, 150)).save(jpeg, "JPEG", quality=95)
    data = jpeg.read_bytes()
    jpeg.unlink()
    (folder / "cut_short.jpg").write_bytes(data[: len(data) // 2])
    bomb_png(folder / "bomb.png")
    noise_image((10, 8)).save(folder / "tiny.png")
    noise_image().save(folder / "locked.jpg")
    return {
        "empty.jpg": s.ZERO_BYTES,
        "notes.png": s.NOT_AN_IMAGE,
        "cut_short.jpg": s.UNDECODABLE,
        "bomb.png": s.TOO_MANY_PIXELS,
        "tiny.png": s.TOO_SMALL,
        "locked.jpg": s.NO_PERMISSION,
    }


def litter(folder: Path) -> None:
    """Files a scan must never pick up."""
    (folder / ".DS_Store").write_bytes(b"\x00\x00\x00\x01Bud1")
    (folder / "Thumbs.db").write_bytes(b"\xd0\xcf\x11\xe0")
    (folder / "__MACOSX").mkdir(exist_ok=True)
    noise_image().save(folder / "__MACOSX" / "._rgb.jpg", "JPEG")
    (folder / ".hidden").mkdir(exist_ok=True)
    noise_image().save(folder / ".hidden" / "secret.jpg", "JPEG")
    noise_image().save(folder / ".dotfile.jpg", "JPEG")
    (folder / "readme.txt").write_text("not an image")


def deny_read(monkeypatch, name: str) -> None:
    """Make opening `name` fail as an unreadable file would (tests run as root in CI,
    where chmod 000 does not stop reads)."""
    from byolcli.core import scan as s

    real_open = s.Image.open

    def guarded(fp, *args, **kwargs):
        if str(fp).endswith(name):
            raise PermissionError(13, "Permission denied", str(fp))
        return real_open(fp, *args, **kwargs)

    monkeypatch.setattr(s.Image, "open", guarded)


def shapes_folder(folder: Path, count: int = 32, size: int = 32) -> Path:
    """Small images with structure (a coloured rectangle and disc on a gradient)."""
    from PIL import ImageDraw

    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(1)
    for i in range(count):
        ramp = np.linspace(0, 255, size, dtype=np.uint8)
        base = np.stack([np.tile(ramp, (size, 1))] * 3, axis=-1)
        img = Image.fromarray(np.roll(base, int(rng.integers(size)), axis=1))
        draw = ImageDraw.Draw(img)
        x, y = rng.integers(0, size // 2, 2)
        draw.rectangle([x, y, x + size // 3, y + size // 4], fill=tuple(int(c) for c in rng.integers(0, 256, 3)))
        cx, cy = rng.integers(size // 4, 3 * size // 4, 2)
        draw.ellipse([cx - 5, cy - 5, cx + 5, cy + 5], fill=tuple(int(c) for c in rng.integers(0, 256, 3)))
        img.save(folder / f"{i:03d}.png")
    return folder


def tiny_plan(images: int, **changes):
    """A Plan for a few fast steps on tiny images, as make_plan would write it."""
    from byolcli.training.plan import Plan

    values = dict(
        device="cpu",
        device_name="CPU",
        backbone="resnet18",
        image_size=32,
        batch_size=8,
        accumulation=1,
        precision="fp32",
        workers=0,
        channels_last=False,
        images=images,
        skipped=0,
        steps_per_epoch=images // 8,
        total_steps=40,
        epochs=40 / (images // 8),
        warmup_steps=4,
        base_lr=0.45,
        lr=0.45 * 8 / 256,
        tau_base=0.97,
        weight_decay=1.5e-6,
        seed=0,
        step_seconds=0.1,
        time_budget=None,
    )
    values.update(changes)
    return Plan(**values)


class LockHolder:
    """A process of its own holding byolcli's lock `lock_file`, as another byol command would, from the
    start of the `with` block until `release()` or the block's end; `pid` names it."""

    def __init__(self, lock_file: Path) -> None:
        self.lock_file = lock_file

    def __enter__(self) -> "LockHolder":
        code = (
            "import sys; from pathlib import Path; from byolcli.core.locks import exclusive\n"
            f"with exclusive(Path({str(self.lock_file)!r}), 'x'):\n"
            " print('held', flush=True); sys.stdin.read()"
        )
        self.process = subprocess.Popen(
            [sys.executable, "-c", code], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True
        )
        assert self.process.stdout.readline() == "held\n"
        self.pid = self.process.pid
        return self

    def release(self) -> int:
        """Let the lock go, as the process ends normally; its exit code."""
        self.process.stdin.close()
        return self.process.wait()

    def __exit__(self, *exc) -> None:
        self.process.kill()
        self.process.wait()
        for pipe in (self.process.stdin, self.process.stdout):
            pipe.close()


def wait_for_file(process, path: Path, timeout: float = 120) -> None:
    """Until `path` exists, while `process` is alive (polled every 50 ms; fails after `timeout` s)."""
    wait_until(process, path.exists, f"{path.name} did not appear", timeout)


def wait_until(process, condition, failure: str, timeout: float = 120) -> None:
    """Until `condition()`, while `process` is alive (polled every 50 ms; fails after `timeout` s)."""
    deadline = time.monotonic() + timeout
    while not condition():
        assert process.poll() is None, process.communicate()
        assert time.monotonic() < deadline, failure
        time.sleep(0.05)


def cache_imagenet_weights(torch_home: Path, seed: int = 1) -> dict:
    """Stand-in for torchvision's ResNet-18 ImageNet file, where torch looks before downloading
    (this machine is offline). Returns the backbone weights (without fc) it holds."""
    import torch
    import torchvision

    torch.manual_seed(seed)
    state = torchvision.models.resnet18().state_dict()
    url = torchvision.models.ResNet18_Weights.DEFAULT.url
    (torch_home / "hub" / "checkpoints").mkdir(parents=True, exist_ok=True)
    torch.save(state, torch_home / "hub" / "checkpoints" / url.rsplit("/", 1)[-1])
    return {k: v for k, v in state.items() if not k.startswith("fc.")}


def random_encoder_file(path: Path, seed: int = 0, size: int = 32) -> Path:
    """An encoder file holding an untrained ResNet-18, as `byol train` exports one."""
    import torch

    from byolcli.core.backbones import make_backbone
    from byolcli.core.encoder import save_encoder
    from byolcli.core.pixels import MEAN, STD

    torch.manual_seed(seed)
    save_encoder(
        make_backbone("resnet18"),
        path,
        architecture="resnet18",
        image_size=size,
        mean=MEAN,
        std=STD,
        train_images=10,
        epochs=1,
        steps=1,
        source="test",
    )
    return path


def embed_on_cpu(folder, out, model, **flags):
    """`byol embed` through the Python API, quietly, on this process's CPU threads in fp32 unless
    `flags` say otherwise: (vectors, the names of their rows)."""
    import numpy as np

    from byolcli.core import embed as e
    from byolcli.core.names import read_names
    from byolcli.core.terminal import Reporter

    settings = {"workers": 0, "device": "cpu", "precision": "fp32", **flags}
    e.embed_command(folder, out, reporter=Reporter(quiet=True), model=model, **settings)
    return np.load(out), read_names(e.sidecars(out)["paths"].read_text(encoding="utf-8"))
