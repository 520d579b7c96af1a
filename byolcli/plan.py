"""Detect the hardware and choose every training setting, each with its reason.

The Plan is what the user sees before training and what `plan.json` records.
Its rules, and where they come from:

- Image size: the images' own median short side, rounded down to a standard
  size, capped by what the device can train in reasonable time (CPU 64, MPS
  128, CUDA 224). Upsampling past the data's resolution adds cost, not detail.
- Backbone: torchvision ResNet-18 unless a CUDA GPU with ≥ 16 GiB has ≥ 50k
  images at ≥ 128 px to feed a ResNet-50. ResNet-18 keeps the strided stem on
  every device: the CIFAR-style 3×3 stem costs ~5× more compute on CPU.
- Batch: on CUDA/MPS, the largest power of two that survives real BYOL steps
  (both views, target forward, optimizer and EMA step) with a memory margin,
  halving on out-of-memory; capped at 512 and at 1/8 of the images so an epoch
  has at least 8 steps. On CPU, 64: a CPU run is limited by time, not memory,
  and in minutes-long runs more optimizer steps beat a bigger batch.
- Accumulation: when memory forces a per-device batch under 128, gradients
  are accumulated up to 256 (BYOL paper, §5: it holds up down to 256 and
  degrades below), with the target updated once per optimizer step.
- Memory format: channels-last (NHWC) on CUDA and CPU: tensor cores and AMX want
  it, and on CPU its batch norm is much faster on small feature maps.
- Precision: bf16 on GPUs that compute it natively (Ampere+), fp16 with loss
  scaling on older ones, fp32 on MPS and on CPUs without AVX512-BF16/AMX
  (emulated bf16 is ~20× slower). On CPUs with them, both are timed and bf16
  kept only if it is 15% faster (a few timed steps are noisy): on this
  project's 2-core Xeon bf16 won at 64 px, not at 32 px.
- Loader workers on CPU: none up to 2 cores (decoding in the training process
  measured 105 images/s against 70 with one loader process fighting the two
  training threads), else a quarter of the cores; the training process then
  uses the cores the workers leave.
- Learning rate: base × batch/256 (paper), base 0.45 under 300 epochs, 0.3 up
  to 1000, 0.2 beyond (DeepMind's presets: longer runs use a lower base).
- τ_base: 0.97 under 100 epochs, 0.99 up to 1000, 0.996 beyond (DeepMind's
  presets: 40 epochs → 0.97, 100–300 → 0.99, 1000 → 0.996), then lowered so
  that the EMA's time constant 1/(1 − τ) is at most a tenth of the run's
  optimizer steps: with few steps a slow target barely leaves its random init
  (the paper's small-data and short-run observation: lower τ for short runs).
- Warm-up: 10 epochs (paper) but at most 10% of the run.
- Several processes (torchrun or --gpus): the batch above is per device; the
  global batch is batch × accumulation × processes, and the learning rate and
  epoch length follow the global batch. Batch norm is synchronised across
  processes when the per-device batch is under 128: BYOL's reference computes
  statistics over the whole batch, and a few dozen images per device give
  noisy statistics.
- Images in memory: when every image, decoded onto its 1.5× canvas, fits in
  a quarter of the RAM (shared among the processes of this machine), they are
  decoded once before training instead of every epoch, and both views are made
  in batches on the training device (per-image parameters, augment.py). On
  this project's 2-core CPU that cut the data pipeline's cost from 32% to 9%.
- Augmentation otherwise: on the GPU (batched) for CUDA at ≥ 96 px, where CPU
  workers cannot make two views per image as fast as the GPU trains; per
  image in loader processes (torchvision) elsewhere.
"""

from __future__ import annotations

import math
import os
import shutil
import statistics
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable

from byolcli.errors import UserError

