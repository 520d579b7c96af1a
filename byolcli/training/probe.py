"""Timing real BYOL steps on the device, for the planner: how long a step takes at a setting, and
whether it fits in memory at all."""

from __future__ import annotations

import statistics
import time
from dataclasses import dataclass
from typing import TYPE_CHECKING

from byolcli.core.hardware import Hardware, is_out_of_memory, memory_held, release_cached_memory, synchronize

if TYPE_CHECKING:
    import torch

MEMORY_MARGIN = 0.85  # a probed step may use at most this share of the device's memory


class OutOfMemory(Exception):
    """A probed step did not fit in the device's memory (or broke the margin)."""


@dataclass(frozen=True)
class StepSetting:
    """What one probed training step runs: the network, the batch, and where its data lives."""

    backbone: str
    image_size: int
    batch: int
    precision: str
    channels_last: bool
    stem: str = "standard"
    augment_on: str = "cpu"  # where the views are made
    resident: int = 0  # bytes held beside the step: the decoded images a GPU keeps
    gradient_buckets: bool = False  # a copy of the gradients, as DistributedDataParallel keeps
    sync_batchnorm: bool = False  # batch norm over every process's batch, as training then runs it


def probe_step(hw: Hardware, setting: StepSetting, steps: int = 2) -> float:
    """Seconds per real BYOL training step at this setting, after one warm-up step, under cuDNN's
    autotuning as in training.

    Raises OutOfMemory if the step does not fit, or if its peak memory breaks the
    safety margin (so fragmentation later in the run cannot push it over).
    """
    import torch

    device = torch.device(hw.device)
    failure = None
    try:
        seconds = _time_steps(hw, device, setting, steps)
    except OutOfMemory as exc:
        failure = str(exc)
    except RuntimeError as exc:
        if not is_out_of_memory(exc):
            raise
        failure = str(exc).splitlines()[0]
    # Here, past the except blocks, the failed attempt's traceback and with it its tensors are
    # gone, so the allocator's cache can actually be handed back before the next try.
    release_cached_memory(device)
    if failure is not None:
        raise OutOfMemory(failure)
    return seconds


def _time_steps(hw: Hardware, device: torch.device, setting: StepSetting, steps: int) -> float:
    import torch

    from byolcli.core.pixels import canvas_side
    from byolcli.training.augment import byol_views
    from byolcli.training.byol import BYOL
    from byolcli.training.distributed import synchronise_batchnorm
    from byolcli.training.step import ByolStep

    if device.type == "cuda":
        torch.backends.cudnn.benchmark = True
    size, batch = setting.image_size, setting.batch
    held = torch.empty(setting.resident, dtype=torch.uint8, device=device)  # noqa: F841 - what training keeps
    memory_format = torch.channels_last if setting.channels_last else torch.contiguous_format
    model = BYOL(setting.backbone, setting.stem)
    if setting.sync_batchnorm:  # its memory differs from batch norm's; only rank 0 probes, so no sums travel
        synchronise_batchnorm(model, across_ranks=False)
    model.to(device)
    model.to(memory_format=memory_format)
    trained = sum(p.numel() for p in model.parameters() if p.requires_grad)
    buckets = torch.empty(trained if setting.gradient_buckets else 0, device=device)  # noqa: F841
    step = ByolStep(model, setting.precision, device.type, lr=0.1)
    if setting.augment_on == "device":
        canvas = canvas_side(size)
        canvases = torch.randint(0, 256, (batch, 3, canvas, canvas), dtype=torch.uint8, device=device)
        sizes = torch.full((batch, 2), canvas, device=device)
    views = [torch.randn(batch, 3, size, size, device=device).contiguous(memory_format=memory_format) for _ in range(2)]
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    timings = []
    for _ in range(steps + 1):
        start = time.perf_counter()
        if setting.augment_on == "device":
            views = [v.contiguous(memory_format=memory_format) for v in byol_views(canvases, sizes, size)]
        step.accumulate(views[0], views[1])
        step.finish(tau=0.99)
        synchronize(device)
        timings.append(time.perf_counter() - start)
    if memory_held(device) > MEMORY_MARGIN * hw.total_memory:
        raise OutOfMemory(f"batch {batch} peaks above {MEMORY_MARGIN:.0%} of the device's memory")
    return statistics.median(timings[1:])
