"""What a BYOL step keeps for its backward pass, with batch norm per process and synchronised.

    python benchmarks/synced_norm_memory.py [--size 64] [--batch 32] [--precision bf16]

ResNet-18 BYOL (online and target networks, projector, predictor), one forward pass under
autocast as training runs it. Tensors saved for the backward pass are counted by their storage,
each storage once. Synchronised batch norm runs as in a world of two processes whose other rank
contributes nothing: the same code path and the same memory, without a second process. Run it
with an older checkout first on PYTHONPATH to compare.
"""

from __future__ import annotations

import argparse
from unittest import mock

import torch
import torch.distributed as dist
from common import host_cpu
from torch.autograd.graph import saved_tensors_hooks

from byolcli.training.byol import BYOL
from byolcli.training.distributed import synchronise_batchnorm

DTYPES = {"bf16": torch.bfloat16, "fp32": None}


def saved_bytes(model: BYOL, views: list[torch.Tensor], dtype) -> int:
    storages = {}

    def pack(tensor: torch.Tensor) -> torch.Tensor:
        storage = tensor.untyped_storage()
        storages[storage.data_ptr()] = storage.nbytes()
        return tensor

    with saved_tensors_hooks(pack, lambda tensor: tensor):
        with torch.autocast("cpu", dtype=dtype) if dtype else torch.autocast("cpu", enabled=False):
            loss, _ = model(*views)
    del loss
    return sum(storages.values())


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--size", type=int, default=64)
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--precision", choices=list(DTYPES), default="bf16")
    args = parser.parse_args()
    torch.manual_seed(0)
    views = [torch.randn(args.batch, 3, args.size, args.size) for _ in range(2)]
    plain = saved_bytes(BYOL("resnet18"), views, DTYPES[args.precision])
    with (
        mock.patch.object(dist, "is_initialized", lambda: True),
        mock.patch.object(dist, "get_world_size", lambda group=None: 2),
        mock.patch.object(dist, "all_reduce", lambda tensor, *a, **k: None),
    ):
        synced = saved_bytes(synchronise_batchnorm(BYOL("resnet18")), views, DTYPES[args.precision])
    print(f"{host_cpu()}; ResNet-18 BYOL, batch {args.batch}, {args.size} px, {args.precision}")
    print(f"saved for backward: per-process batch norm {plain / 2**20:,.1f} MiB, ", end="")
    print(f"synchronised {synced / 2**20:,.1f} MiB")
    print(f"synchronised / per-process: {synced / plain:.2f}")


if __name__ == "__main__":
    main()