GiB = 1024**3
SIZES = (32, 64, 96, 128, 160, 192, 224)
MAX_SIZE = {"cpu": 64, "mps": 128, "cuda": 224}
MAX_BATCH = 512
CPU_BATCH = 64
MIN_IMAGES = 16  # batch norm needs a batch; BYOL needs more than a handful of images to mean anything
MIN_BATCH = 8
BF16_MARGIN = 1.15
EFFECTIVE_BATCH = 256
SYNC_BATCHNORM_BELOW = 128  # per-device batch
MEMORY_MARGIN = 0.85  # a probed step may use at most this share of the device's memory
IN_MEMORY_SHARE = 0.25  # decoded images may take at most this share of the RAM
GPU_RESIDENT_SHARE = 0.1  # decoded images stay on the GPU if they take at most this share of its free memory
LOADER_PREFETCH = 4  # batches each loader process prepares ahead (the DataLoader's prefetch_factor)
SHARED_MEMORY_SHARE = 0.8  # loader processes may fill at most this share of /dev/shm
CGROUP_CPU_MAX = Path("/sys/fs/cgroup/cpu.max")  # a container's CPU quota: "max" or "QUOTA PERIOD"
# Measured on cifar10-5k (README, 'What a short CPU run learns'): no run of up to 18 epochs
# scored better than an untrained ResNet-18 on kNN (at best level with it); a 40-epoch run did.
USEFUL_EPOCHS = 40
DEFAULT_EPOCHS = 100
WEIGHT_DECAY = 1.5e-6
# Rough training memory per image at 224 px for BYOL (two views with gradients,
# target forward), fp32; it only tells the probe where to start searching.
BYTES_PER_IMAGE_224 = {"resnet18": 60e6, "resnet34": 90e6, "resnet50": 200e6}
# The small-image stem keeps every feature map 4× larger per side: the strided stem's activations at 4× the size.
STEM_SCALE = {"standard": 1, "small": 4}
SMALL_STEM_UP_TO = 64  # px, on GPUs (benchmarks/learning_curve.py)


class OutOfMemory(Exception):
    """A probed step did not fit in the device's memory (or broke the margin)."""


@dataclass(frozen=True)
class Hardware:
    kind: str  # "cuda", "mps" or "cpu"
    name: str
    total_memory: int  # bytes: device memory, or system RAM on CPU
    free_memory: int
    bf16: bool
    cores: int
    device: str  # the torch device string, e.g. "cuda:0"
    ram: int = 0  # bytes of system memory this process may count on (0: unknown)
    shared_memory: int = 0  # free bytes in /dev/shm, where loader processes hand over batches (0: unknown)


@dataclass
class Plan:
    device: str
    device_name: str
    backbone: str
    image_size: int
    batch_size: int
    accumulation: int
    precision: str
    workers: int
    channels_last: bool
    images: int
    skipped: int
    steps_per_epoch: int
    total_steps: int
    epochs: float
    warmup_steps: int
    base_lr: float
    lr: float
    tau_base: float
    weight_decay: float
    seed: int
    step_seconds: float  # measured per optimizer step (compute, or data if slower)
    time_budget: float | None
    reasons: dict[str, str] = field(default_factory=dict)
    augment_on: str = "cpu"  # "cpu": loader processes; "device": batched on the training device
    in_memory: bool = False  # all images decoded once, before training (needs augment_on "device")
    init: str | None = None  # starting weights: "imagenet", an exported encoder's path, or None (random)
    world_size: int = 1  # processes training together, one per device
    sync_batchnorm: bool = False
    stem: str = "standard"  # the backbone's first layers (model.STEMS)

    @property
    def effective_batch(self) -> int:
        """Images per optimizer step, over all processes."""
        return self.batch_size * self.accumulation * self.world_size

    @property
    def estimated_seconds(self) -> float:
        return self.step_seconds * self.total_steps

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict) -> "Plan":
        return cls(**data)


