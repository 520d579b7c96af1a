"""The training engine: a BYOL model, its optimizer and data for one Plan, the loop, and the
checkpoint that is its state.

The loop does what the paper does (Grill et al. 2020, Algorithm 1): per step, two augmented
views, the symmetrised loss, a LARS step on the online network and predictor, then one EMA step
of the target network (step.py). With gradient accumulation, the optimizer and the target step
once per accumulated batch.

With several processes (distributed.py) each trains on its shard of every global batch under
DistributedDataParallel: gradients are averaged, so the online weights, and with them the EMA
target, stay identical on every rank.
"""

from __future__ import annotations

import math
import random
import signal
import time
from collections.abc import Callable, Iterable, Iterator
from contextlib import nullcontext
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data import DataLoader

from byolcli.core.errors import TrainingFailed, UserError
from byolcli.core.files import atomic_path
from byolcli.core.hardware import to_device, usable_cores, use_device
from byolcli.core.loading import LOADER_PREFETCH
from byolcli.core.start import start_weights
from byolcli.core.views import TwoViewDataset, item_seed
from byolcli.training import distributed
from byolcli.training.augment import byol_views
from byolcli.training.byol import BYOL
from byolcli.training.data import CanvasDataset, EpochSampler, MemoryBatches, decode_canvases
from byolcli.training.distributed import World, per_rank_device, synchronise_batchnorm
from byolcli.training.optim import ema_rate, learning_rate
from byolcli.training.plan import Plan
from byolcli.training.rules import GPU_RESIDENT_SHARE
from byolcli.training.step import ByolStep

# The loss scaler halves its scale at each fp16 overflow: this many in a row means it cannot
# find a scale that fits (from its start of 2^16, down to 2^-9), not a passing spike.
OVERFLOWS_IN_A_ROW = 25

# Normalised projections of a healthy network spread over many directions; a
# collapsed one maps every image to (nearly) the same point.
COLLAPSE_STD = 0.05  # per-dimension std × √d; ≈1 for spread-out vectors, → 0 at collapse
COLLAPSE_RANK = 1.5  # effective rank of a batch's projections

# What a loader yields: (uint8 canvases, original sizes) for views made on the device, else both views.
Batch = tuple[torch.Tensor, torch.Tensor]


@dataclass
class Window:
    """The steps since the ranks last met, the seconds of them spent waiting for data, and when it began."""

    start: float
    steps: int = 0
    wait: float = 0.0


@dataclass
class Counts:
    """What the loop counts on the device between two meetings of the ranks, never waiting for it:
    the sum of the finite losses and their number, the steps the fp16 loss scaler skipped; and the
    skipped steps in a row, which carries over from one window to the next."""

    loss_sum: torch.Tensor
    losses: torch.Tensor
    skipped: torch.Tensor
    skipped_in_a_row: torch.Tensor

    @classmethod
    def zeros(cls, device: torch.device) -> Counts:
        return cls(*(torch.zeros((), device=device) for _ in range(4)))

    def new_window(self) -> None:
        for count in (self.loss_sum, self.losses, self.skipped):
            count.zero_()

    def as_tensor(self) -> torch.Tensor:
        """All four in one tensor, in the order of the fields: what one all-reduce sums over ranks."""
        return torch.stack([self.loss_sum, self.losses, self.skipped, self.skipped_in_a_row])


