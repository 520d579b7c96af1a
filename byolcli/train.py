"""`byol train`: scan → plan → BYOL training loop → encoder.safetensors.

The loop does what the paper does (Grill et al. 2020, Algorithm 1): per step,
two augmented views, the symmetrised loss, a LARS step on the online network
and predictor, then one EMA step of the target network. With gradient
accumulation, the optimizer and the target step once per accumulated batch.

With several processes (distributed.py) each trains on its shard of every
global batch under DistributedDataParallel: gradients are averaged, so the
online weights, and with them the EMA target, stay identical on every rank.
"""

from __future__ import annotations

import json
import math
import random
import shutil
import signal
import time
from contextlib import ExitStack, nullcontext, suppress
from dataclasses import dataclass, field, replace
from datetime import datetime
from pathlib import Path
from typing import Callable

import torch
import torch.nn.functional as F
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data import DataLoader

from byolcli import distributed
from byolcli.augment import byol_views
from byolcli.data import (MEAN, STD, CanvasDataset, EpochSampler, MemoryBatches, TwoViewDataset, decode_canvases,
                          item_seed)
from byolcli.distributed import World, per_rank_device, synchronise_batchnorm
from byolcli.encoder import load_encoder, read_metadata, save_encoder
from byolcli.errors import Stopped, TrainingFailed, UserError
from byolcli.files import atomic_path, atomic_write_text, check_outside_input, default_run_dir, write_failed
from byolcli.locks import exclusive
from byolcli.model import BYOL, pretrained_backbone
from byolcli.names import read_names, write_names
from byolcli.optim import LARS, ema_rate, lars_groups, learning_rate
from byolcli.plan import (GPU_RESIDENT_SHARE, LOADER_PREFETCH, Overrides, Plan, detect_hardware, fit_to_world,
                          is_out_of_memory, make_plan, mixed_precision, probe_step, refit_to_budget,
                          release_cached_memory, short_run_warning, usable_cores, use_device)
from byolcli.scan import scan
from byolcli.signals import StopRequests

CHECKPOINT = "checkpoint.pt"
ENCODER = "encoder.safetensors"
PLAN = "plan.json"
METRICS = "metrics.jsonl"
IMAGES = "images.txt"
LOCK = ".lock"

# With a time budget, the loop is timed over these steps (the first ones run slow
# while the loader and the kernels warm up) and the run's length re-planned.
CALIBRATION = (10, 40)

# The loss scaler halves its scale at each fp16 overflow: this many in a row means it cannot
# find a scale that fits (from its start of 2^16, down to 2^-9), not a passing spike.
OVERFLOWS_IN_A_ROW = 25

# Normalised projections of a healthy network spread over many directions; a
# collapsed one maps every image to (nearly) the same point.
COLLAPSE_STD = 0.05  # per-dimension std × √d; ≈1 for spread-out vectors, → 0 at collapse
COLLAPSE_RANK = 1.5  # effective rank of a batch's projections


@dataclass
class TrainRequest:
    folder: Path
    choices: Overrides = field(default_factory=Overrides)  # what the user pinned by flag
    out: Path | None = None
    restart: bool = False
    checkpoint_every: float = 300.0  # seconds between checkpoints
    log_every: float = 10.0  # seconds between metrics lines


