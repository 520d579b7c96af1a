"""What `--model` names, as one encoder that embed, evaluate and export can use.

- a byolcli encoder file (encoder.safetensors): everything is in its metadata;
- `imagenet`: torchvision's ImageNet weights for `--arch` (ResNet-18 unless told), at
  `--image-size` (224, ImageNet's, unless told), cached by torchvision after one download;
- a plain torchvision ResNet state dict, in safetensors or torch.save's .pth (no byolcli metadata,
  `fc.*` keys allowed and dropped): `--arch` and `--image-size` say what it is.

Every one is normalised with ImageNet's mean and std, as torchvision's models are.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from torch import nn

from byolcli.errors import UserError
from byolcli.files import RUNS_DIR, file_sha256
from byolcli.inputs import IMAGENET, IMAGENET_SIZE, require_choice, require_image_size

if TYPE_CHECKING:
    import torch

DEFAULT_ARCH = "resnet18"


@dataclass(frozen=True)
class ModelChoice:
    kind: str  # "encoder", IMAGENET or "state dict"
    metadata: dict[str, Any]  # architecture, image_size, mean, std, feature_dim, train_images, source, …
    description: str  # how messages name it
    fingerprint: str  # changes whenever the vectors would: the file's SHA-256, or the weights' name
    path: Path | None = None  # the file, where there is one

    def load(self, device: str | torch.device = "cpu") -> nn.Module:
        """The encoder in eval mode on `device`, with `byol_metadata` attached."""
        from byolcli.encoder import attach_metadata, load_encoder
        from byolcli.start import backbone_from, imagenet_state, read_state_file

        architecture = self.metadata["architecture"]
        if self.kind == "encoder":
            assert self.path is not None  # an encoder is a file
            model = load_encoder(self.path, device)
        elif self.kind == IMAGENET:
            model = backbone_from(imagenet_state(architecture), architecture, IMAGENET, "--arch")
        else:
            assert self.path is not None  # so is a state dict
            model = backbone_from(read_state_file(self.path)[0], architecture, str(self.path), "--arch")
        attach_metadata(model, self.metadata)
        return model.to(device).eval()


def latest_encoder(runs_dir: Path = RUNS_DIR) -> Path:
    """The most recently written encoder under ./byol-runs/."""
    found = sorted(runs_dir.glob("*/encoder.safetensors"), key=lambda p: p.stat().st_mtime) if runs_dir.is_dir() else []
    if not found:
        raise UserError(f"no encoder found in {runs_dir}/: train one with `byol train FOLDER`, or pass --model PATH")
    return found[-1]


def choose_model(
    model: str | Path | None = None, arch: str | None = None, image_size: int | None = None
) -> ModelChoice:
    """Read what `--model` (with `--arch` and `--image-size`) names; UserError when it cannot be used."""
    from byolcli.backbones import BACKBONES, stem_of
    from byolcli.encoder import FORMAT, read_metadata
    from byolcli.pixels import MEAN, STD
    from byolcli.start import read_state_file

    require_choice("--arch", arch, tuple(BACKBONES))
    require_image_size(image_size)
    if model is not None and str(model) == IMAGENET and not Path(model).exists():
        arch, size = arch or DEFAULT_ARCH, image_size or IMAGENET_SIZE
        metadata = _plain_metadata(arch, size, IMAGENET, MEAN, STD, BACKBONES, "standard")
        return ModelChoice(IMAGENET, metadata, f"torchvision's ImageNet {arch} ({size} px)", f"{IMAGENET}:{arch}")

    path = Path(model) if model is not None else latest_encoder()
    state, raw = read_state_file(path)  # one-line error if it is not a weights file
    if raw.get("format") == FORMAT:  # byolcli's own (other tools write {"format": "pt"})
        metadata = read_metadata(path)
        if arch is not None and arch != metadata["architecture"]:
            raise UserError(f"{path} is a {metadata['architecture']} encoder; --arch {arch} does not match it")
        if image_size is not None:
            metadata = {**metadata, "image_size": image_size}
        description = f"{path} ({metadata['architecture']}, {metadata['image_size']} px)"
        return ModelChoice("encoder", metadata, description, file_sha256(path), path)
    missing = [flag for flag, value in (("--arch", arch), ("--image-size", image_size)) if value is None]
    if missing:
        raise UserError(
            f"{path}: a plain state dict without byolcli metadata; add {' and '.join(missing)} to say "
            f"what it is (--arch {'|'.join(BACKBONES)}, --image-size in pixels)"
        )
    assert arch is not None and image_size is not None  # both given, or missing was not empty
    metadata = _plain_metadata(arch, image_size, str(path), MEAN, STD, BACKBONES, stem_of(state))
    return ModelChoice(
        "state dict", metadata, f"{path} (plain {arch} state dict, {image_size} px)", file_sha256(path), path
    )


def _plain_metadata(
    arch: str,
    size: int,
    source: str,
    mean: tuple[float, ...],
    std: tuple[float, ...],
    backbones: dict[str, tuple[Any, int]],
    stem: str,
) -> dict[str, Any]:
    return {
        "architecture": arch,
        "stem": stem,
        "image_size": size,
        "mean": tuple(mean),
        "std": tuple(std),
        "feature_dim": backbones[arch][1],
        "train_images": 0,
        "source": source,
    }
