"""The planning rules, one function each: from the images and the hardware to a choice and the
reason the user reads for it. docs/planning.md states them with their measurements."""

from __future__ import annotations

import math
import statistics
from collections.abc import Callable
from dataclasses import replace

from byolcli.core.errors import UserError
from byolcli.core.hardware import GiB, Hardware
from byolcli.core.inputs import IMAGENET, IMAGENET_SIZE, RANDOM
from byolcli.core.loading import LOADER_PREFETCH, device_precision
from byolcli.core.pixels import canvas_side
from byolcli.core.terminal import format_seconds
from byolcli.training.probe import MEMORY_MARGIN, OutOfMemory, StepSetting

SIZES = (32, 64, 96, 128, 160, 192, 224)
MAX_SIZE = {"cpu": 64, "mps": 128, "cuda": 224}
MAX_BATCH = 512
CPU_BATCH = 64
MIN_BATCH = 8
BF16_MARGIN = 1.15
EFFECTIVE_BATCH = 256
SYNC_BATCHNORM_BELOW = 128  # per-device batch
IN_MEMORY_SHARE = 0.25  # decoded images may take at most this share of the RAM
GPU_RESIDENT_SHARE = 0.1  # decoded images stay on the GPU if they take at most this share of its free memory
DECODE_BATCH = 256  # images per loader batch when a set is decoded into memory
DEFAULT_EPOCHS = 100
# Rough training memory per image at 224 px for BYOL (two views with gradients,
# target forward), fp32; it only tells the probe where to start searching.
BYTES_PER_IMAGE_224 = {"resnet18": 60e6, "resnet34": 90e6, "resnet50": 200e6}
# The small-image stem keeps every feature map 4× larger per side: the strided stem's activations at 4× the size.
STEM_SCALE = {"standard": 1, "small": 4}
SMALL_IMAGES = 64  # px: where the strided stem leaves the last stages a pixel or two
# A run that starts from trained weights adapts them instead of learning from nothing: a smaller
# learning rate, a slower target and fewer epochs keep what the weights know (docs/experiments.md).
START_BASE_LR = 0.1
START_TAU = 0.99
START_EPOCHS = 2
START_MIX = 0.5


def choose_image_size(short_sides: list[int], hw: Hardware) -> tuple[int, str]:
    median = int(statistics.median(short_sides))
    fitting = [s for s in SIZES if s <= max(median, SIZES[0])]
    size = min(fitting[-1], MAX_SIZE[hw.kind])
    why = f"images' median short side is {median} px"
    if size < fitting[-1]:
        why += f"; {size} px is the most a {hw.kind.upper()} trains in reasonable time"
    return size, why


def choose_start(
    init: str | None, backbone: str, stem: str, find_imagenet: Callable[[str], str | None]
) -> tuple[str | None, str]:
    """The weights the run starts from (Plan.init: "imagenet", a file, or None for random) and why.
    `init` is --init after train_flags.validate: None for auto, RANDOM, IMAGENET or a file's path."""
    if init == RANDOM:
        return None, "random: set by flag"
    if init not in (None, IMAGENET):
        return init, "set by flag"
    if init is None and stem != "standard":
        return None, f"random: ImageNet's weights have the standard stem, and the {stem} stem is planned"
    missing = find_imagenet(backbone)
    if missing is None:
        return IMAGENET, f"torchvision's ImageNet {backbone} weights" + (
            ": set by flag" if init == IMAGENET else ", found; --init random to start from random weights"
        )
    if init == IMAGENET:
        raise UserError(f"--init imagenet: {missing}; put the file there, or use --init random")
    return None, f"random: {missing} (put the file there, or --init random)"


