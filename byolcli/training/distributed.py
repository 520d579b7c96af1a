"""Data-parallel training on several processes, through torch.distributed.

One process per device. torchrun (or `byol train --gpus`, which runs torch's
own elastic launcher) starts them and sets RANK, WORLD_SIZE, LOCAL_RANK and the
rendezvous address in their environment; a single process has none of these
and runs as a world of one. Rank 0 scans, plans and writes every file; the
others receive what it decided through `share`.

Collectives time out (BYOL_DIST_TIMEOUT seconds, default 300) so that a rank
that dies or hangs ends the run with an error instead of a silent wait.
"""

from __future__ import annotations

import contextlib
import os
import re
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass, replace
from datetime import timedelta
from typing import Any, TypeVar

import torch
import torch.distributed as dist
from torch import nn

from byolcli.core.backbones import PerViewStatistics
from byolcli.core.errors import OutOfMemoryAcrossRanks, PeerFailed, PeerLost, UserError

T = TypeVar("T")

DEFAULT_TIMEOUT = 300.0
# Rank 0 scans and plans while the others wait: a scan of millions of files can
# outlast any sensible timeout for a training step.
SETUP_TIMEOUT = timedelta(hours=2)


@dataclass(frozen=True)
class World:
    rank: int = 0
    size: int = 1
    local_rank: int = 0
    local_size: int = 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @classmethod
    def from_env(cls) -> World:
        env = os.environ
        if "RANK" not in env or "WORLD_SIZE" not in env:
            return cls()
        size = int(env["WORLD_SIZE"])
        return cls(
            int(env["RANK"]), size, int(env.get("LOCAL_RANK", env["RANK"])), int(env.get("LOCAL_WORLD_SIZE", size))
        )


def timeout() -> timedelta:
    text = os.environ.get("BYOL_DIST_TIMEOUT", "")
    try:
        seconds = float(text) if text else DEFAULT_TIMEOUT
    except ValueError:
        raise UserError(f"BYOL_DIST_TIMEOUT={text!r}: not a number of seconds") from None
    return timedelta(seconds=seconds)


_setup_group: dist.ProcessGroup | None = None


def start(world: World) -> None:
    """Join the process group: NCCL for CUDA tensors where there is CUDA, gloo for CPU tensors."""
    global _setup_group
    if world.size == 1 or dist.is_initialized():
        return
    if torch.cuda.is_available():
        torch.cuda.set_device(world.local_rank % torch.cuda.device_count())
    backend = "cpu:gloo,cuda:nccl" if torch.cuda.is_available() else "gloo"
    dist.init_process_group(backend, timeout=timeout())
    group = dist.new_group(backend="gloo", timeout=SETUP_TIMEOUT)
    assert isinstance(group, dist.ProcessGroup)  # every rank is a member
    _setup_group = group


def stop(world: World) -> None:
    if world.size > 1 and dist.is_initialized():
        dist.destroy_process_group()


def share(world: World, make: Callable[[], T]) -> T:
    """`make()` on rank 0, its result on every rank. An error on rank 0 stops the others quietly."""
    if world.size == 1:
        return make()
    payload: list[Any] = [None]
    if world.is_main:
        try:
            payload[0] = ("ok", make())
        except BaseException as exc:
            # The exit code rank 0 will end with, so that every rank ends alike (whichever
            # the launcher sees first).
            code = 2 if isinstance(exc, UserError) else 130 if isinstance(exc, KeyboardInterrupt) else 1
            dist.broadcast_object_list([("failed", code)], src=0, group=_setup_group)
            raise
    dist.broadcast_object_list(payload, src=0, group=_setup_group)
    status, value = payload[0]
    if status != "ok":
        raise PeerFailed(value)
    result: T = value
    return result


def barrier(world: World) -> None:
    if world.size > 1:
        dist.barrier(group=_setup_group)


def sum_across(world: World, tensor: torch.Tensor) -> torch.Tensor:
    """The sum of `tensor` over all ranks, in place."""
    if world.size > 1:
        dist.all_reduce(tensor)
    return tensor


LOST_PEER = ("gloo", "nccl", "timed out", "timeout", "connection", "peer", "socket", "closed", "broken pipe")


