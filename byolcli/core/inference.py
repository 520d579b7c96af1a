"""Running an encoder over image files: each image decoded, resized on its short side and
centre-cropped as the encoder expects, batched on the best device in the fastest precision it
computes natively. `byol embed`, `byol evaluate` and the label-free report all embed through here."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from torch.utils.data import DataLoader, Dataset

from byolcli.core.encoder import metadata_of
from byolcli.core.images import open_rgb
from byolcli.core.pixels import normalize_images


def load_for_embedding(path: str | Path, size: int) -> torch.Tensor:
    """Decode, resize the short side to `size` and centre-crop, all in PIL's C code: uint8 (3, size, size).

    JPEGs are decoded at reduced scale first (images.open_rgb), so a large photo
    costs little more than a small one.
    """
    image = open_rgb(path, min_side=size)
    width, height = image.size
    scale = size / min(width, height)
    resized = image.resize(
        (max(size, round(width * scale)), max(size, round(height * scale))), Image.Resampling.BILINEAR
    )
    left, top = (resized.width - size) // 2, (resized.height - size) // 2
    pixels = np.asarray(resized.crop((left, top, left + size, top + size)))
    return torch.from_numpy(pixels.copy()).permute(2, 0, 1)


class ImageDataset(Dataset[tuple[torch.Tensor, bool]]):
    """Item i: (uint8 image, True) or, if the file broke since the scan, (zeros, False)."""

    def __init__(self, paths: list[Path], size: int) -> None:
        self.paths = [str(p) for p in paths]
        self.size = size

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, bool]:
        try:
            return load_for_embedding(self.paths[index], self.size), True
        except Exception:  # noqa: BLE001 - reported as a skipped file by the caller
            return torch.zeros(3, self.size, self.size, dtype=torch.uint8), False


def pick_device(device: str | None) -> torch.device:
    from byolcli.core.hardware import detect_hardware

    return torch.device(detect_hardware(device).device)


def autocast_dtype(device: torch.device, precision: str | None) -> torch.dtype | None:
    """`precision`, or by default what the device computes fastest natively (loading.device_precision).
    bf16 keeps ~3 significant digits: cosine similarities move by about 1e-4, nothing a kNN or a
    linear probe notices; --precision fp32 gives exact rows."""
    from byolcli.core.hardware import detect_hardware, precision_dtype
    from byolcli.core.loading import device_precision

    return precision_dtype(precision or device_precision(detect_hardware(str(device)))[0])


def iter_embeddings(
    paths: list[Path],
    encoder: torch.nn.Module,
    device: torch.device,
    batch_size: int = 256,
    workers: int | None = None,
    normalize: bool = False,
    precision: str | None = None,
) -> Iterator[tuple[int, np.ndarray, np.ndarray]]:
    """Yield (first row, float32 vectors, ok mask) batch by batch, in `paths` order."""
    for row, (vectors,), ok in iter_shared_embeddings(
        paths, [encoder], device, batch_size, workers, normalize, precision
    ):
        yield row, vectors, ok


def iter_shared_embeddings(
    paths: list[Path],
    encoders: list[torch.nn.Module],
    device: torch.device,
    batch_size: int = 256,
    workers: int | None = None,
    normalize: bool = False,
    precision: str | None = None,
) -> Iterator[tuple[int, list[np.ndarray], np.ndarray]]:
    """Yield (first row, each encoder's float32 vectors, ok mask) batch by batch, in `paths` order: every
    image is decoded once for all `encoders`, which must share an image size."""
    from byolcli.core.hardware import detect_hardware, mixed_precision, precision_dtype, to_device, use_device
    from byolcli.core.loading import LOADER_PREFETCH, choose_workers, device_precision, fit_workers_to_shared_memory

    metas = [metadata_of(encoder) for encoder in encoders]
    size = metas[0]["image_size"]
    if any(meta["image_size"] != size for meta in metas):
        raise ValueError("encoders that share a decoding pass must share an image size")
    dataset = ImageDataset(paths, size)
    hw = detect_hardware(str(device))  # once, for the default workers and precision
    if workers is None:
        held = LOADER_PREFETCH * batch_size * 3 * size**2  # uint8 images in /dev/shm
        workers = fit_workers_to_shared_memory(choose_workers(hw, embedding=True)[0], held, hw.shared_memory, "")[0]
    loader = DataLoader(
        dataset,
        batch_size=batch_size,
        num_workers=workers,
        pin_memory=device.type == "cuda",
        prefetch_factor=LOADER_PREFETCH if workers else None,
    )
    dtype = precision_dtype(precision or device_precision(hw)[0])
    use_device(device, "fp32" if dtype is None else str(dtype))
    channels_last = device.type in ("cuda", "cpu")  # faster on both, fp32 included (benchmarks/README.md)
    if channels_last:
        encoders = [encoder.to(memory_format=torch.channels_last) for encoder in encoders]
    row, pending = 0, None
    with torch.inference_mode():
        for images, ok in loader:
            images = to_device(images, device)
            batch = []
            for encoder, meta in zip(encoders, metas):
                pixels = normalize_images(images, meta["mean"], meta["std"])
                if channels_last:
                    pixels = pixels.contiguous(memory_format=torch.channels_last)
                with mixed_precision(device.type, dtype):
                    vectors = encoder(pixels).float()
                batch.append(torch.nn.functional.normalize(vectors, dim=1) if normalize else vectors)
            # Each batch is read back once the next is queued: a GPU never idles while the host waits.
            if pending is not None:
                yield pending[0], [v.cpu().numpy() for v in pending[1]], pending[2].numpy()
            pending = row, batch, ok
            row += len(images)
        if pending is not None:
            yield pending[0], [v.cpu().numpy() for v in pending[1]], pending[2].numpy()


def embed_paths(
    paths: list[Path],
    encoder: torch.nn.Module,
    device: torch.device,
    batch_size: int,
    workers: int | None,
    progress: Callable[[int, int], None] | None = None,
) -> tuple[torch.Tensor, np.ndarray]:
    """Every image's vector as one matrix (rows of images that broke since the scan are zeros) and
    which rows are good."""
    features, good = embed_many(paths, {"encoder": encoder}, device, batch_size, workers, progress)
    return features["encoder"], good


def embed_many(
    paths: list[Path],
    networks: dict[str, torch.nn.Module],
    device: torch.device,
    batch_size: int = 256,
    workers: int | None = None,
    progress: Callable[[int, int], None] | None = None,
) -> tuple[dict[str, torch.Tensor], np.ndarray]:
    """embed_paths for several networks: each image is decoded once per image size among them, not once
    per network. Returns every network's matrix by name, and the rows every network could embed."""
    by_size: dict[int, list[str]] = {}
    for name, network in networks.items():
        by_size.setdefault(metadata_of(network)["image_size"], []).append(name)
    features = {
        name: np.zeros((len(paths), metadata_of(network)["feature_dim"]), dtype=np.float32)
        for name, network in networks.items()
    }
    good = np.ones(len(paths), dtype=bool)
    total, done = len(paths) * len(by_size), 0
    for names in by_size.values():
        encoders = [networks[name] for name in names]
        for start, batches, ok in iter_shared_embeddings(paths, encoders, device, batch_size, workers):
            for name, batch in zip(names, batches):
                features[name][start : start + len(batch)] = batch
            good[start : start + len(ok)] &= ok
            if progress:
                progress(done + start + len(ok), total)
        done += len(paths)
    return {name: torch.from_numpy(f) for name, f in features.items()}, good