def start_image_size(size: int, why: str, trained_at: int | None, stem: str, hw: Hardware) -> tuple[int, str]:
    """Starting weights see most at the size they were trained at (a strided stem leaves small images
    maps of a pixel or two): smaller images are upsampled toward it, as far as the device trains in
    reasonable time. `trained_at` is None where the weights do not say (ImageNet's size is assumed)."""
    if stem != "standard":
        return size, why
    target = max(s for s in SIZES if s <= min(trained_at or IMAGENET_SIZE, MAX_SIZE[hw.kind]))
    if target <= size:
        return size, why
    said = f"{trained_at} px" if trained_at else f"{IMAGENET_SIZE} px (ImageNet's, assumed)"
    capped = (
        f"; {target} px is the most a {hw.kind.upper()} trains in reasonable time"
        if target < (trained_at or IMAGENET_SIZE)
        else ""
    )
    return target, f"{why}; upsampled to {target} px: the starting weights were trained at {said}{capped}"


def choose_mix(started: bool) -> tuple[float, str]:
    """How far the exported encoder moves from its start toward the trained weights (candidates.py)."""
    if not started:
        return 1.0, "random weights have nothing to keep"
    return START_MIX, (
        f"{START_MIX:g} of the way from the start to the trained weights, its batch-norm statistics measured on "
        "the folder: adapting distorts what the start knew, and a mix does not compute mixed statistics "
        "(--labels chooses)"
    )


def choose_backbone(images: int, size: int, hw: Hardware) -> tuple[str, str]:
    if hw.kind == "cuda" and hw.total_memory >= 16 * GiB and images >= 50_000 and size >= 128:
        return "resnet50", f"{images:,} images at {size} px on a {hw.total_memory / GiB:.0f} GiB GPU feed a ResNet-50"
    if hw.kind == "cpu":
        return "resnet18", "fastest ResNet on CPU (strided stem)"
    return "resnet18", "ResNet-18 learns fastest from small or low-resolution sets"


def choose_stem(size: int, hw: Hardware) -> tuple[str, str]:
    """The strided stem everywhere, for now: each reason says what was measured (docs/experiments.md)."""
    if hw.kind == "cpu":
        return "standard", "a CPU run is bound by time, and the small-image stem costs 10 to 20 times more per step"
    if size <= SMALL_IMAGES:
        return "standard", (
            f"at {size} px the small-image stem (--stem small) learned no more per epoch than this one over "
            "the 30 epochs measured"
        )
    return "standard", f"at {size} px the strided stem still leaves the last stages maps to work on"


def choose_precision(
    hw: Hardware, pinned: str | None, setting: StepSetting, probe: Callable[[StepSetting], float]
) -> tuple[str, str]:
    """The precision `pinned` by flag, or chosen for the device: on a CPU with native bf16, by timing
    both at `setting`."""
    if pinned is not None:
        emulated = pinned == "bf16" and hw.kind == "cpu" and not hw.bf16
        return pinned, "set by flag" + (
            " (warning: this CPU emulates bf16, expect a large slowdown)" if emulated else ""
        )
    if hw.kind == "cpu" and hw.bf16:
        return time_precisions(setting, probe)
    return device_precision(hw)


def loader_bytes(batch: int, size: int, augment_on: str) -> int:
    """The /dev/shm bytes one training loader process holds: LOADER_PREFETCH batches of uint8
    canvases, or of two float views."""
    per_image = decoded_bytes(1, size) if augment_on == "device" else 2 * 3 * size * size * 4
    return LOADER_PREFETCH * batch * per_image


def decoding_bytes(size: int) -> int:
    """The /dev/shm bytes one loader process holds while a set is decoded into memory."""
    return LOADER_PREFETCH * DECODE_BATCH * decoded_bytes(1, size)


def step_time(step_seconds: float, data_seconds: float, workers: int) -> float:
    """A micro-step's seconds: loader processes overlap with the step; without them decoding runs in between."""
    return max(step_seconds, data_seconds) if workers else step_seconds + data_seconds


def decoded_bytes(images: int, size: int) -> int:
    return images * 3 * canvas_side(size) ** 2


def choose_in_memory(images: int, size: int, hw: Hardware) -> tuple[bool, str]:
    need, budget = decoded_bytes(images, size), IN_MEMORY_SHARE * hw.ram
    if need <= budget:
        return True, f"{need / GiB:.2f} GiB decoded: fits in memory, so images are decoded once, not every epoch"
    return False, f"{need / GiB:.1f} GiB decoded would exceed {budget / GiB:.1f} GiB (a quarter of the RAM)"