@contextlib.contextmanager
def collective_errors(world: World) -> Iterator[None]:
    """Turn a collective that failed (a peer died, or timed out) into one clear TrainingFailed."""
    try:
        yield
    except RuntimeError as exc:  # gloo raises RuntimeError, NCCL its subclass DistBackendError
        text = re.sub(r"^\[[^\]]*\]\s*", "", str(exc).splitlines()[0])  # drop gloo's source location
        if world.size == 1 or not any(word in text.lower() for word in LOST_PEER):
            raise
        raise PeerLost(
            f"rank {world.rank} lost contact with the other processes ({text.split('. ')[0][:160]}); "
            "a process died or hung. The last checkpoint is kept: run the same command again to resume"
        ) from None


def gpu_processes(text: str, device: str | None) -> int:
    """How many processes `--gpus TEXT` asks for on this machine ('all' or a count)."""
    if "WORLD_SIZE" in os.environ:
        raise UserError(
            f"--gpus {text}: this process was started by a launcher (torchrun) already; "
            "let the launcher set the number of processes and drop --gpus"
        )
    if device is not None and not device.startswith("cuda"):
        raise UserError(f"--gpus {text}: trains on CUDA GPUs, but --device is {device}")
    available = torch.cuda.device_count()
    if text.strip().lower() == "all":
        wanted = available
    elif text.strip().isdigit() and int(text) >= 1:
        wanted = int(text)
    else:
        raise UserError(f"--gpus {text!r}: give 'all' or a number of GPUs")
    if available == 0:
        raise UserError(f"--gpus {text}: no CUDA GPU is available here")
    if wanted > available:
        raise UserError(f"--gpus {text}: this machine has {available} CUDA GPU(s)")
    return wanted


def launch_local(processes: int, argv: list[str]) -> int:
    """Run `python -m byolcli ARGV` as `processes` ranks on this machine, through torch's
    elastic launcher (what torchrun runs). Returns the exit code to pass on."""
    import logging
    import sys

    from torch.distributed.elastic.multiprocessing.api import SignalException
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
    from torch.distributed.launcher.api import LaunchConfig, elastic_launch

    # The launcher's own notes (worker states, signals sent, exit codes) say nothing the workers
    # did not; its loggers each set their own level, so each is quietened.
    for name in list(logging.root.manager.loggerDict):
        if name.startswith("torch.distributed.elastic"):
            logging.getLogger(name).setLevel(logging.CRITICAL)
    config = LaunchConfig(
        min_nodes=1,
        max_nodes=1,
        nproc_per_node=processes,
        run_id="",
        rdzv_backend="c10d",
        rdzv_endpoint="localhost:0",
        max_restarts=0,
        monitor_interval=1,
    )
    while True:
        try:
            elastic_launch(replace(config, run_id=str(uuid.uuid4())), sys.executable)("-m", "byolcli", *argv)
        except ChildFailedError as exc:
            # Ranks that fail together end with the same code; a negative one means killed by a signal.
            codes = [failure.exitcode for failure in exc.failures.values()]
            if OutOfMemoryAcrossRanks.EXIT_CODE in codes:
                continue  # a rank ran out of memory and said so: the next start halves the batch for all
            return max(codes) if max(codes) > 0 else 1
        except SignalException as exc:  # Ctrl-C or SIGTERM: the workers got it too, saved a checkpoint and said so
            return 128 + exc.sigval
        return 0


# --- batch norm across processes --------------------------------------------------


def _sum_across_ranks(tensor: torch.Tensor, norm: SyncedBatchNorm) -> torch.Tensor:
    if norm.across_ranks and dist.is_initialized() and dist.get_world_size() > 1:
        dist.all_reduce(tensor)
    return tensor