@dataclass
class Trainer:
    """The model, optimizer and data for one Plan; its state is the checkpoint."""

    plan: Plan
    paths: list[Path]
    world: World = field(default_factory=World)
    decode_progress: Callable[[int, int], None] | None = field(default=None, repr=False)  # for in-memory plans
    start_from: dict[str, Any] | None = field(default=None, repr=False)  # a checkpoint to continue
    step: int = 0
    stop_requested: int = 0  # the stop signal (SIGINT, SIGTERM) this process saw; 0 for none
    stopping: int = 0  # ... agreed on by every process: stop after this step, exit with this signal
    warned_collapse: bool = field(default=False, repr=False)
    _batches: Iterator[Batch] | None = field(
        default=None, repr=False
    )  # the epoch's batch iterator, and the step it is at
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
            self.model.start_from(start_weights(plan.init, plan.backbone))
        if plan.sync_batchnorm and world.size > 1:
            synchronise_batchnorm(self.model)
        self.model.to(self.device)
        self.model.to(memory_format=self.memory_format)
        # What the step calls: the model itself, or DDP around it, which averages the
        # online gradients across ranks (the target has none: it is never trained).
        forward = None
        if world.size > 1:
            forward = DistributedDataParallel(
                self.model, device_ids=[self.device.index] if self.device.type == "cuda" else None
            )
        self.byol_step = ByolStep(self.model, plan.precision, self.device.type, plan.lr, plan.weight_decay, forward)
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

    def _make_loader(self) -> Iterable[Batch]:
        plan, workers = self.plan, self.plan.workers
        if plan.in_memory:
            canvases, sizes = decode_canvases(self.paths, plan.image_size, workers, self.decode_progress)
            on_gpu = self.device.type == "cuda" and fits_on_gpu(self.device, canvases.numel())
            if on_gpu:
                canvases, sizes = canvases.to(self.device), sizes.to(self.device)  # batches never cross the bus
            return MemoryBatches(
                canvases, sizes, self.sampler, plan.batch_size, pin=self.device.type == "cuda" and not on_gpu
            )
        dataset = (
            CanvasDataset(self.paths, plan.image_size)
            if self.augment_on_device
            else TwoViewDataset(self.paths, plan.image_size, plan.seed)
        )
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

    def state_dict(self) -> dict[str, Any]:
        rng = {"torch": torch.get_rng_state(), "python": random.getstate()}
        if self.device.type == "cuda":
            rng["cuda"] = torch.cuda.get_rng_state(self.device)
        return {
            "step": self.step,
            "plan": self.plan.to_dict(),
            "model": self.model.state_dict(),
            "optimizer": self.byol_step.optimizer.state_dict(),
            "scaler": self.byol_step.scaler.state_dict(),
            "rng": rng,
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.step = state["step"]
        self.model.load_state_dict(state["model"])
        self.byol_step.optimizer.load_state_dict(state["optimizer"])
        self.byol_step.scaler.load_state_dict(state["scaler"])
        torch.set_rng_state(state["rng"]["torch"])
        random.setstate(_as_python_rng_state(state["rng"]["python"]))
        if "cuda" in state["rng"] and self.device.type == "cuda":
            torch.cuda.set_rng_state(state["rng"]["cuda"], self.device)
        self._split_random_streams()  # the checkpoint holds rank 0's stream only

    def save(self, path: Path) -> None:
        with atomic_path(path) as tmp, open(tmp, "wb") as file:
            torch.save(self.state_dict(), file)  # through a Python file, a failed write keeps its OSError

    # --- the loop ------------------------------------------------------------

    def run(
        self,
        until: int,
        on_log: Callable[[dict[str, Any]], None] | None = None,
        on_checkpoint: Callable[[int], None] | None = None,
        log_every: float = 10.0,
        checkpoint_every: float = 300.0,
    ) -> None:
        """Train up to optimizer step `until`. `on_log(record)` gets a metrics dict;
        `on_checkpoint(step)` is called whenever it is time to save.

        Every `log_every` seconds the ranks meet to agree on the loss and on
        whether to stop. One process meets by the clock; several meet after a
        number of steps that each meeting sets from the steps' mean duration,
        measured on every rank and agreed on, since each rank's clock differs and
        all must join the same collective.
        """
        self.model.train()
        distributed_run = self.world.size > 1
        next_meeting = self.step + 1  # the first meeting measures the step time
        counts = Counts.zeros(self.device)
        window = Window(time.perf_counter())
        last_log = last_checkpoint = time.perf_counter()
        while self.step < until and not self.stopping:
            batches = self._epoch_batches()
            for _ in range(self.plan.steps_per_epoch - self.step % self.plan.steps_per_epoch):
                lr, tau, projections = self._train_step(batches, counts, window)
                now = time.perf_counter()
                finished = self.step >= until
                meet = finished or (
                    self.step >= next_meeting if distributed_run else now - last_log >= log_every or self.stop_requested
                )
                if meet:
                    loss, step_seconds, overflowed = self._agree(counts, window.steps, now - window.start, lr)
                    next_meeting = self.step + max(1, int(log_every / max(step_seconds, 1e-6)))
                    if on_log:
                        on_log(self._log_record(loss, window, projections, lr, tau, now, overflowed))
                    counts.new_window()
                    window = Window(now)
                    last_log = now
                if on_checkpoint and (now - last_checkpoint >= checkpoint_every or finished or self.stopping):
                    on_checkpoint(self.step)
                    last_checkpoint = now
                if finished or self.stopping:
                    break

    def _epoch_batches(self) -> Iterator[Batch]:
        """The batch iterator at the current step. One iterator per epoch, kept across calls of run
        (the time-budget calibration stops and goes on): a new one would throw away what persistent
        loader workers have prefetched."""
        epoch, offset = divmod(self.step, self.plan.steps_per_epoch)
        if self._batches is None or self._batches_at != self.step or offset == 0:
            self.sampler.set_position(epoch, offset * self.plan.effective_batch)
            self._batches = iter(self.loader)
        return self._batches

    def _train_step(
        self, batches: Iterator[Batch], counts: Counts, window: Window
    ) -> tuple[float, float, torch.Tensor]:
        """One optimizer step over `accumulation` micro-batches. Returns (lr, τ, view 1's projections)."""
        plan, step = self.plan, self.byol_step
        lr = learning_rate(self.step, plan.total_steps, plan.warmup_steps, plan.lr)
        tau = ema_rate(self.step, plan.total_steps, plan.tau_base)
        step.set_learning_rate(lr)
        for micro in range(plan.accumulation):
            waited = time.perf_counter()
            batch = next(batches)
            loaded = time.perf_counter()
            view1, view2 = self._views(batch)
            # On a GPU the views are queued work, not a wait for data; on a CPU making them is
            # time not spent training.
            window.wait += (loaded if self.device.type == "cuda" else time.perf_counter()) - waited
            # Gradients are averaged across ranks once per optimizer step, not per micro-batch.
            last = micro == plan.accumulation - 1
            ranks = step.forward
            with ranks.no_sync() if isinstance(ranks, DistributedDataParallel) and not last else nullcontext():
                loss, projections = step.accumulate(view1, view2, plan.accumulation)
            self._add_loss(counts, loss)
        skipped = step.finish(tau)
        if skipped is not None:
            counts.skipped += skipped
            counts.skipped_in_a_row = (counts.skipped_in_a_row + 1) * skipped
        self.step += 1
        self._batches_at = self.step
        window.steps += 1
        return lr, tau, projections

    def _views(self, batch: Batch) -> tuple[torch.Tensor, torch.Tensor]:
        first, second = (to_device(t, self.device) for t in batch)
        if self.augment_on_device:  # first: uint8 canvases, second: original sizes
            first, second = byol_views(first, second, self.plan.image_size)
        return (first.contiguous(memory_format=self.memory_format), second.contiguous(memory_format=self.memory_format))

    def _add_loss(self, counts: Counts, loss: torch.Tensor) -> None:
        """Count a micro-step's loss, on the device (no sync per step). Under fp16 loss scaling a
        non-finite loss is an overflow the scaler answers by skipping the step and lowering its
        scale, so it is left out of the mean; only a run of nothing but skipped steps fails (_agree)."""
        if self.byol_step.scaler.is_enabled():
            finite = torch.isfinite(loss)
            counts.loss_sum += loss.masked_fill(~finite, 0)
            counts.losses += finite
        else:
            counts.loss_sum += loss
            counts.losses += 1

    def _agree(self, counts: Counts, steps: int, seconds: float, lr: float) -> tuple[float | None, float, int]:
        """(mean loss, mean seconds per step, steps the loss scaler skipped) over all ranks since the
        last meeting; sets `stopping` if any rank saw a stop signal (SIGTERM over SIGINT when ranks
        saw different ones)."""
        seen = [float(self.stop_requested == signum) for signum in (signal.SIGTERM, signal.SIGINT)]
        tallies = counts.as_tensor()
        shared = torch.cat([tallies, tallies.new_tensor([seconds, *seen])])
        distributed.sum_across(self.world, shared)
        total, counted, skipped, in_a_row, seconds_sum, terms, interrupts = shared.tolist()
        self.stopping = signal.SIGTERM if terms else signal.SIGINT if interrupts else 0
        # Every rank skips the same steps (the scaler reads the averaged gradients): count them once.
        skipped, in_a_row = int(skipped) // self.world.size, in_a_row / self.world.size
        step_seconds = seconds_sum / (self.world.size * steps)
        if in_a_row >= OVERFLOWS_IN_A_ROW:
            raise TrainingFailed(
                f"fp16 overflowed (non-finite gradients) in the last {in_a_row:.0f} steps up to step {self.step} "
                f"(learning rate {lr:.3g}); training stopped and the last good checkpoint is kept. Rerun with "
                "a lower --lr, or --precision fp32"
            )
        if not counted:  # a few overflows in a row, all of this window's: normal under loss scaling
            return None, step_seconds, skipped
        loss = total / counted
        if not math.isfinite(loss):
            raise TrainingFailed(
                f"the loss became {loss} at step {self.step} (learning rate {lr:.3g}); training stopped and "
                "the last good checkpoint is kept. Rerun with a lower --lr, or --precision fp32"
            )
        return loss, step_seconds, skipped

    def _log_record(
        self,
        loss: float | None,
        window: Window,
        projections: torch.Tensor,
        lr: float,
        tau: float,
        now: float,
        overflowed: int,
    ) -> dict[str, Any]:
        steps = window.steps
        elapsed = max(now - window.start, 1e-9)
        spread, rank = projection_health(projections)
        return {
            "step": self.step,
            "epoch": round(self.step / self.plan.steps_per_epoch, 3),
            "loss": None if loss is None else round(loss, 5),  # None: every step since the last was skipped
            "lr": round(lr, 6),
            "tau": round(tau, 6),
            "images_per_s": round(steps * self.plan.effective_batch / elapsed, 2),
            "data_wait": round(min(1.0, window.wait / elapsed), 4),
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


def projection_health(projections: torch.Tensor) -> tuple[float, float]:
    """(per-dimension std of L2-normalised projections × √d, effective rank) of one batch.

    The effective rank is that of the centred batch (label_free.effective_rank).
    """
    from byolcli.evaluation.label_free import effective_rank

    # On the CPU: one small copy per log line, and MPS has no SVD in the torch versions byolcli takes.
    z = F.normalize(projections.detach().float().cpu(), dim=1)
    spread = z.std(dim=0).mean().item() * math.sqrt(z.shape[1])
    return spread, effective_rank(z - z.mean(dim=0))


def _as_python_rng_state(state: list[Any]) -> tuple[Any, ...]:
    # torch.load returns lists where random.getstate() had tuples.
    version, internal, gauss = state
    return version, tuple(internal), gauss


def load_checkpoint(path: Path) -> dict[str, Any]:
    try:
        state: dict[str, Any] = torch.load(path, map_location="cpu", weights_only=True)
        return state
    except Exception as exc:  # noqa: BLE001 - any unreadable checkpoint means the same to the user
        raise UserError(
            f"{path}: unreadable checkpoint ({str(exc).splitlines()[0][:120]}); use --restart to start over"
        ) from None