@dataclass
class Trainer:
    """The model, optimizer and data for one Plan; its state is the checkpoint."""

    plan: Plan
    paths: list[Path]
    world: World = field(default_factory=World)
    decode_progress: Callable[[int, int], None] | None = field(default=None, repr=False)  # for in-memory plans
    start_from: dict | None = field(default=None, repr=False)  # a checkpoint to continue
    step: int = 0
    stop_requested: int = 0  # the stop signal (SIGINT, SIGTERM) this process saw; 0 for none
    stopping: int = 0  # ... agreed on by every process: stop after this step, exit with this signal
    warned_collapse: bool = field(default=False, repr=False)
    _batches: object = field(default=None, repr=False)  # the epoch's batch iterator, and the step it is at
    _batches_at: int = field(default=-1, repr=False)

    def __post_init__(self) -> None:
        plan, world = self.plan, self.world
        torch.manual_seed(plan.seed)  # the same initial weights on every rank
        random.seed(plan.seed)
        self.device = torch.device(per_rank_device(plan.device, world))
        use_device(self.device, plan.precision)
        if self.device.type == "cpu":
            # Loader processes and training threads must not outnumber the
            # cores: OpenMP threads that get preempted stall each other.
            cores = max(1, usable_cores() // world.local_size)
            busy_loading = 0 if plan.in_memory else plan.workers  # in memory, workers only decode up front
            torch.set_num_threads(max(1, cores - busy_loading))
        self.memory_format = torch.channels_last if plan.channels_last else torch.contiguous_format
        self.model = BYOL(plan.backbone, plan.stem)
        if plan.init and self.start_from is None:
            self.model.start_from(initial_weights(plan.init, plan.backbone))
        if plan.sync_batchnorm and world.size > 1:
            synchronise_batchnorm(self.model)
        self.model.to(self.device, memory_format=self.memory_format)
        # What the loop calls: the model itself, or DDP around it, which averages the
        # online gradients across ranks (the target has none: it is never trained).
        self.forward = self.model
        if world.size > 1:
            self.forward = DistributedDataParallel(
                self.model, device_ids=[self.device.index] if self.device.type == "cuda" else None)
        self.optimizer = LARS(
            lars_groups(self.model.online_encoder, self.model.online_projector, self.model.predictor),
            lr=plan.lr, weight_decay=plan.weight_decay,
        )
        self.autocast_dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(plan.precision)
        self.scaler = torch.amp.GradScaler(self.device.type, enabled=plan.precision == "fp16")
        self.sampler = EpochSampler(len(self.paths), plan.seed, world.rank, world.size)
        self.augment_on_device = plan.augment_on == "device"
        self.loader = self._make_loader()
        if self.device.type == "cuda":
            torch.backends.cudnn.benchmark = True
        self._split_random_streams()
        if self.start_from is not None:
            self.load_state_dict(self.start_from)
            self.start_from = None

    def _split_random_streams(self) -> None:
        """Give each rank its own random stream once the shared initial weights are drawn: batched
        augmentation draws from it, and ranks drawing alike would crop their images alike."""
        if self.world.size > 1:
            torch.manual_seed(item_seed(self.plan.seed, self.step, self.world.rank))

    def _make_loader(self):
        plan, workers = self.plan, self.plan.workers
        if plan.in_memory:
            canvases, sizes = decode_canvases(self.paths, plan.image_size, workers, self.decode_progress)
            on_gpu = self.device.type == "cuda" and fits_on_gpu(self.device, canvases.numel())
            if on_gpu:
                canvases, sizes = canvases.to(self.device), sizes.to(self.device)  # batches never cross the bus
            return MemoryBatches(canvases, sizes, self.sampler, plan.batch_size, pin=self.device.type == "cuda"
                                 and not on_gpu)
        dataset = CanvasDataset(self.paths, plan.image_size) if self.augment_on_device else \
            TwoViewDataset(self.paths, plan.image_size, plan.seed)
        return DataLoader(
            dataset,
            batch_size=plan.batch_size,
            sampler=self.sampler,
            num_workers=workers,
            pin_memory=self.device.type == "cuda",
            drop_last=True,
            persistent_workers=workers > 0,
            prefetch_factor=LOADER_PREFETCH if workers > 0 else None,
            generator=torch.Generator().manual_seed(plan.seed),
        )

    # --- state ---------------------------------------------------------------

    def state_dict(self) -> dict:
        rng = {"torch": torch.get_rng_state(), "python": random.getstate()}
        if self.device.type == "cuda":
            rng["cuda"] = torch.cuda.get_rng_state(self.device)
        return {
            "step": self.step,
            "plan": self.plan.to_dict(),
            "model": self.model.state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "scaler": self.scaler.state_dict(),
            "rng": rng,
        }

    def load_state_dict(self, state: dict) -> None:
        self.step = state["step"]
        self.model.load_state_dict(state["model"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.scaler.load_state_dict(state["scaler"])
        torch.set_rng_state(state["rng"]["torch"])
        random.setstate(_as_python_rng_state(state["rng"]["python"]))
        if "cuda" in state["rng"] and self.device.type == "cuda":
            torch.cuda.set_rng_state(state["rng"]["cuda"], self.device)
        self._split_random_streams()  # the checkpoint holds rank 0's stream only

    def save(self, path: Path) -> None:
        with atomic_path(path) as tmp, open(tmp, "wb") as file:
            torch.save(self.state_dict(), file)  # through a Python file, a failed write keeps its OSError

    # --- the loop ------------------------------------------------------------

    def run(self, until: int, on_log=None, on_checkpoint=None, log_every: float = 10.0,
            checkpoint_every: float = 300.0) -> None:
        """Train up to optimizer step `until`. `on_log(record)` gets a metrics dict;
        `on_checkpoint(step)` is called whenever it is time to save.

        Every `log_every` seconds the ranks meet to agree on the loss and on
        whether to stop. One process meets by the clock; several meet after a
        number of steps that each meeting sets from the steps' mean duration,
        measured on every rank and agreed on, since each rank's clock differs and
        all must join the same collective.
        """
        plan, model = self.plan, self.model
        model.train()
        accumulation = plan.accumulation
        distributed_run = self.world.size > 1
        next_meeting = self.step + 1  # the first meeting measures the step time
        # Since the last meeting: the sum of the losses and the overflowed micro-steps; and the overflows in a row.
        totals = torch.zeros(3, device=self.device)
        window = {"steps": 0, "wait": 0.0, "start": time.perf_counter()}
        last_log = last_checkpoint = time.perf_counter()
        while self.step < until and not self.stopping:
            epoch, offset = divmod(self.step, plan.steps_per_epoch)
            # One iterator per epoch, kept across calls (the time-budget calibration stops and goes on):
            # a new one would throw away what persistent loader workers have prefetched.
            if self._batches is None or self._batches_at != self.step or offset == 0:
                self.sampler.set_position(epoch, offset * plan.effective_batch)
                self._batches = iter(self.loader)
            batches = self._batches
            for _ in range(plan.steps_per_epoch - offset):
                lr = learning_rate(self.step, plan.total_steps, plan.warmup_steps, plan.lr)
                tau = ema_rate(self.step, plan.total_steps, plan.tau_base)
                for group in self.optimizer.param_groups:
                    group["lr"] = lr
                for micro in range(accumulation):
                    waited = time.perf_counter()
                    batch = next(batches)
                    loaded = time.perf_counter()
                    view1, view2 = self._views(batch)
                    # On a GPU the views are queued work, not a wait for data; on a CPU making them is
                    # time not spent training.
                    window["wait"] += (loaded if self.device.type == "cuda" else time.perf_counter()) - waited
                    # Gradients are averaged across ranks once per optimizer step, not per micro-batch.
                    last = micro == accumulation - 1
                    with self.forward.no_sync() if distributed_run and not last else nullcontext():
                        with mixed_precision(self.device.type, self.autocast_dtype):
                            loss, projections = self.forward(view1, view2)
                        self.scaler.scale(loss / accumulation).backward()
                    self._add_loss(totals, loss.detach())
                self.scaler.step(self.optimizer)
                self.scaler.update()
                self.optimizer.zero_grad(set_to_none=True)
                model.update_target(tau)
                self.step += 1
                self._batches_at = self.step
                window["steps"] += 1

                now = time.perf_counter()
                finished = self.step >= until
                meet = finished or (self.step >= next_meeting if distributed_run else
                                    now - last_log >= log_every or self.stop_requested)
                if meet:
                    loss, step_seconds, overflowed = self._agree(totals, window["steps"], now - window["start"], lr)
                    next_meeting = self.step + max(1, int(log_every / max(step_seconds, 1e-6)))
                    if on_log:
                        on_log(self._log_record(loss, window, projections, lr, tau, now, overflowed))
                    totals[:2].zero_()
                    window = {"steps": 0, "wait": 0.0, "start": now}
                    last_log = now
                if on_checkpoint and (now - last_checkpoint >= checkpoint_every or finished or self.stopping):
                    on_checkpoint(self.step)
                    last_checkpoint = now
                if finished or self.stopping:
                    break

    def _views(self, batch) -> tuple[torch.Tensor, torch.Tensor]:
        first, second = (t.to(self.device, non_blocking=True) for t in batch)
        if self.augment_on_device:  # first: uint8 canvases, second: original sizes
            first, second = byol_views(first, second, self.plan.image_size)
        return (first.contiguous(memory_format=self.memory_format),
                second.contiguous(memory_format=self.memory_format))

    def _add_loss(self, totals: torch.Tensor, loss: torch.Tensor) -> None:
        """Count a micro-step's loss, on the device (no sync per step). Under fp16 loss scaling a
        non-finite loss is an overflow the scaler answers by skipping the step and lowering its
        scale, so it is counted apart; only a run of nothing but overflows fails (_agree)."""
        if self.scaler.is_enabled():
            overflowed = ~torch.isfinite(loss)
            totals[1] += overflowed
            totals[2] = (totals[2] + 1) * overflowed
            loss = loss.masked_fill(overflowed, 0)
        totals[0] += loss

    def _agree(self, totals: torch.Tensor, steps: int, seconds: float, lr: float) -> tuple[float, float, int]:
        """(mean loss, mean seconds per step, overflowed micro-steps) over all ranks since the last
        meeting; sets `stopping` if any rank saw a stop signal (SIGTERM over SIGINT when ranks saw
        different ones)."""
        seen = [float(self.stop_requested == signum) for signum in (signal.SIGTERM, signal.SIGINT)]
        shared = torch.cat([totals, totals.new_tensor([seconds, *seen])])
        distributed.sum_across(self.world, shared)
        total, overflowed, in_a_row, seconds_sum, terms, interrupts = shared.tolist()
        self.stopping = signal.SIGTERM if terms else signal.SIGINT if interrupts else 0
        counted = steps * self.plan.accumulation * self.world.size - overflowed
        if in_a_row / self.world.size >= OVERFLOWS_IN_A_ROW:
            loss = math.nan
        elif not counted:  # a few skipped steps in a row, all of this window's: normal under loss scaling
            return None, seconds_sum / (self.world.size * steps), int(overflowed)
        else:
            loss = total / counted
        if not math.isfinite(loss):
            raise TrainingFailed(
                f"the loss became {loss} at step {self.step} (learning rate {lr:.3g}); training stopped and "
                "the last good checkpoint is kept. Rerun with a lower --lr, or --precision fp32"
            )
        return loss, seconds_sum / (self.world.size * steps), int(overflowed)

    def _log_record(self, loss, window, projections, lr, tau, now, overflowed) -> dict:
        steps = window["steps"]
        elapsed = max(now - window["start"], 1e-9)
        spread, rank = projection_health(projections)
        return {
            "step": self.step,
            "epoch": round(self.step / self.plan.steps_per_epoch, 3),
            "loss": None if loss is None else round(loss, 5),  # None: every step since the last was skipped
            "lr": round(lr, 6),
            "tau": round(tau, 6),
            "images_per_s": round(steps * self.plan.effective_batch / elapsed, 2),
            "data_wait": round(min(1.0, window["wait"] / elapsed), 4),
            "projection_std": round(spread, 4),
            "effective_rank": round(rank, 2),
            "collapsed": spread < COLLAPSE_STD or rank < COLLAPSE_RANK,
            "overflowed_steps": overflowed,  # fp16 steps the loss scaler skipped
            "time": datetime.now().isoformat(timespec="seconds"),
        }


def fits_on_gpu(device: torch.device, nbytes: int) -> bool:
    """Whether decoded images of `nbytes` may stay in GPU memory: a share of what is free there
    now (other processes may hold much of it), leaving the rest to training."""
    return nbytes < GPU_RESIDENT_SHARE * torch.cuda.mem_get_info(device)[0]


def initial_weights(init: str, architecture: str) -> dict:
    """The backbone weights `--init` names: torchvision's ImageNet ones, or an exported encoder's."""
    if init == "imagenet":
        return pretrained_backbone(architecture).state_dict()
    return load_encoder(init).state_dict()


def projection_health(projections: torch.Tensor) -> tuple[float, float]:
    """(per-dimension std of L2-normalised projections × √d, effective rank) of one batch.

    Effective rank (Roy & Vetterli 2007): exp of the entropy of the normalised
    singular values; 1 when every image maps to one direction.
    """
    # On the CPU: one small copy per log line, and MPS has no SVD in the torch versions byolcli takes.
    z = F.normalize(projections.detach().float().cpu(), dim=1)
    spread = z.std(dim=0).mean().item() * math.sqrt(z.shape[1])
    singular = torch.linalg.svdvals(z - z.mean(dim=0))
    p = singular / singular.sum().clamp_min(1e-12)
    rank = math.exp(-(p * torch.log(p.clamp_min(1e-12))).sum().item())
    return spread, rank


def _as_python_rng_state(state):
    # torch.load returns lists where random.getstate() had tuples.
    version, internal, gauss = state
    return version, tuple(internal), gauss


# --- the command -----------------------------------------------------------------


def train_folder(request: TrainRequest, reporter) -> Path:
    """Run `byol train`: a new run, or the continuation of an interrupted one. Returns the encoder's path.

    Under torchrun every process runs this; rank 0 does all the scanning,
    planning, printing and writing, and the others follow what it shares.
    """
    world = World.from_env()
    distributed.start(world)
    if not world.is_main:
        from byolcli.report import Reporter

        reporter = Reporter(quiet=True, warnings=False)
    try:
        # `held`: the run folder's lock, taken by rank 0 once it knows the folder, until the encoder is written.
        with distributed.collective_errors(world), ExitStack() as held:
            return _train_folder(request, reporter, world, held)
    finally:
        distributed.stop(world)


def _train_folder(request: TrainRequest, reporter, world: World, held: ExitStack) -> Path:
    def prepare():
        overrides = _validate(request.choices)  # before anything is scanned, moved or written
        with reporter.progress("checking images") as progress:
            manifest = scan(request.folder, progress=progress)
        out = Path(request.out) if request.out else default_run_dir(request.folder)
        check_outside_input(out, manifest.root)
        held.enter_context(exclusive(out / LOCK, out))
        if request.restart:
            _move_aside(out, reporter)

        state = _load_checkpoint(out / CHECKPOINT) if (out / CHECKPOINT).exists() else None
        if state is not None:
            plan, paths = _resume(state, manifest.root, out, overrides, reporter, world)
            _truncate_metrics(out / METRICS, state["step"])
        else:
            plan, paths = _plan_new_run(manifest, out, overrides, reporter, world)

        from byolcli.report import plan_report

        plan_report(plan, manifest, out, reporter)
        warning = short_run_warning(plan) if state is None else None
        if warning:
            reporter.warn(warning)
        return plan, paths, state, out, str(manifest.root)

    # Scanned and planned once, on rank 0; every rank gets the same plan, files and checkpoint.
    plan, paths, state, out, root = distributed.share(world, prepare)
    while True:
        decoding = reporter.progress("decoding images into memory", unit="images") if plan.in_memory else nullcontext()
        with decoding as progress:
            trainer = Trainer(plan, paths, world, decode_progress=progress, start_from=state)
        if trainer.step >= plan.total_steps:
            break
        try:
            _train(trainer, out, request, reporter)
            break
        except RuntimeError as exc:
            if not (is_out_of_memory(exc) and world.size == 1 and plan.batch_size > 1):
                raise
        # Past the except block, so that the failed step's tensors are gone with its traceback.
        trainer = None
        release_cached_memory(torch.device(plan.device))
        state = _halve_batch(plan, out, reporter)

    encoder_path = out / ENCODER
    if world.is_main:
        save_encoder(
            trainer.model.online_encoder, encoder_path, architecture=plan.backbone, image_size=plan.image_size,
            mean=MEAN, std=STD, train_images=plan.images, epochs=plan.epochs, steps=trainer.step, source=root,
        )
        reporter.info(f"encoder written to {encoder_path}")
    distributed.barrier(world)  # nobody leaves before the encoder is written
    return encoder_path


def _plan_new_run(manifest, out: Path, overrides: Overrides, reporter, world: World) -> tuple[Plan, list[Path]]:
    hw = detect_hardware(overrides.device)
    if world.local_size > 1:  # the processes on this machine share its cores and memory
        hw = replace(hw, ram=hw.ram // world.local_size, cores=max(1, hw.cores // world.local_size),
                     shared_memory=hw.shared_memory // world.local_size)
    reporter.info(f"planning for {hw.name}: timing a few real training steps …")
    plan = make_plan(
        [min(image.width, image.height) for image in manifest.images], len(manifest.skipped), hw, overrides,
        probe=lambda setting: probe_step(hw, setting),
        data_cost=lambda size, augment_on: _time_decoding(manifest.absolute_paths(), size, augment_on),
        world_size=world.size,
    )
    if plan.init == "imagenet":
        pretrained_backbone(plan.backbone)  # downloaded here, once, before any rank needs the file
    out.mkdir(parents=True, exist_ok=True)
    atomic_write_text(out / IMAGES, write_names(image.path for image in manifest.images))
    atomic_write_text(out / PLAN, json.dumps(plan.to_dict(), indent=2))
    (out / METRICS).unlink(missing_ok=True)
    return plan, manifest.absolute_paths()


def _halve_batch(plan: Plan, out: Path, reporter) -> dict | None:
    """After running out of memory mid-run: half the batch, twice the accumulation (the same global
    batch, so the learning rate, the data order and the checkpoint stay valid). Returns the last
    checkpoint to continue from."""
    before = plan.batch_size
    plan.batch_size //= 2
    plan.accumulation *= 2
    plan.reasons["batch_size"] = f"{before} ran out of memory in training; halved"
    atomic_write_text(out / PLAN, json.dumps(plan.to_dict(), indent=2))
    state = _load_checkpoint(out / CHECKPOINT) if (out / CHECKPOINT).exists() else None
    _truncate_metrics(out / METRICS, state["step"] if state else 0)
    reporter.warn(f"out of memory at a batch of {before}: continuing with {plan.batch_size} × {plan.accumulation} "
                  f"accumulated (the same global batch of {plan.effective_batch}) from "
                  + (f"the checkpoint at step {state['step']:,}" if state else "the start"))
    return state


def _resume(state: dict, root: Path, out: Path, overrides: Overrides, reporter, world: World) -> tuple[Plan, list[Path]]:
    plan = Plan.from_dict(state["plan"])
    if state["step"] >= plan.total_steps and (out / ENCODER).exists():
        raise UserError(f"{out} already holds a finished run ({out / ENCODER}); "
                        "use --restart to train again or --out for a new run folder")
    _warn_changed_flags(overrides, plan, reporter)
    detect_hardware(plan.device)  # fails clearly if that device is gone
    # The image list the run started with: the sampler's order depends on it.
    paths = [root / name for name in read_names((out / IMAGES).read_text(encoding="utf-8"))]
    reporter.info(f"resuming the run in {out} from step {state['step']:,} of {plan.total_steps:,}")
    rescaled = fit_to_world(plan, world.size)
    if rescaled:
        reporter.info(rescaled)
        atomic_write_text(out / PLAN, json.dumps(plan.to_dict(), indent=2))
    return plan, paths


def _train(trainer: Trainer, out: Path, request: TrainRequest, reporter) -> None:
    """The loop with progress, metrics, checkpoints, Ctrl-C / SIGTERM handling and the budget re-plan.
    Only rank 0 writes; every rank runs the same steps."""
    from byolcli.report import training_progress

    plan, world = trainer.plan, trainer.world
    metrics = (out / METRICS).open("a", encoding="utf-8") if world.is_main else None

    def on_stop_request(signum: int) -> None:
        trainer.stop_requested = signum
        when = "after this step" if world.size == 1 else "at the next step all processes reach"
        again = " (Ctrl-C again to quit at once)" if world.size == 1 and signum == signal.SIGINT else ""
        reporter.warn(f"{signal.Signals(signum).name}: stopping {when} to save a checkpoint{again}")

    # Under a launcher a second signal is the launcher passing on the terminal's own.
    try:
        with StopRequests(on_stop_request, second_quits=world.size == 1), \
                training_progress(plan, trainer.step, reporter) as show:
            def on_log(record: dict) -> None:
                try:
                    metrics.write(json.dumps(record) + "\n")
                    metrics.flush()
                except OSError as exc:
                    raise write_failed(out / METRICS, exc) from exc
                show(record)
                if record["collapsed"] and not trainer.warned_collapse:
                    trainer.warned_collapse = True
                    reporter.warn(
                        f"the representation looks collapsed at step {record['step']} (projection spread "
                        f"{record['projection_std']}, effective rank {record['effective_rank']}): every image "
                        "maps to nearly the same vector. The learning rate may be too high (--lr)."
                    )

            def train_until(step: int) -> None:
                trainer.run(step, on_log=on_log if world.is_main else None,
                            on_checkpoint=(lambda _: trainer.save(out / CHECKPOINT)) if world.is_main else None,
                            log_every=request.log_every, checkpoint_every=request.checkpoint_every)

            warm, timed = CALIBRATION
            if plan.time_budget is not None and trainer.step == 0 and plan.total_steps > 2 * timed:
                started = time.perf_counter()
                train_until(warm)
                timing = time.perf_counter()
                train_until(timed)
                if not trainer.stopping:
                    # Rank 0's clock decides for all, so every rank re-plans the same length.
                    now = time.perf_counter()
                    seconds_left, step_seconds = distributed.share(
                        world, lambda: (plan.time_budget - (now - started), (now - timing) / (timed - warm)))
                    warned = short_run_warning(plan) is not None  # said before the first step
                    refit_to_budget(plan, trainer.step, seconds_left, step_seconds)
                    if world.is_main:
                        atomic_write_text(out / PLAN, json.dumps(plan.to_dict(), indent=2))
                    reporter.info(f"re-planned from the measured speed: {plan.total_steps:,} steps "
                                  f"({plan.epochs:g} epochs) at {plan.step_seconds:.2f} s per step")
                    warning = short_run_warning(plan)
                    if warning and not warned:
                        reporter.warn(warning)
            train_until(plan.total_steps)
    finally:
        if metrics:
            with suppress(OSError):  # a full disk was reported where it happened
                metrics.close()
    if trainer.stopping and trainer.step < plan.total_steps:  # a stop asked for at the last step changes nothing
        reporter.info(f"stopped at step {trainer.step:,}; checkpoint saved in {out}. "
                      "Run the same command again to resume.")
        raise Stopped(int(trainer.stopping))


def _load_checkpoint(path: Path) -> dict:
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # noqa: BLE001 - any unreadable checkpoint means the same to the user
        raise UserError(f"{path}: unreadable checkpoint ({str(exc).splitlines()[0][:120]}); "
                        "use --restart to start over") from None


def _truncate_metrics(path: Path, step: int) -> None:
    """Drop metrics lines logged after the checkpoint we resume from, and a line torn by a crash
    or a full disk."""
    if not path.exists():
        return
    kept = []
    for line in path.read_text(encoding="utf-8", errors="replace").splitlines():
        try:
            if json.loads(line)["step"] <= step:
                kept.append(line)
        except (ValueError, KeyError, TypeError):
            pass
    atomic_write_text(path, "".join(f"{line}\n" for line in kept))


def _move_aside(out: Path, reporter) -> None:
    """--restart: the previous run's files go to a sibling folder; the lock stays where it is held."""
    previous = [entry for entry in out.iterdir() if entry.name != LOCK]
    if not previous:
        return
    aside = out.with_name(f"{out.name}.old-{datetime.now():%Y%m%d-%H%M%S}")
    aside.mkdir()
    for entry in previous:
        shutil.move(str(entry), str(aside / entry.name))
    reporter.info(f"previous run moved to {aside}")


# Override name -> the Plan field it sets.
PLANNED_AS = {"time_budget": "time_budget", "backbone": "backbone", "image_size": "image_size",
              "batch_size": "batch_size", "lr": "base_lr", "workers": "workers", "precision": "precision",
              "augment_on": "augment_on", "init": "init", "stem": "stem", "seed": "seed"}


def _warn_changed_flags(over: Overrides, plan: Plan, reporter) -> None:
    """Rerunning the same command resumes silently; flags that would change the plan are named."""
    changed = [f"--{name.replace('_', '-')}" for name, field_name in PLANNED_AS.items()
               if getattr(over, name) is not None and getattr(over, name) != getattr(plan, field_name)]
    if over.epochs is not None and (plan.time_budget is not None or over.epochs != round(plan.epochs)):
        changed.append("--epochs")
    if over.device is not None and not plan.device.startswith(over.device):
        changed.append("--device")
    if changed:
        reporter.warn(f"resuming with the saved plan; {', '.join(changed)} differ from it and are ignored "
                      "(--restart to start a new run with them)")


def _validate(over: Overrides) -> Overrides:
    """Refuse contradictory or impossible flags; returns them with what --init implies filled in."""
    from byolcli.model import BACKBONES, STEMS

    if over.backbone is not None and over.backbone not in BACKBONES:
        raise UserError(f"--backbone {over.backbone}: choose one of {', '.join(BACKBONES)}")
    if over.precision is not None and over.precision not in ("fp32", "bf16", "fp16"):
        raise UserError(f"--precision {over.precision}: choose fp32, bf16 or fp16")
    for name in ("image_size", "batch_size", "epochs"):
        value = getattr(over, name)
        if value is not None and value < 1:
            raise UserError(f"--{name.replace('_', '-')} {value}: must be at least 1")
    if over.image_size is not None and over.image_size < 16:
        raise UserError(f"--image-size {over.image_size}: must be at least 16")
    if over.augment_on is not None and over.augment_on not in ("cpu", "device"):
        raise UserError(f"--augment-on {over.augment_on}: choose cpu or device")
    if over.workers is not None and over.workers < 0:
        raise UserError(f"--workers {over.workers}: must be 0 or more")
    if over.lr is not None and not over.lr > 0:
        raise UserError(f"--lr {over.lr}: must be positive")
    if over.epochs is not None and over.time_budget is not None:
        raise UserError("--epochs and --time both set: give one")
    if over.stem is not None and over.stem not in STEMS:
        raise UserError(f"--stem {over.stem}: choose {' or '.join(STEMS)}")
    if over.init == "imagenet":  # torchvision's weights come with its strided stem
        if over.stem not in (None, "standard"):
            raise UserError(f"--init imagenet has the standard stem; --stem {over.stem} does not match it")
        return replace(over, stem="standard")
    if over.init is not None:
        metadata = read_metadata(over.init)  # one-line error if not an encoder
        architecture, stem = metadata["architecture"], metadata["stem"]
        if over.backbone not in (None, architecture):
            raise UserError(f"--init {over.init} is a {architecture}; --backbone {over.backbone} does not match it")
        if over.stem not in (None, stem):
            raise UserError(f"--init {over.init} has the {stem} stem; --stem {over.stem} does not match it")
        return replace(over, backbone=architecture, stem=stem, init=str(Path(over.init).resolve()))
    return over


def _time_decoding(paths: list[Path], size: int, augment_on: str, samples: int = 16) -> float:
    """Seconds a loader process spends on one image at `size`, from a small sample."""
    sample = paths[:: max(1, len(paths) // samples)][:samples]
    dataset = CanvasDataset(sample, size) if augment_on == "device" else TwoViewDataset(sample, size)
    start = time.perf_counter()
    for index in range(len(dataset)):
        dataset[0, index]
    return (time.perf_counter() - start) / len(dataset)