class _SyncedNorm(torch.autograd.Function):
    """Per-view batch norm whose statistics sum over every rank, with torch's SyncBatchNorm's
    backward: it keeps only the input, and per view and channel its mean and inverse std.

    Each view's per-channel sums travel in one all-reduce for both views, and so do the two
    sums the backward pass needs (so the gradient flowing into the statistics covers every
    rank), with no value read back to the host: the GPU never waits.
    """

    @staticmethod
    def forward(
        ctx: Any, x: torch.Tensor, weight: torch.Tensor | None, bias: torch.Tensor | None, norm: SyncedBatchNorm
    ) -> torch.Tensor:
        channels, dims = x.shape[1], [0, *range(2, x.dim())]
        shape = (1, channels) + (1,) * (x.dim() - 2)
        views = x.float().chunk(2)
        count = torch.full((1,), views[0].numel() / channels, device=x.device)  # a fill, not a host copy
        sums = [part for view in views for part in (view.sum(dims), (view * view).sum(dims))]
        totals = _sum_across_ranks(torch.cat([*sums, count]), norm)
        n = totals[-1]
        sum_x, sum_squares = totals[:-1].view(2, 2, channels).unbind(1)
        mean = sum_x / n
        # E[x²] − E[x]² in fp32: activations entering batch norm are O(1), far from cancellation.
        var = (sum_squares / n - mean * mean).clamp_min(0)
        tracked, running_mean, running_var = norm.num_batches_tracked, norm.running_mean, norm.running_var
        if tracked is not None and running_mean is not None and running_var is not None:
            momentum = float(norm.momentum)  # type: ignore[arg-type]  # BYOL's batch norms all have one
            for view_mean, view_var in zip(mean, var):  # once per view, as per-view batch norm in one process does
                tracked.add_(1)
                running_mean.lerp_(view_mean, momentum)
                running_var.lerp_(view_var * n / (n - 1).clamp_min(1), momentum)
        inverse_std = torch.rsqrt(var + norm.eps)
        out = []
        for view, view_mean, view_inverse_std in zip(views, mean, inverse_std):
            y = (view - view_mean.view(shape)) * view_inverse_std.view(shape)
            if weight is not None and bias is not None:
                y = y * weight.float().view(shape) + bias.float().view(shape)
            out.append(y)
        ctx.norm = norm
        ctx.save_for_backward(x, weight, mean, inverse_std, n)
        return torch.cat(out).to(x.dtype)

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor | None, None]:
        x, weight, mean, inverse_std, n = ctx.saved_tensors
        channels, dims = x.shape[1], [0, *range(2, x.dim())]
        shape = (1, channels) + (1,) * (x.dim() - 2)
        views, grads = x.float().chunk(2), grad.float().chunk(2)
        normalised = [(v - m.view(shape)) * s.view(shape) for v, m, s in zip(views, mean, inverse_std)]
        local = torch.stack([torch.stack([g.sum(dims), (g * h).sum(dims)]) for g, h in zip(grads, normalised)])
        grad_weight = grad_bias = None
        if weight is not None:
            grad_weight, grad_bias = local[:, 1].sum(0).to(weight.dtype), local[:, 0].sum(0).to(weight.dtype)
        mean_grad, mean_grad_normalised = (_sum_across_ranks(local.clone(), ctx.norm) / n).unbind(1)
        scale = inverse_std if weight is None else inverse_std * weight.float()
        grad_x = [
            (g - a.view(shape) - h * b.view(shape)) * s.view(shape)
            for g, h, a, b, s in zip(grads, normalised, mean_grad, mean_grad_normalised, scale)
        ]
        return torch.cat(grad_x).to(x.dtype), grad_weight, grad_bias, None


class SyncedBatchNorm(PerViewStatistics, nn.modules.batchnorm._BatchNorm):
    """Per-view batch norm (backbones.py) whose statistics cover every rank's batch: the math of one
    big batch, on CPU (gloo) and GPU (NCCL) alike, both views in one pass. Not `across_ranks`
    (the planner's probe, which rank 0 runs alone), or in one process, it computes what per-view
    batch norm computes, with the memory it takes across ranks."""

    across_ranks = True

    def _check_input_dim(self, x: torch.Tensor) -> None:
        if x.dim() < 2:
            raise ValueError(f"expected at least 2D input (got {x.dim()}D input)")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self._check_input_dim(x)
        if not self.training:
            return super().forward(x)
        out: torch.Tensor = _SyncedNorm.apply(x, self.weight, self.bias, self)
        return out


def synchronise_batchnorm(model: nn.Module, across_ranks: bool = True) -> nn.Module:
    """Every (per-view) BatchNorm in `model` computing its statistics over all ranks' batches (or
    only as if, without `across_ranks`)."""
    for name, child in model.named_children():
        if isinstance(child, nn.modules.batchnorm._BatchNorm):
            synced = SyncedBatchNorm(
                child.num_features, child.eps, child.momentum, child.affine, child.track_running_stats
            )
            # The same Parameter objects, so requires_grad (off in the target network) carries over.
            if child.affine:
                synced.weight, synced.bias = child.weight, child.bias
            synced.load_state_dict(child.state_dict())
            synced.train(child.training)
            synced.across_ranks = across_ranks
            setattr(model, name, synced)
        else:
            synchronise_batchnorm(child, across_ranks)
    return model


def per_rank_device(device: str, world: World) -> str:
    """Rank r of a CUDA run trains on its node's GPU LOCAL_RANK; CPU ranks share the CPU."""
    if device.startswith("cuda") and world.size > 1:
        return f"cuda:{world.local_rank % torch.cuda.device_count()}"
    return device
