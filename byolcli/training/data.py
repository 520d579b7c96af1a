"""The training data path: canvases for augmentation on the training device, the set decoded once into
memory, batches prefetched on a thread, the epoch's order, and how long a loader process takes per image
(for the planner). The per-image views themselves are core/views.py.
"""

from __future__ import annotations

import queue
import threading
import time
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path
from typing import TypeVar, cast

import torch
from torch.utils.data import Dataset, Sampler
from torchvision.transforms import v2

from byolcli.core.hardware import to_device
from byolcli.core.loading import LOADER_PREFETCH
from byolcli.core.pixels import canvas_side
from byolcli.core.views import TwoViewDataset
from byolcli.training.rules import DECODE_BATCH

T = TypeVar("T")


class CanvasDataset(Dataset[tuple[torch.Tensor, torch.Tensor]]):
    """Item (epoch, i): image i decoded onto a square uint8 canvas, plus its original (height, width).

    For augmentation on the training device (augment.py): the loader only
    decodes; crops are cut from the canvas in the original's proportions.
    """

    def __init__(self, paths: list[Path], size: int) -> None:
        self.decoder = TwoViewDataset(paths, size)  # for its decode-with-fallback
        self.canvas = canvas_side(size)

    def __len__(self) -> int:
        return len(self.decoder)

    def __getitem__(self, key: tuple[int, int]) -> tuple[torch.Tensor, torch.Tensor]:
        image = self.decoder.load(key[1], min_side=self.canvas)
        height, width = image.shape[-2:]
        canvas = v2.functional.resize(image, [self.canvas, self.canvas], antialias=True)
        return canvas, torch.tensor([height, width])


def decode_canvases(
    paths: list[Path], size: int, workers: int = 0, progress: Callable[[int, int], None] | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Every image decoded once onto its canvas: uint8 (n, 3, C, C) and original sizes (n, 2).

    For sets that fit in memory: training then never decodes again, and each
    epoch only costs the batched augmentation.
    """
    dataset = CanvasDataset(paths, size)
    canvases = torch.empty(len(paths), 3, dataset.canvas, dataset.canvas, dtype=torch.uint8)
    sizes = torch.empty(len(paths), 2, dtype=torch.long)
    loader = torch.utils.data.DataLoader(
        dataset,
        batch_size=DECODE_BATCH,
        num_workers=workers,
        sampler=[(0, i) for i in range(len(paths))],
        prefetch_factor=LOADER_PREFETCH if workers else None,
    )
    done = 0
    for batch, batch_sizes in loader:
        canvases[done : done + len(batch)] = batch
        sizes[done : done + len(batch)] = batch_sizes
        done += len(batch)
        if progress:
            progress(done, len(paths))
    return canvases, sizes


class MemoryBatches:
    """Batches of (canvases, sizes) from decoded images in memory, in the sampler's order: a
    drop-in for the DataLoader over CanvasDataset, minus the decoding.

    With `pin` (canvases in CPU memory for a GPU), a background thread gathers each batch into
    page-locked memory ahead of time, so that its copy to the GPU runs without holding up the
    host, as the DataLoader's pin_memory does.
    """

    def __init__(
        self, canvases: torch.Tensor, sizes: torch.Tensor, sampler: EpochSampler, batch_size: int, pin: bool = False
    ) -> None:
        self.canvases, self.sizes = canvases, sizes
        self.sampler, self.batch_size, self.pin = sampler, batch_size, pin

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        batches = self._gathered()
        return prefetched((c.pin_memory(), s.pin_memory()) for c, s in batches) if self.pin else batches

    def _gathered(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        order = torch.tensor([index for _, index in self.sampler], dtype=torch.long)
        if self.canvases.is_cuda:  # from page-locked memory the copy is queued, not waited for
            order = to_device(order.pin_memory(), self.canvases.device)
        for start in range(0, len(order) - self.batch_size + 1, self.batch_size):
            index = order[start : start + self.batch_size]
            yield self.canvases[index], self.sizes[index]


def prefetched(items: Iterable[T], depth: int = 2) -> Iterator[T]:
    """`items`, produced by a background thread up to `depth` ahead of the consumer; an error in
    the producer is raised in the consumer, and a consumer that stops early stops the thread."""
    ready: queue.Queue[object] = queue.Queue(maxsize=depth)
    done = object()
    stop = threading.Event()

    def put(item: object) -> bool:  # False once the consumer has gone
        while not stop.is_set():
            try:
                ready.put(item, timeout=0.1)
                return True
            except queue.Full:
                pass
        return False

    def produce() -> None:
        try:
            for item in items:
                if not put(item):
                    return
            put(done)
        except BaseException as exc:  # noqa: BLE001 - handed to the consumer
            put(exc)

    thread = threading.Thread(target=produce, daemon=True)
    thread.start()
    try:
        while (item := ready.get()) is not done:
            if isinstance(item, BaseException):
                raise item
            yield cast(T, item)
    finally:
        stop.set()
        thread.join()


class EpochSampler(Sampler[tuple[int, int]]):
    """Yields (epoch, index): a fresh permutation per epoch from (seed, epoch), startable mid-epoch.

    Being a pure function of (seed, epoch), the order can be recomputed after a
    restart, so a resumed run continues with exactly the images it had not yet
    seen in that epoch. With several processes, rank r takes every `world`-th
    image from position r: each global batch of the one-process order is split
    between the ranks without overlap, so `start` stays a position in that one
    order and a run can resume on a different number of processes.
    """

    def __init__(self, size: int, seed: int, rank: int = 0, world: int = 1) -> None:
        self.size = size
        self.seed = seed
        self.rank = rank
        self.world = world
        self.epoch = 0
        self.start = 0

    def set_position(self, epoch: int, start: int = 0) -> None:
        self.epoch, self.start = epoch, start

    def __iter__(self) -> Iterator[tuple[int, int]]:
        generator = torch.Generator().manual_seed(self.seed * 100_003 + self.epoch)
        order = torch.randperm(self.size, generator=generator)
        return ((self.epoch, index) for index in order[self.start + self.rank :: self.world].tolist())

    def __len__(self) -> int:
        return len(range(self.start + self.rank, self.size, self.world))


def time_decoding(paths: list[Path], size: int, augment_on: str, samples: int = 16) -> float:
    """Seconds a loader process spends on one image at `size`, from a small sample."""
    sample = paths[:: max(1, len(paths) // samples)][:samples]
    dataset = CanvasDataset(sample, size) if augment_on == "device" else TwoViewDataset(sample, size)
    start = time.perf_counter()
    for index in range(len(dataset)):
        dataset[0, index]
    return (time.perf_counter() - start) / len(dataset)
