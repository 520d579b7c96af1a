"""Weights from elsewhere: the ones a training run starts from (`byol train --init`), what they are
called afterwards, and the files and ImageNet weights that `--model` names.

- `auto`, the default: torchvision's ImageNet weights for the planned backbone when they are in
  torch's cache or can be downloaded, random weights otherwise, with the reason either way;
- `random`; `imagenet`, which insists (a one-line error when the weights are unavailable);
- a file: a byolcli encoder, or a plain torchvision ResNet state dict (safetensors, or torch's own
  .pth, read without unpickling code) whose architecture `--backbone` names.

A plan records the start as `Plan.init`: "imagenet", a file's absolute path, or None for random.
"""

from __future__ import annotations

import hashlib
import io
import json
import shlex
import socket
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import safetensors.torch
import torch
import torchvision
from safetensors import safe_open

from byolcli.core.backbones import make_backbone, stem_of
from byolcli.core.encoder import attach_metadata
from byolcli.core.errors import UserError
from byolcli.core.files import file_sha256
from byolcli.core.inputs import IMAGENET, IMAGENET_SIZE, RANDOM, START

DOWNLOAD_TIMEOUT = 15  # seconds without a byte before a download is given up


def imagenet_cache_file(architecture: str) -> Path:
    """Where torchvision keeps (and first looks for) its ImageNet weights of `architecture`."""
    url: str = torchvision.models.get_model_weights(architecture).DEFAULT.url
    return Path(torch.hub.get_dir()) / "checkpoints" / url.rsplit("/", 1)[-1]


@contextmanager
def _socket_timeout(seconds: float) -> Iterator[None]:
    before = socket.getdefaulttimeout()
    socket.setdefaulttimeout(seconds)
    try:
        yield
    finally:
        socket.setdefaulttimeout(before)


def fetch_imagenet(architecture: str) -> str | None:
    """Make torchvision's ImageNet weights for `architecture` available in torch's cache, downloading
    them (torchvision's hash check) if they are not there. Returns None when they are, else why not."""
    cached = imagenet_cache_file(architecture)
    if cached.is_file():
        return None
    url = torchvision.models.get_model_weights(architecture).DEFAULT.url
    try:
        with _socket_timeout(DOWNLOAD_TIMEOUT):
            torch.hub.load_state_dict_from_url(url, progress=False, check_hash=True, weights_only=True)
    except Exception as exc:  # noqa: BLE001 - offline, proxy, hash mismatch, full disk: the same answer
        cached.unlink(missing_ok=True)
        return f"no ImageNet weights in {cached} and none could be downloaded ({_first_line(exc)})"
    return None


def imagenet_state(architecture: str) -> dict[str, Any]:
    """torchvision's ImageNet backbone weights (no `fc`), from torch's cache or downloaded into it."""
    why = fetch_imagenet(architecture)
    if why is not None:
        url = torchvision.models.get_model_weights(architecture).DEFAULT.url
        raise UserError(f"imagenet: {why}; copy the file there from {url}")
    return _backbone_only(torch.load(imagenet_cache_file(architecture), map_location="cpu", weights_only=True))


def read_state_file(path: Path) -> tuple[dict[str, Any], dict[str, Any], str]:
    """(tensors, safetensors metadata, SHA-256) of a weights file, from one read of it: safetensors, or a
    state dict saved by torch.save."""
    data = _read_weights_file(path)
    digest = hashlib.sha256(data).hexdigest()
    if _is_torch_save(path, data[:2]):
        try:
            state = torch.load(io.BytesIO(data), map_location="cpu", weights_only=True)
        except Exception as exc:  # noqa: BLE001 - any unreadable file means the same to the user
            raise UserError(f"{path}: not a model file ({_first_line(exc)})") from None
        return _state_dict(state, path), {}, digest
    try:
        return safetensors.torch.load(data), _safetensors_metadata(data), digest
    except Exception as exc:  # noqa: BLE001 - any parse failure
        raise UserError(f"{path}: not a safetensors model file ({_first_line(exc)[:120]})") from None


def weights_header(path: Path) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """What a weights file holds without reading its weights: its tensors' names and shapes (on the meta
    device, holding no data) and its safetensors metadata."""
    from byolcli.core.encoder import file_metadata

    if not path.is_file():
        raise UserError(f"{path}: no such model file")
    with open(path, "rb") as f:
        first = f.read(2)
    if _is_torch_save(path, first):
        try:  # mapped, not read: only the names and shapes are touched
            state = torch.load(path, map_location="cpu", weights_only=True, mmap=first == b"PK")
        except Exception as exc:  # noqa: BLE001 - any unreadable file means the same to the user
            raise UserError(f"{path}: not a model file ({_first_line(exc)})") from None
        return {name: torch.empty(tensor.shape, device="meta") for name, tensor in _state_dict(state, path).items()}, {}
    metadata = file_metadata(path)  # one-line error if it is not safetensors either
    with safe_open(str(path), framework="pt") as f:
        shapes = {name: torch.empty(f.get_slice(name).get_shape(), device="meta") for name in f.keys()}  # noqa: SIM118
    return shapes, metadata


def _read_weights_file(path: Path) -> bytes:
    if not path.is_file():
        raise UserError(f"{path}: no such model file")
    try:
        return path.read_bytes()
    except OSError as exc:
        raise UserError(f"{path}: cannot be read ({exc.strerror or exc})") from None