@dataclass
class Overrides:
    """Every choice the user may pin; None means 'choose for me'."""

    backbone: str | None = None
    image_size: int | None = None
    batch_size: int | None = None
    epochs: int | None = None
    time_budget: float | None = None
    lr: float | None = None
    device: str | None = None
    workers: int | None = None
    precision: str | None = None
    augment_on: str | None = None
    init: str | None = None
    stem: str | None = None
    seed: int = 0


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


# --- hardware ------------------------------------------------------------------


def usable_cores() -> int:
    """The cores this process may run on: its CPU affinity, and the container's CPU quota
    (cgroup v2 cpu.max), not the machine's count."""
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    try:
        quota, period = CGROUP_CPU_MAX.read_text().split()[:2]
        if quota != "max":
            cores = min(cores, max(1, math.ceil(int(quota) / int(period))))
    except (OSError, ValueError):
        pass
    return max(1, cores)


def free_shared_memory() -> int:
    try:
        return shutil.disk_usage("/dev/shm").free
    except OSError:
        return 0


def system_memory() -> int:
    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (AttributeError, ValueError, OSError):
        return 0


def cpu_has_bf16() -> bool:
    try:
        flags = Path("/proc/cpuinfo").read_text()
    except OSError:
        return False
    return "avx512_bf16" in flags or "amx_bf16" in flags


def cuda_has_bf16(index: int) -> bool:
    """Whether CUDA device `index` computes bf16 natively: compute capability 8.0 (Ampere) or newer.
    torch.cuda.is_bf16_supported() also says yes where bf16 is only emulated (T4, V100, P100),
    far slower than fp16 there, and asks about the current device rather than this one."""
    import torch

    return torch.cuda.get_device_capability(index) >= (8, 0)


def detect_hardware(device: str | None = None) -> Hardware:
    import torch

    cores = usable_cores()
    shm = free_shared_memory()
    wanted = (device or "").lower()
    if wanted.startswith("cuda") or (not wanted and torch.cuda.is_available()):
        if not torch.cuda.is_available():
            raise UserError(f"--device {device}: no CUDA GPU is available here")
        index = int(wanted.split(":")[1]) if ":" in wanted else torch.cuda.current_device()
        if index >= torch.cuda.device_count():
            raise UserError(f"--device {device}: this machine has {torch.cuda.device_count()} CUDA GPU(s)")
        free, total = torch.cuda.mem_get_info(index)
        props = torch.cuda.get_device_properties(index)
        return Hardware("cuda", props.name, total, free, cuda_has_bf16(index), cores, f"cuda:{index}",
                        system_memory(), shm)
    if wanted == "mps" or (not wanted and torch.backends.mps.is_available()):
        if not torch.backends.mps.is_available():
            raise UserError(f"--device {device}: Apple MPS is not available here")
        total = int(torch.mps.recommended_max_memory())
        free = total - int(torch.mps.driver_allocated_memory())
        return Hardware("mps", "Apple GPU (MPS)", total, free, False, cores, "mps", system_memory(), shm)
    if wanted not in ("", "cpu"):
        raise UserError(f"--device {device}: unknown device (use cuda, cuda:N, mps or cpu)")
    total = system_memory()
    return Hardware("cpu", f"CPU ({cores} cores)", total, total, cpu_has_bf16(), cores, "cpu", total, shm)


def mixed_precision(device_type: str, dtype):
    """torch.autocast for `dtype`, or no context at all for fp32 (dtype None): torch 2.4 raises on
    torch.autocast("mps", enabled=False) rather than doing nothing."""
    import contextlib

    import torch

    return contextlib.nullcontext() if dtype is None else torch.autocast(device_type, dtype=dtype)


def use_device(device, precision: str) -> None:
    """Make `device` the current CUDA device (pinned-memory threads, cuDNN handles and memory
    checks otherwise use GPU 0), and keep fp32 exact there: cuDNN's convolutions use TF32 on
    Ampere and newer unless told not to."""
    import torch

    if device.type != "cuda":
        return
    torch.cuda.set_device(device)
    if precision == "fp32":
        torch.backends.cudnn.allow_tf32 = False
        torch.backends.cuda.matmul.allow_tf32 = False


