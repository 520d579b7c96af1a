"""The Plan: every training setting with its reason, assembled from the rules (rules.py) and the
probe's timings (probe.py). It is what the user sees before training and what `plan.json`
records; a resumed run re-fits it to its processes and a time budget to the measured speed."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from typing import Any, TypeVar

from byolcli.core.errors import UserError
from byolcli.core.hardware import Hardware
from byolcli.core.inputs import IMAGENET, IMAGENET_SIZE
from byolcli.core.loading import choose_workers, fit_workers_to_shared_memory
from byolcli.core.recipe import RECIPE
from byolcli.core.terminal import format_seconds
from byolcli.training.probe import StepSetting
from byolcli.training.rules import (
    choose_accumulation,
    choose_backbone,
    choose_base_lr,
    choose_batch,
    choose_data_path,
    choose_image_size,
    choose_length,
    choose_mix,
    choose_precision,
    choose_start,
    choose_stem,
    choose_sync_batchnorm,
    cpu_batch,
    decoding_bytes,
    loader_bytes,
    resident_bytes,
    start_image_size,
    step_time,
    tau_for,
    warmup_for,
)

T = TypeVar("T")

MIN_IMAGES = 16  # batch norm needs a batch; BYOL needs more than a handful of images to mean anything
USEFUL_EPOCHS = 40  # the shortest run measured to beat an untrained network on kNN (docs/experiments.md)


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
    # The schedule (set by schedule()): how long the run is and how fast it learns.
    total_steps: int = 0
    epochs: float = 0.0
    warmup_steps: int = 0
    base_lr: float = 0.0
    lr: float = 0.0
    tau_base: float = 0.0
    weight_decay: float = RECIPE.weight_decay
    seed: int = 0
    step_seconds: float = 0.0  # measured per optimizer step (compute, or data if slower)
    time_budget: float | None = None
    reasons: dict[str, str] = field(default_factory=dict)
    augment_on: str = "cpu"  # "cpu": loader processes; "device": batched on the training device
    in_memory: bool = False  # all images decoded once, before training (needs augment_on "device")
    init: str | None = None  # starting weights: "imagenet", a weights file's path, or None (random)
    world_size: int = 1  # processes training together, one per device
    sync_batchnorm: bool = False
    stem: str = "standard"  # the backbone's first layers (model.STEMS)
    mix: float = 1.0  # how far the exported encoder lies from its start toward the trained weights (candidates.py)
    start_size: int | None = None  # px the starting weights were trained at, where known

    @property
    def effective_batch(self) -> int:
        """Images per optimizer step, over all processes."""
        return self.batch_size * self.accumulation * self.world_size

    @property
    def estimated_seconds(self) -> float:
        return self.step_seconds * self.total_steps

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Plan:
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
    init: str | None = None  # None: ImageNet's weights where available (auto); "random", "imagenet" or a file
    start_size: int | None = None  # px the --init file's weights were trained at, where it records them
    stem: str | None = None
    mix: float | None = None
    seed: int = 0


def fit_to_world(plan: Plan, world_size: int) -> str | None:
    """Adapt a saved plan to a different number of processes, keeping its global batch (so its
    learning rate, epoch length and step count stay valid). Returns what changed, if anything."""
    if plan.world_size == world_size:
        return None
    global_batch, before = plan.effective_batch, plan.world_size
    per_device, remainder = divmod(global_batch, world_size)
    if remainder:
        raise UserError(
            f"this run's global batch of {global_batch} cannot be split evenly over {world_size} "
            f"processes; resume it on a number of processes that divides {global_batch}"
        )
    # The largest micro-batch that divides the share and is no larger than the one known to fit.
    plan.batch_size = max(b for b in range(1, min(plan.batch_size, per_device) + 1) if per_device % b == 0)
    plan.accumulation = per_device // plan.batch_size
    plan.world_size = world_size
    plan.sync_batchnorm, plan.reasons["sync_batchnorm"] = choose_sync_batchnorm(plan.batch_size, world_size)
    return (
        f"the run started on {before} process(es) and continues on {world_size}: {plan.batch_size} per device"
        f" × {plan.accumulation} accumulated × {world_size} = the same global batch of {global_batch}"
    )


def halve_batch(plan: Plan, to: int | None = None) -> None:
    """After running out of memory: half the per-device batch (or `to`), as much more accumulation,
    so that the global batch, and with it the learning rate, the data order and a checkpoint, stay
    valid."""
    before = plan.batch_size
    plan.batch_size = to or before // 2
    plan.accumulation *= before // plan.batch_size
    plan.reasons["batch_size"] = f"{before} ran out of memory in training; halved"
    plan.sync_batchnorm, plan.reasons["sync_batchnorm"] = choose_sync_batchnorm(plan.batch_size, plan.world_size)


def make_plan(
    short_sides: list[int],
    skipped: int,
    hw: Hardware,
    over: Overrides,
    probe: Callable[[StepSetting], float],
    data_cost: Callable[[int, str], float] = lambda size, augment_on: 0.0,
    world_size: int = 1,
    find_imagenet: Callable[[str], str | None] = lambda architecture: "ImageNet weights not looked for",
) -> Plan:
    """Choose everything. `probe(setting)` times one training step or raises OutOfMemory; `data_cost(size,
    augment_on)` is one image's loader seconds; `find_imagenet(architecture)` makes torchvision's ImageNet
    weights available and returns None, or says why they are not. `hw` is one of `world_size` processes'
    share; batches are per device."""
    images = len(short_sides)
    if images < MIN_IMAGES:
        raise UserError(f"only {images} usable images; training needs at least {MIN_IMAGES}")
    reasons: dict[str, str] = {}
    setting, init, workers, in_memory = choose_step(short_sides, hw, over, probe, world_size, reasons, find_imagenet)
    image_size, augment_on = setting.image_size, setting.augment_on
    batch, step_seconds, cap, reasons["batch_size"] = choose_batch(
        setting, images, hw, over.batch_size, probe, world_size
    )
    accumulation, reasons["accumulation"] = choose_accumulation(
        batch, cap, images, hw, over.batch_size is not None, world_size
    )
    if over.workers is None:
        # In memory, the loader processes only decode, once, but in larger batches.
        held = decoding_bytes(image_size) if in_memory else loader_bytes(batch, image_size, augment_on)
        workers, reasons["workers"] = fit_workers_to_shared_memory(workers, held, hw.shared_memory, reasons["workers"])
    data_seconds = 0.0 if in_memory else data_cost(image_size, augment_on) * batch / max(workers, 1)
    reasons["sync_batchnorm"] = choose_sync_batchnorm(batch, world_size)[1]
    plan = Plan(
        device=hw.device,
        device_name=hw.name,
        backbone=setting.backbone,
        image_size=image_size,
        batch_size=batch,
        accumulation=accumulation,
        precision=setting.precision,
        workers=workers,
        channels_last=setting.channels_last,
        images=images,
        skipped=skipped,
        steps_per_epoch=max(1, images // (batch * accumulation * world_size)),
        seed=over.seed,
        step_seconds=step_time(step_seconds, data_seconds, workers) * accumulation,
        time_budget=over.time_budget,
        reasons=reasons,
        augment_on=augment_on,
        in_memory=in_memory,
        init=init,
        world_size=world_size,
        sync_batchnorm=choose_sync_batchnorm(batch, world_size)[0],
        stem=setting.stem,
    )
    plan.start_size = over.start_size or (IMAGENET_SIZE if init == IMAGENET else None) if init else None
    schedule(plan, over.epochs, over.lr)
    if over.mix is not None and init is not None:
        plan.mix, reasons["mix"] = over.mix, "set by flag"
    else:
        plan.mix, reasons["mix"] = choose_mix(init is not None)
    return plan


def choose_step(
    short_sides: list[int],
    hw: Hardware,
    over: Overrides,
    probe: Callable[[StepSetting], float],
    world_size: int,
    reasons: dict[str, str],
    find_imagenet: Callable[[str], str | None],
) -> tuple[StepSetting, str | None, int, bool]:
    """What one training step runs (network, size, precision, where the views are made), as the
    probe will time it; the weights it starts from; and the loader workers and whether the images
    are decoded into memory."""
    images = len(short_sides)

    def pick(name: str, override: T | None, chosen: Callable[[], tuple[T, str]]) -> T:
        value, why = chosen() if override is None else (override, "set by flag")
        reasons[name] = why
        return value

    image_size = pick("image_size", over.image_size, lambda: choose_image_size(short_sides, hw))
    backbone = pick("backbone", over.backbone, lambda: choose_backbone(images, image_size, hw))
    stem = pick("stem", over.stem, lambda: choose_stem(image_size, hw))
    init, reasons["init"] = choose_start(over.init, backbone, stem, find_imagenet)
    if init is not None and over.image_size is None:
        trained_at = over.start_size or (IMAGENET_SIZE if init == IMAGENET else None)
        image_size, reasons["image_size"] = start_image_size(image_size, reasons["image_size"], trained_at, stem, hw)
    timing = StepSetting(backbone, image_size, cpu_batch(images), "", True, stem)  # how a CPU times precisions
    precision, reasons["precision"] = choose_precision(hw, over.precision, timing, probe)
    workers = pick("workers", over.workers, lambda: choose_workers(hw))
    augment_on, in_memory, reasons["augment_on"], reasons["in_memory"] = choose_data_path(
        images, image_size, hw, over.augment_on
    )
    # The probe runs the step as training will: views made where training makes them, beside the
    # decoded images that a GPU keeps in its memory.
    resident = resident_bytes(images, image_size, in_memory, hw)
    setting = StepSetting(
        backbone, image_size, 0, precision, hw.kind in ("cuda", "cpu"), stem, augment_on, resident, world_size > 1
    )
    return setting, init, workers, in_memory


def schedule(plan: Plan, epochs: int | None, lr: float | None) -> None:
    """The run's length (--epochs, --time at the measured step time, or the default), its warm-up,
    learning rate and EMA rate, set on `plan`."""
    reasons = plan.reasons
    started = plan.init is not None
    plan.total_steps, reasons["epochs"] = choose_length(
        epochs, plan.time_budget, plan.steps_per_epoch, plan.step_seconds, started
    )
    run_epochs = plan.total_steps / plan.steps_per_epoch
    plan.epochs = round(run_epochs, 3)
    plan.base_lr, reasons["lr"] = (lr, "set by flag") if lr is not None else choose_base_lr(run_epochs, started)
    plan.lr = plan.base_lr * plan.effective_batch / 256
    plan.tau_base, reasons["tau_base"] = tau_for(run_epochs, plan.total_steps, started)
    plan.warmup_steps = warmup_for(plan.steps_per_epoch, plan.total_steps)


def refit_to_budget(plan: Plan, steps_done: int, seconds_left: float, step_seconds: float) -> None:
    """Re-plan the run's length from the step time measured in real training, and with it the
    warm-up, the EMA rate and the learning rate (unless set by flag).

    The probe times the model alone; real steps also pay for data loading and
    share the CPU with it, so the first estimate can be far off.
    """
    budget = plan.time_budget
    assert budget is not None  # re-planned only under --time
    total = steps_done + max(0, int(seconds_left / step_seconds))
    plan.total_steps = max(total, steps_done + 1)
    plan.epochs = round(plan.total_steps / plan.steps_per_epoch, 3)
    plan.warmup_steps = warmup_for(plan.steps_per_epoch, plan.total_steps)
    started = plan.init is not None
    plan.tau_base, plan.reasons["tau_base"] = tau_for(plan.epochs, plan.total_steps, started)
    if plan.reasons.get("lr") != "set by flag":  # the run's length decides its learning rate, as in schedule()
        plan.base_lr, plan.reasons["lr"] = choose_base_lr(plan.epochs, started)
        plan.lr = plan.base_lr * plan.effective_batch / 256
    plan.step_seconds = step_seconds
    plan.reasons["epochs"] = (
        f"what fits in the {format_seconds(budget)} budget at "
        f"{step_seconds:.2f} s per step, measured in the first training steps"
    )


def short_run_warning(plan: Plan) -> str | None:
    """What to tell the user before a run too short to be worth its time, or None."""
    if plan.init or plan.epochs >= USEFUL_EPOCHS:
        return None
    needed = USEFUL_EPOCHS * plan.steps_per_epoch * plan.step_seconds
    return (
        f"this plan trains {plan.epochs:.3g} epochs: too few to expect features better than an untrained "
        f"network's (the shortest run measured to beat one on kNN trained {USEFUL_EPOCHS} epochs). "
        f"Give it --time {format_seconds(needed)} or more at this speed"
        f"{'' if plan.device.startswith('cuda') else ', a GPU'}, or start from weights: ImageNet weights in "
        "torch's cache, which the default --init auto takes, or --init FILE"
    )