def _is_torch_save(path: Path, first: bytes) -> bool:
    return first == b"PK" or path.suffix in (".pt", ".pth")  # safetensors begins with its header's length


def _state_dict(state: Any, path: Path) -> dict[str, torch.Tensor]:
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise UserError(f"{path}: not a state dict (a mapping of names to tensors)")
    return state


def _safetensors_metadata(data: bytes) -> dict[str, str]:
    """The metadata of safetensors bytes: an 8-byte little-endian length, then a JSON header."""
    length = int.from_bytes(data[:8], "little")
    metadata: dict[str, str] = json.loads(data[8 : 8 + length]).get("__metadata__") or {}
    return metadata


def backbone_from(state: dict[str, Any], architecture: str, name: str, hint: str) -> torch.nn.Module:
    """A ResNet backbone holding `state` (its `fc` classifier, if any, dropped), with whichever stem its
    first convolution has; a one-line error naming the weights (`name`) and what to check when they do not fit."""
    state = _backbone_only(state)
    model = make_backbone(architecture, stem=stem_of(state))
    try:
        model.load_state_dict(state)
    except RuntimeError as exc:  # its first line only says "Error(s) in loading state_dict"
        lines = [line.strip() for line in str(exc).splitlines() if line.strip()]
        raise UserError(
            f"{name}: weights do not match a {architecture} ({lines[min(1, len(lines) - 1)][:160]}); check {hint}"
        ) from None
    return model


def start_weights(init: str, architecture: str) -> dict[str, Any]:
    """The backbone weights a plan's `init` names, checked against `architecture`."""
    if init == IMAGENET:
        return imagenet_state(architecture)
    state, _, _ = read_state_file(Path(init))
    return backbone_from(state, architecture, f"--init {init}", "--backbone").state_dict()


def describe_file(path: Path) -> dict[str, Any]:
    """What an --init file is: architecture (None for a plain state dict), stem, image size and normalisation
    where its metadata records them. UserError when it is not a ResNet's weights."""
    from byolcli.core.encoder import FORMAT, read_metadata

    state, metadata = weights_header(path)
    if metadata.get("format") == FORMAT:
        encoder = read_metadata(path)
        return {key: encoder[key] for key in ("architecture", "stem", "image_size", "mean", "std")}
    if "conv1.weight" not in state or "layer4.0.conv1.weight" not in state:
        raise UserError(f"--init {path}: not a torchvision ResNet state dict (no conv1 and layer4 weights)")
    return {"architecture": None, "stem": stem_of(state), "image_size": None, "mean": None, "std": None}


def start_name(init: str | None) -> str:
    """How an encoder's metadata records its start: "random", "imagenet", or "NAME sha256:DIGEST"."""
    if init is None:
        return RANDOM
    if init == IMAGENET:
        return IMAGENET
    return f"{Path(init).name} sha256:{file_sha256(init)}"


def trained_size(metadata: dict[str, Any]) -> int | None:
    """The px an encoder's start was trained at: ImageNet's, or what its training recorded (None: unknown)."""
    if metadata.get("init") == IMAGENET:
        return IMAGENET_SIZE
    size: int | None = metadata.get("start_size")
    return size


def start_network(
    metadata: dict[str, Any], device: torch.device, size: int | None = None
) -> tuple[torch.nn.Module | None, str]:
    """The network an encoder's training started from, frozen, at `size` px (default: the encoder's) with
    the encoder's normalisation (read from its metadata), in eval mode on `device`; or None and why there is none."""
    init, architecture = metadata.get("init", RANDOM), metadata["architecture"]
    if init == RANDOM:
        return None, "the encoder started from random weights"
    if init == IMAGENET:
        missing = fetch_imagenet(architecture)
        if missing is not None:
            return None, f"its start, torchvision's ImageNet {architecture}: {missing}"
        state = imagenet_state(architecture)
    else:
        path = Path(metadata.get("init_path", ""))
        if not path.is_file() or start_name(str(path)) != init:
            return None, f"its start, {init.rsplit(' sha256:', 1)[0]}, is no longer at {path} as it was"
        state = start_weights(str(path), architecture)
    model = backbone_from(state, architecture, START, "the encoder's architecture")
    at_size = {**metadata, "image_size": size or metadata["image_size"]}
    return attach_metadata(model, at_size).to(device).eval(), ""


def start_command(metadata: dict[str, Any], size: int | None = None) -> str:
    """The `byol embed` command that uses an encoder's start, frozen, in its place, at `size` px (default:
    the encoder's)."""
    size, architecture = size or metadata["image_size"], metadata["architecture"]
    if metadata["init"] == IMAGENET:
        return f"byol embed FOLDER --model imagenet --arch {architecture} --image-size {size}"
    path = metadata["init_path"]
    arch = "" if describe_file(Path(path))["architecture"] else f" --arch {architecture}"  # a plain state dict's
    return f"byol embed FOLDER --model {shlex.quote(path)}{arch} --image-size {size}"


def _backbone_only(state: dict[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in state.items() if not k.startswith("fc.")}


def _first_line(exc: BaseException) -> str:
    return (str(exc).splitlines() or [type(exc).__name__])[0][:120]


def random_init_network(metadata: dict[str, Any], device: torch.device) -> torch.nn.Module:
    """The architecture of an encoder's `metadata`, randomly initialised (seed 0), ready to embed."""
    torch.manual_seed(0)
    model = make_backbone(metadata["architecture"], stem=metadata.get("stem", "standard"))
    return attach_metadata(model, metadata).to(device).eval()