# --- the rules -------------------------------------------------------------------


def choose_image_size(short_sides: list[int], hw: Hardware) -> tuple[int, str]:
    median = int(statistics.median(short_sides))
    fitting = [s for s in SIZES if s <= max(median, SIZES[0])]
    size = min(fitting[-1], MAX_SIZE[hw.kind])
    why = f"images' median short side is {median} px"
    if size < fitting[-1]:
        why += f"; {size} px is the most a {hw.kind.upper()} trains in reasonable time"
    return size, why


def choose_backbone(images: int, size: int, hw: Hardware) -> tuple[str, str]:
    if hw.kind == "cuda" and hw.total_memory >= 16 * GiB and images >= 50_000 and size >= 128:
        return "resnet50", f"{images:,} images at {size} px on a {hw.total_memory / GiB:.0f} GiB GPU feed a ResNet-50"
    if hw.kind == "cpu":
        return "resnet18", "fastest ResNet on CPU (strided stem)"
    return "resnet18", "ResNet-18 learns fastest from small or low-resolution sets"


def choose_stem(size: int, hw: Hardware) -> tuple[str, str]:
    if hw.kind == "cpu":
        return "standard", "a CPU run is bound by time, and the small-image stem costs several times more per step"
    if size <= SMALL_STEM_UP_TO:
        return "small", f"at {size} px the strided stem leaves the last stages single pixels; the small stem learns more per epoch"
    return "standard", f"at {size} px the strided stem still leaves the last stages maps to work on"


def choose_precision(hw: Hardware) -> tuple[str, str]:
    """The precision for a device; on a bf16-capable CPU make_plan times both instead."""
    if hw.kind == "cuda":
        return ("bf16", "GPU computes bf16 natively") if hw.bf16 else ("fp16", "GPU lacks bf16; fp16 with loss scaling")
    if hw.kind == "cpu" and hw.bf16:
        return "bf16", "CPU has AVX512-BF16/AMX"
    if hw.kind == "cpu":
        return "fp32", "CPU lacks native bf16 (emulated bf16 is ~20x slower)"
    return "fp32", "autocast on MPS is not reliable enough for training yet"


def choose_workers(hw: Hardware) -> tuple[int, str]:
    if hw.kind == "cpu":
        if hw.cores <= 2:
            return 0, "with 2 cores, a loader process only competes with the training threads"
        return hw.cores // 4, f"{hw.cores} cores: a quarter decode, the rest train"
    workers = max(1, min(hw.cores - 1, 12))
    return workers, f"{hw.cores} cores, one left for the training process"


