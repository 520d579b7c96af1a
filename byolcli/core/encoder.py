"""The exported encoder: f_θ's weights in safetensors, plus what is needed to use them.

The tensors keep torchvision's names, so
    m = torchvision.models.resnet18(); m.fc = torch.nn.Identity(); m.load_state_dict(load_file(path))
works without byolcli (with the small-image stem, after the two lines of model.small_stem).
Loading never unpickles anything.
"""

from __future__ import annotations

import json
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import load_file
from safetensors.torch import save as serialise
from torch import nn

from byolcli import __version__
from byolcli.core.backbones import BACKBONES, make_backbone, stem_of
from byolcli.core.errors import UserError
from byolcli.core.files import atomic_path
from byolcli.core.inputs import STEMS

FORMAT = "byolcli-encoder"
FORMAT_VERSION = "1"


def save_encoder(encoder: nn.Module, path: Path, **described: Any) -> None:
    """Write `encoder`'s weights with the metadata that `describe` makes of `described`."""
    tensors = {k: v.detach().to("cpu", copy=True).contiguous() for k, v in encoder.state_dict().items()}
    with atomic_path(path) as tmp:  # Python's write reports a full disk as OSError
        tmp.write_bytes(serialise(tensors, metadata=describe(tensors, **described)))


def with_metadata(encoder: nn.Module, **described: Any) -> nn.Module:
    """`encoder` carrying the metadata it would be saved with, decoded as load_encoder decodes it."""
    return attach_metadata(encoder, decode_metadata(describe(encoder.state_dict(), **described), "encoder"))


def describe(
    tensors: dict[str, torch.Tensor],
    *,
    architecture: str,
    image_size: int,
    mean: tuple[float, ...],
    std: tuple[float, ...],
    train_images: int,
    epochs: float,
    steps: int,
    source: str = "",
    init: str = "random",
    init_path: str = "",
    start_size: int | None = None,
    mix: float | None = None,
    statistics: str = "",
) -> dict[str, str]:
    """The file's metadata, as text. `init` names the weights training started from (start.start_name),
    `init_path` their file, if any; `start_size` the px those weights were trained at, where known; `mix`
    how far the weights lie from them toward the trained ones, and `statistics` "folder" where the batch-norm
    statistics were measured afterwards on the folder's images (candidates.py)."""
    return {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        "architecture": architecture,
        "stem": stem_of(tensors),
        "image_size": str(image_size),
        "mean": json.dumps(list(mean)),
        "std": json.dumps(list(std)),
        "feature_dim": str(BACKBONES[architecture][1]),
        "train_images": str(train_images),
        "epochs": str(epochs),
        "steps": str(steps),
        "source": source,
        "init": init,
        "init_path": init_path,
        "start_size": "" if start_size is None else str(start_size),
        "mix": "" if mix is None else str(mix),
        "statistics": statistics,
        "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "byolcli_version": __version__,
        "torch_version": torch.__version__,
    }


def file_metadata(path: str | Path) -> dict[str, Any]:
    """The raw metadata of a safetensors file (empty for a plain state dict); UserError if it is none."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"{path}: no such model file")
    try:
        with safe_open(str(path), framework="pt") as f:
            return f.metadata() or {}
    except (SafetensorError, OSError, ValueError, Exception) as exc:  # noqa: BLE001 - any parse failure
        raise UserError(f"{path}: not a safetensors model file ({str(exc).splitlines()[0][:120]})") from None


def read_metadata(path: str | Path) -> dict[str, Any]:
    """The encoder's metadata, decoded; UserError if `path` is not a byolcli encoder."""
    return decode_metadata(file_metadata(path), path)


def decode_metadata(raw: dict[str, str], path: str | Path) -> dict[str, Any]:
    if raw.get("format") != FORMAT:
        raise UserError(f"{path}: not a byolcli encoder (no '{FORMAT}' metadata)")
    if raw.get("format_version") != FORMAT_VERSION:
        raise UserError(f"{path}: encoder format {raw.get('format_version')} is not supported by byolcli {__version__}")
    if raw.get("architecture") not in BACKBONES:
        raise UserError(f"{path}: unknown architecture {raw.get('architecture')!r}")
    stem = raw.get("stem", "standard")  # encoders written before the small stem existed have none
    if stem not in STEMS:
        raise UserError(f"{path}: unknown stem {stem!r}")
    try:
        return {
            **raw,
            "stem": stem,
            "image_size": int(raw["image_size"]),
            "mean": tuple(json.loads(raw["mean"])),
            "std": tuple(json.loads(raw["std"])),
            "feature_dim": int(raw["feature_dim"]),
            "train_images": int(raw["train_images"]),
            "start_size": int(raw["start_size"]) if raw.get("start_size") else None,  # older encoders have none
        }
    except (KeyError, ValueError) as exc:
        raise UserError(f"{path}: damaged encoder metadata ({exc})") from None


def load_encoder(path: str | Path, device: str | torch.device = "cpu") -> nn.Module:
    """Rebuild the exported encoder as a ready nn.Module in eval mode.

    The metadata travels along as `module.byol_metadata` (image size, normalisation, …).
    """
    metadata = read_metadata(path)
    try:
        state = load_file(str(path))
    except (SafetensorError, OSError) as exc:
        raise UserError(f"{path}: not a safetensors model file ({str(exc).splitlines()[0][:120]})") from None
    return build_encoder(state, metadata, path).to(device).eval()


def build_encoder(state: dict[str, torch.Tensor], metadata: dict[str, Any], path: str | Path) -> nn.Module:
    """The backbone that `metadata` describes, holding `state`, with the metadata attached."""
    model = make_backbone(metadata["architecture"], stem=metadata["stem"])
    try:
        model.load_state_dict(state)
    except RuntimeError as exc:
        first = str(exc).splitlines()[0][:160]
        raise UserError(
            f"{path}: weights do not match a {metadata['architecture']} with the {metadata['stem']} stem ({first})"
        ) from None
    return attach_metadata(model, metadata)


def attach_metadata(model: nn.Module, metadata: dict[str, Any]) -> nn.Module:
    """`model`, carrying what byolcli knows of it (architecture, image size, normalisation, …) as
    `model.byol_metadata`."""
    model.__dict__["byol_metadata"] = metadata
    return model


def metadata_of(model: nn.Module) -> dict[str, Any]:
    metadata: dict[str, Any] = model.__dict__["byol_metadata"]
    return metadata