def choose_augment_on(size: int, hw: Hardware, in_memory: bool) -> tuple[str, str]:
    if in_memory:
        return "device", "images are in memory: both views are made in batches where the model trains"
    if hw.kind == "cuda" and size >= 96:
        return "device", f"at {size} px CPU workers cannot make two views as fast as a GPU trains"
    if hw.kind == "cpu":
        return "cpu", "paper-faithful torchvision transforms; --augment-on device batches them (faster on a CPU)"
    return "cpu", "loader processes keep up at this size"


def choose_data_path(images: int, size: int, hw: Hardware, pinned: str | None) -> tuple[str, bool, str, str]:
    """Where views are made (`pinned` by --augment-on, or chosen), and whether the images are decoded
    into memory once. Returns (augment_on, in_memory, why augment_on, why in_memory)."""
    fits, why_memory = choose_in_memory(images, size, hw)
    augment_on, why_augment = (pinned, "set by flag") if pinned is not None else choose_augment_on(size, hw, fits)
    in_memory = fits and augment_on == "device"
    if fits and not in_memory:
        why_memory = "--augment-on cpu decodes in loader processes"
    return augment_on, in_memory, why_augment, why_memory


def base_lr_for(epochs: float) -> float:
    return 0.45 if epochs < 300 else 0.3 if epochs <= 1000 else 0.2


def choose_base_lr(epochs: float, started: bool = False) -> tuple[float, str]:
    if started:
        return (
            START_BASE_LR,
            f"base {START_BASE_LR} to adapt starting weights without washing them out, × global batch/256",
        )
    base_lr = base_lr_for(epochs)
    return base_lr, f"base {base_lr} for a {epochs:.3g}-epoch run, × global batch/256"


def tau_for(epochs: float, total_steps: int, started: bool = False) -> tuple[float, str]:
    if started:
        tau, why = START_TAU, "a target that moves slowly holds on to the starting weights"
    else:
        tau = 0.97 if epochs < 100 else 0.99 if epochs <= 1000 else 0.996
        why = f"{epochs:.3g} epochs"
    ceiling = 1 - 10 / max(total_steps, 1)
    if tau > ceiling:
        tau = max(0.9, round(ceiling, 4))
        why += f"; only {total_steps} steps, so the target must move faster"
    return tau, why


def fit_batch(start: int, cap: int, probe: Callable[[int], float], floor: int = 2) -> tuple[int, float]:
    """The largest power-of-two batch ≤ `cap` whose probed step fits, searched from `start`:
    halving while it does not fit, else doubling until it would not. Returns (batch, seconds)."""
    batch = start
    while True:
        try:
            seconds = probe(batch)
            break
        except OutOfMemory:
            batch //= 2
            if batch < floor:
                raise UserError(
                    f"not even a batch of {floor} images fits in the device's memory; "
                    "try a smaller --image-size or --backbone"
                ) from None
    if batch < start:
        return batch, seconds
    while batch * 2 <= cap:
        try:
            seconds, batch = probe(batch * 2), batch * 2
        except OutOfMemory:
            break
    return batch, seconds


def choose_sync_batchnorm(batch: int, world_size: int) -> tuple[bool, str]:
    if world_size == 1:
        return False, "one process"
    if batch < SYNC_BATCHNORM_BELOW:
        return True, f"{batch} images per device give noisy statistics; computed over all {world_size} processes"
    return False, f"{batch} images per device are enough for batch statistics"


def power_of_two_at_most(n: float) -> int:
    return int(2 ** math.floor(math.log2(max(n, 1))))


def time_precisions(setting: StepSetting, probe: Callable[[StepSetting], float]) -> tuple[str, str]:
    """On a CPU with native bf16: both precisions timed, bf16 kept only if clearly faster (a few timed
    steps on a busy machine are noisy, and fp32 has the safer numerics)."""
    timed = {p: probe(replace(setting, precision=p)) for p in ("fp32", "bf16")}
    precision = "bf16" if timed["bf16"] * BF16_MARGIN < timed["fp32"] else "fp32"
    batch = setting.batch
    return precision, (
        f"timed on this CPU: fp32 {batch / timed['fp32']:.0f}, bf16 {batch / timed['bf16']:.0f} "
        f"images/s (bf16 must win by {BF16_MARGIN - 1:.0%})"
    )