def fit_workers_to_shared_memory(workers: int, batch: int, size: int, augment_on: str,
                                 hw: Hardware) -> tuple[int, str | None]:
    """Fewer loader processes when the batches they hold in /dev/shm would not fit there (a
    container's default is 64 MiB): past it, a loader process dies of a bus error mid-run.
    Returns (workers, why) with `why` None when nothing had to change."""
    if workers == 0 or hw.shared_memory == 0:
        return workers, None
    canvas = size * 3 // 2
    per_image = 3 * canvas * canvas if augment_on == "device" else 2 * 3 * size * size * 4  # uint8 canvas, 2 views
    held = LOADER_PREFETCH * batch * per_image  # by each loader process at once
    fitting = min(workers, int(SHARED_MEMORY_SHARE * hw.shared_memory // held))
    if fitting == workers:
        return workers, None
    return fitting, (f"/dev/shm has {hw.shared_memory / 2**20:,.0f} MiB free and each loader process holds "
                     f"{held / 2**20:,.0f} MiB there: {fitting} of {workers} (a larger /dev/shm, e.g. "
                     "docker run --shm-size 8g, allows more)")


def decoded_bytes(images: int, size: int) -> int:
    canvas = size * 3 // 2  # data.CanvasDataset's canvas
    return images * 3 * canvas * canvas


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
        return "cpu", "paper-faithful torchvision transforms; --augment-on device batches them (~15% faster here)"
    return "cpu", "loader processes keep up at this size"


def base_lr_for(epochs: float) -> float:
    return 0.45 if epochs < 300 else 0.3 if epochs <= 1000 else 0.2


def tau_for(epochs: float, total_steps: int) -> tuple[float, str]:
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
                raise UserError(f"not even a batch of {floor} images fits in the device's memory; "
                                "try a smaller --image-size or --backbone") from None
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


def fit_to_world(plan: Plan, world_size: int) -> str | None:
    """Adapt a saved plan to a different number of processes, keeping its global batch (so its
    learning rate, epoch length and step count stay valid). Returns what changed, if anything."""
    if plan.world_size == world_size:
        return None
    global_batch, before = plan.effective_batch, plan.world_size
    per_device, remainder = divmod(global_batch, world_size)
    if remainder:
        raise UserError(f"this run's global batch of {global_batch} cannot be split evenly over {world_size} "
                        f"processes; resume it on a number of processes that divides {global_batch}")
    # The largest micro-batch that divides the share and is no larger than the one known to fit.
    plan.batch_size = max(b for b in range(1, min(plan.batch_size, per_device) + 1) if per_device % b == 0)
    plan.accumulation = per_device // plan.batch_size
    plan.world_size = world_size
    plan.sync_batchnorm, plan.reasons["sync_batchnorm"] = choose_sync_batchnorm(plan.batch_size, world_size)
    return (f"the run started on {before} process(es) and continues on {world_size}: {plan.batch_size} per device"
            f" × {plan.accumulation} accumulated × {world_size} = the same global batch of {global_batch}")


def power_of_two_at_most(n: float) -> int:
    return 2 ** int(math.floor(math.log2(max(n, 1))))


def make_plan(
    short_sides: list[int],
    skipped: int,
    hw: Hardware,
    over: Overrides,
    probe: Callable[[StepSetting], float],
    data_cost: Callable[[int, str], float] = lambda size, augment_on: 0.0,
    world_size: int = 1,
) -> Plan:
    """Choose everything. `probe(setting)` times one training step (seconds) or raises OutOfMemory;
    `data_cost(size, augment_on)` is the measured loader time of one image at that size in one process. With `world_size`
    processes, `hw` is one process's share of the machine and the batch is per device."""
    images = len(short_sides)
    if images < MIN_IMAGES:
        raise UserError(f"only {images} usable images; training needs at least {MIN_IMAGES}")
    reasons: dict[str, str] = {}

    def pick(name, override, chosen):
        value, why = chosen() if override is None else (override, "set by flag")
        reasons[name] = why
        return value

    image_size = pick("image_size", over.image_size, lambda: choose_image_size(short_sides, hw))
    backbone = pick("backbone", over.backbone, lambda: choose_backbone(images, image_size, hw))
    stem = pick("stem", over.stem, lambda: choose_stem(image_size, hw))
    precision = pick("precision", over.precision, lambda: choose_precision(hw))
    workers = pick("workers", over.workers, lambda: choose_workers(hw))
    if hw.kind == "cpu" and hw.bf16 and over.precision is None:
        batch = min(CPU_BATCH, max(MIN_BATCH, power_of_two_at_most(images / 8)))
        timed = {p: probe(StepSetting(backbone, image_size, batch, p, True, stem)) for p in ("fp32", "bf16")}
        # A few timed steps on a busy machine are noisy: fp32, the safer numerics,
        # keeps the job unless bf16 is clearly faster.
        precision = "bf16" if timed["bf16"] * BF16_MARGIN < timed["fp32"] else "fp32"
        reasons["precision"] = (f"timed on this CPU: fp32 {batch / timed['fp32']:.0f}, "
                                f"bf16 {batch / timed['bf16']:.0f} images/s (bf16 must win by 15%)")
    fits, reasons["in_memory"] = choose_in_memory(images, image_size, hw)
    augment_on = pick("augment_on", over.augment_on, lambda: choose_augment_on(image_size, hw, fits))
    in_memory = fits and augment_on == "device"
    if fits and not in_memory:
        reasons["in_memory"] = "--augment-on cpu decodes in loader processes"
    if precision == "bf16" and hw.kind == "cpu" and not hw.bf16 and over.precision:
        reasons["precision"] += " (warning: this CPU emulates bf16, expect a large slowdown)"
    # NHWC feeds tensor cores on CUDA and AMX's bf16 kernels on CPU (measured 1.5x at 64 px
    # here). In fp32 on CPU its batch norm is far faster on small feature maps, which made the
    # whole 32 px step 1.04x faster (benchmarks/joint_pass.py).
    channels_last = hw.kind in ("cuda", "cpu")

    # At least 8 steps per epoch, but never a batch so small that batch norm is noise.
    cap = max(MIN_BATCH, min(MAX_BATCH, power_of_two_at_most(images / 8 / world_size)))
    # The probe runs the step as training will: views made where training makes them, beside the
    # decoded images that a GPU keeps in its memory.
    resident = decoded_bytes(images, image_size) if in_memory and hw.kind == "cuda" else 0
    resident = resident if resident < GPU_RESIDENT_SHARE * hw.free_memory else 0

    def timed(batch: int) -> float:
        return probe(StepSetting(backbone, image_size, batch, precision, channels_last, stem, augment_on, resident,
                                 world_size > 1))

    if over.batch_size is not None:
        batch = over.batch_size
        step_seconds = timed(batch)
        reasons["batch_size"] = "set by flag"
    elif hw.kind == "cpu":
        batch = min(CPU_BATCH, cap)
        step_seconds = timed(batch)
        reasons["batch_size"] = "CPU runs are time-bound: more optimizer steps beat a larger batch"
    else:
        side = image_size * STEM_SCALE[stem] / 224
        per_image = BYTES_PER_IMAGE_224[backbone] * side**2 * (0.6 if precision != "fp32" else 1)
        start = min(cap, power_of_two_at_most(max(0, hw.free_memory - resident) * MEMORY_MARGIN / per_image))
        batch, step_seconds = fit_batch(start, cap, timed)
        reasons["batch_size"] = f"largest that fit in probed steps (searched from {start}, capped at {cap})"
    if batch * world_size > images:
        raise UserError(f"a batch of {batch} per process × {world_size} processes is more than the {images} images found"
                        if world_size > 1 else f"--batch-size {batch} is larger than the {images} images found")

    accumulation = 1
    devices_batch = batch * world_size
    if hw.kind != "cpu" and devices_batch < 128 and over.batch_size is None and batch < cap:
        accumulation = max(1, min(EFFECTIVE_BATCH // devices_batch, images // devices_batch // 8 or 1))
        reasons["accumulation"] = (f"memory allows {devices_batch} per step; accumulate to "
                                   f"{devices_batch * accumulation} (BYOL degrades below 256)")
    else:
        reasons["accumulation"] = "not needed"

    if not in_memory and over.workers is None:
        workers, why = fit_workers_to_shared_memory(workers, batch, image_size, augment_on, hw)
        reasons["workers"] = why or reasons["workers"]
    data_seconds = 0.0 if in_memory else data_cost(image_size, augment_on) * batch / max(workers, 1)
    # Loader processes overlap with the step; without them decoding runs in between.
    micro_step = max(step_seconds, data_seconds) if workers else step_seconds + data_seconds
    seconds_per_step = micro_step * accumulation
    global_batch = batch * accumulation * world_size
    steps_per_epoch = max(1, images // global_batch)

    if over.epochs is not None:
        total_steps = over.epochs * steps_per_epoch
        reasons["epochs"] = "set by flag"
    elif over.time_budget is not None:
        total_steps = max(1, int(over.time_budget / seconds_per_step))
        reasons["epochs"] = f"what fits in the {format_seconds(over.time_budget)} budget at the measured step time"
    else:
        total_steps = DEFAULT_EPOCHS * steps_per_epoch
        reasons["epochs"] = f"default {DEFAULT_EPOCHS} epochs (set --time or --epochs)"
    epochs = total_steps / steps_per_epoch

    base_lr = over.lr if over.lr is not None else base_lr_for(epochs)
    reasons["lr"] = "set by flag" if over.lr is not None else f"base {base_lr} for a {epochs:.3g}-epoch run, × global batch/256"
    sync_batchnorm, reasons["sync_batchnorm"] = choose_sync_batchnorm(batch, world_size)
    reasons["init"] = "set by flag" if over.init else "random (--init imagenet or --init ENCODER to start from weights)"
    tau_base, reasons["tau_base"] = tau_for(epochs, total_steps)
    warmup = max(1, min(10 * steps_per_epoch, total_steps // 10))

    return Plan(
        device=hw.device, device_name=hw.name, backbone=backbone, image_size=image_size,
        batch_size=batch, accumulation=accumulation, precision=precision, workers=workers,
        channels_last=channels_last, images=images, skipped=skipped,
        steps_per_epoch=steps_per_epoch, total_steps=total_steps, epochs=round(epochs, 3),
        warmup_steps=warmup, base_lr=base_lr, lr=base_lr * global_batch / 256,
        tau_base=tau_base, weight_decay=WEIGHT_DECAY, seed=over.seed,
        step_seconds=seconds_per_step, time_budget=over.time_budget, reasons=reasons, augment_on=augment_on, in_memory=in_memory, init=over.init,
        world_size=world_size, sync_batchnorm=sync_batchnorm, stem=stem,
    )


def refit_to_budget(plan: Plan, steps_done: int, seconds_left: float, step_seconds: float) -> None:
    """Re-plan the run's length from the step time measured in real training.

    The probe times the model alone; real steps also pay for data loading and
    share the CPU with it, so the first estimate can be off by 20% or more.
    """
    total = steps_done + max(0, int(seconds_left / step_seconds))
    plan.total_steps = max(total, steps_done + 1)
    plan.epochs = round(plan.total_steps / plan.steps_per_epoch, 3)
    plan.warmup_steps = max(1, min(10 * plan.steps_per_epoch, plan.total_steps // 10))
    plan.tau_base, plan.reasons["tau_base"] = tau_for(plan.epochs, plan.total_steps)
    plan.step_seconds = step_seconds
    plan.reasons["epochs"] = (f"what fits in the {format_seconds(plan.time_budget)} budget at "
                              f"{step_seconds:.2f} s per step, measured in the first training steps")


def short_run_warning(plan: Plan) -> str | None:
    """What to tell the user before a run too short to be worth its time, or None."""
    if plan.init or plan.epochs >= USEFUL_EPOCHS:
        return None
    needed = USEFUL_EPOCHS * plan.steps_per_epoch * plan.step_seconds
    return (f"this plan trains {plan.epochs:.3g} epochs: too few to expect features better than an untrained "
            f"network's (measured: no run of up to 18 epochs beat it on kNN, a {USEFUL_EPOCHS}-epoch run did; "
            f"README). Give it --time {format_seconds(needed)} or more at this speed"
            f"{'' if plan.device.startswith('cuda') else ', a GPU'}, or --init imagenet")


def format_seconds(seconds: float) -> str:
    seconds = int(round(seconds))
    if seconds < 90:
        return f"{seconds}s"
    minutes, s = divmod(seconds, 60)
    if minutes < 90:
        return f"{minutes}m{s:02d}s"
    hours, m = divmod(minutes, 60)
    return f"{hours}h{m:02d}m"


# --- measuring on the real device ------------------------------------------------


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


# How an allocation failure reads: torch's own, and those of the libraries it calls (MPS raises a plain
# RuntimeError saying "out of memory" too).
OUT_OF_MEMORY = ("out of memory", "cublas_status_alloc_failed", "cudnn_status_alloc_failed",
                 "cudnn_status_internal_error", "cudnn_status_execution_failed")


def is_out_of_memory(exc: BaseException) -> bool:
    text = str(exc).lower()
    return any(sign in text for sign in OUT_OF_MEMORY)


def _time_steps(hw: Hardware, device, setting: StepSetting, steps: int) -> float:
    import torch

    from byolcli.augment import byol_views
    from byolcli.model import BYOL
    from byolcli.optim import LARS, lars_groups

    if device.type == "cuda":
        torch.backends.cudnn.benchmark = True
    size, batch, precision, channels_last = setting.image_size, setting.batch, setting.precision, setting.channels_last
    augment_on = setting.augment_on
    held = torch.empty(setting.resident, dtype=torch.uint8, device=device)  # noqa: F841 - what training keeps
    model = BYOL(setting.backbone, setting.stem).to(device)
    trained = [p for p in model.parameters() if p.requires_grad]
    buckets = torch.empty(sum(p.numel() for p in trained) if setting.gradient_buckets else 0,  # noqa: F841
                          device=device)
    if channels_last:
        model = model.to(memory_format=torch.channels_last)
    optimizer = LARS(lars_groups(model.online_encoder, model.online_projector, model.predictor), lr=0.1)
    scaler = torch.amp.GradScaler(device.type, enabled=precision == "fp16")
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(precision)
    memory_format = torch.channels_last if channels_last else torch.contiguous_format
    if augment_on == "device":
        canvas = size * 3 // 2  # CanvasDataset's
        canvases = torch.randint(0, 256, (batch, 3, canvas, canvas), dtype=torch.uint8, device=device)
        sizes = torch.full((batch, 2), canvas, device=device)
    views = [torch.randn(batch, 3, size, size, device=device).contiguous(memory_format=memory_format)
             for _ in range(2)]
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    timings = []
    for _ in range(steps + 1):
        start = time.perf_counter()
        if augment_on == "device":
            views = [v.contiguous(memory_format=memory_format) for v in byol_views(canvases, sizes, size)]
        with mixed_precision(device.type, dtype):
            loss, _ = model(views[0], views[1])
        optimizer.zero_grad(set_to_none=True)
        scaler.scale(loss).backward()
        scaler.step(optimizer)
        scaler.update()
        model.update_target(0.99)
        synchronize(device)
        timings.append(time.perf_counter() - start)
    if memory_held(device) > MEMORY_MARGIN * hw.total_memory:
        raise OutOfMemory(f"batch {batch} peaks above {MEMORY_MARGIN:.0%} of the device's memory")
    return statistics.median(timings[1:])


def memory_held(device) -> int:
    """Bytes the step kept from the rest of the device: on CUDA what the allocator reserved at its
    peak (what it allocated, plus the cache it cannot hand out elsewhere); on MPS what the driver
    holds, since unified memory swaps instead of failing when it runs short."""
    import torch

    if device.type == "cuda":
        return torch.cuda.max_memory_reserved(device)
    if device.type == "mps":
        return torch.mps.driver_allocated_memory()
    return 0


def release_cached_memory(device) -> None:
    import torch

    if device.type == "cuda":
        torch.cuda.empty_cache()
    elif device.type == "mps":
        torch.mps.empty_cache()


def synchronize(device) -> None:
    import torch

    if device.type == "cuda":
        torch.cuda.synchronize(device)
    elif device.type == "mps":
        torch.mps.synchronize()