def resident_bytes(images: int, size: int, in_memory: bool, hw: Hardware) -> int:
    """What a GPU holds beside training: the decoded images, when they stay in its memory."""
    resident = decoded_bytes(images, size) if in_memory and hw.kind == "cuda" else 0
    return resident if resident < GPU_RESIDENT_SHARE * hw.free_memory else 0


def cpu_batch(images: int) -> int:
    return min(CPU_BATCH, max(MIN_BATCH, power_of_two_at_most(images / 8)))


def choose_batch(
    setting: StepSetting,
    images: int,
    hw: Hardware,
    pinned: int | None,
    probe: Callable[[StepSetting], float],
    world_size: int,
) -> tuple[int, float, int, str]:
    """The per-device batch (`pinned` by flag, or chosen) and its probed step time; returns
    (batch, seconds, cap, why)."""
    # At least 8 steps per epoch, but never a batch so small that batch norm is noise.
    cap = max(MIN_BATCH, min(MAX_BATCH, power_of_two_at_most(images / 8 / world_size)))

    def timed(batch: int) -> float:
        return probe(replace(setting, batch=batch, sync_batchnorm=choose_sync_batchnorm(batch, world_size)[0]))

    if pinned is not None:
        batch, why = pinned, "set by flag"
        step_seconds = timed(batch)
    elif hw.kind == "cpu":
        batch, why = min(CPU_BATCH, cap), "CPU runs are time-bound: more optimizer steps beat a larger batch"
        step_seconds = timed(batch)
    else:
        side = setting.image_size * STEM_SCALE[setting.stem] / 224
        per_image = BYTES_PER_IMAGE_224[setting.backbone] * side**2 * (0.6 if setting.precision != "fp32" else 1)
        free = max(0, hw.free_memory - setting.resident)
        start = min(cap, power_of_two_at_most(free * MEMORY_MARGIN / per_image))
        batch, step_seconds = fit_batch(start, cap, timed)
        why = f"largest that fit in probed steps (searched from {start}, capped at {cap})"
    if batch * world_size > images:
        raise UserError(
            f"a batch of {batch} per process × {world_size} processes is more than the {images} images found"
            if world_size > 1
            else f"--batch-size {batch} is larger than the {images} images found"
        )
    return batch, step_seconds, cap, why


def choose_accumulation(
    batch: int, cap: int, images: int, hw: Hardware, pinned: bool, world_size: int
) -> tuple[int, str]:
    devices_batch = batch * world_size
    if hw.kind == "cpu" or devices_batch >= 128 or pinned or batch >= cap:
        return 1, "not needed"
    accumulation = max(1, min(EFFECTIVE_BATCH // devices_batch, images // devices_batch // 8 or 1))
    return accumulation, (
        f"memory allows {devices_batch} per step; accumulate to "
        f"{devices_batch * accumulation} (BYOL degrades below 256)"
    )


def choose_length(
    epochs: int | None, time_budget: float | None, steps_per_epoch: int, seconds_per_step: float, started: bool = False
) -> tuple[int, str]:
    """The run's optimizer steps: from --epochs, from --time at the measured speed, or the default
    (fewer epochs for a run that starts from weights)."""
    if epochs is not None:
        return epochs * steps_per_epoch, "set by flag"
    if time_budget is not None:
        return (
            max(1, int(time_budget / seconds_per_step)),
            f"what fits in the {format_seconds(time_budget)} budget at the measured step time",
        )
    if started:
        return (
            START_EPOCHS * steps_per_epoch,
            f"default for a start from weights: {START_EPOCHS} epochs (set --time or --epochs)",
        )
    return DEFAULT_EPOCHS * steps_per_epoch, f"default {DEFAULT_EPOCHS} epochs (set --time or --epochs)"


def warmup_for(steps_per_epoch: int, total_steps: int) -> int:
    return max(1, min(10 * steps_per_epoch, total_steps // 10))
