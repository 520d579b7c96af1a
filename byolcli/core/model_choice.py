"""What `--model` names, as one encoder that embed, evaluate and export can use.

- a byolcli encoder file (encoder.safetensors): everything is in its metadata;
- `imagenet`: torchvision's ImageNet weights for `--arch` (ResNet-18 unless told), at
  `--image-size` (224, ImageNet's, unless told), cached by torchvision after one download;
- a plain torchvision ResNet state dict, in safetensors or torch.save's .pth (no byolcli metadata,
  `fc.*` keys allowed and dropped): `--arch` and `--image-size` say what it is.

Every one is normalised with ImageNet's mean and std, as torchvision's models are.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from torch import nn

from byolcli.core.errors import UserError
from byolcli.core.files import RUNS_DIR, file_sha256
from byolcli.core.inputs import IMAGENET, IMAGENET_SIZE, require_choice, require_image_size

if TYPE_CHECKING:
    import torch

DEFAULT_ARCH = "resnet18"


@dataclass
class ModelChoice:
    kind: str  # "encoder", IMAGENET or "state dict"
    metadata: dict[str, Any]  # architecture, image_size, mean, std, feature_dim, train_images, source, …
    description: str  # how messages name it
    path: Path | None = None  # the file, where there is one
    digest: str | None = field(default=None, repr=False)  # the file's SHA-256, once it has been read

    @property
    def fingerprint(self) -> str:
        """Changes whenever the vectors would: the file's SHA-256 (taken as it is loaded, where that came
        first), or the weights' name."""
        if self.path is None:
            return f"{IMAGENET}:{self.metadata['architecture']}"
        if self.digest is None:
            self.digest = file_sha256(self.path)
        return self.digest

    def load(self, device: str | torch.device = "cpu") -> nn.Module:
        """The encoder in eval mode on `device`, with `byol_metadata` attached. A file is read once, and
        its fingerprint taken from the same bytes."""
        from byolcli.core.encoder import attach_metadata, build_encoder
        from byolcli.core.start import backbone_from, imagenet_state, read_state_file

        architecture = self.metadata["architecture"]
        if self.path is None:
            model = backbone_from(imagenet_state(architecture), architecture, IMAGENET, "--arch")
        else:
            state, _, self.digest = read_state_file(self.path)
            if self.kind == "encoder":
                model = build_encoder(state, self.metadata, self.path)
            else:
                model = backbone_from(state, architecture, str(self.path), "--arch")
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
    from byolcli.core.backbones import BACKBONES, stem_of
    from byolcli.core.encoder import FORMAT, decode_metadata
    from byolcli.core.pixels import MEAN, STD
    from byolcli.core.start import weights_header

    require_choice("--arch", arch, tuple(BACKBONES))
    require_image_size(image_size)
    if model is not None and str(model) == IMAGENET and not Path(model).exists():
        arch, size = arch or DEFAULT_ARCH, image_size or IMAGENET_SIZE
        metadata = _plain_metadata(arch, size, IMAGENET, MEAN, STD, BACKBONES, "standard")
        return ModelChoice(IMAGENET, metadata, f"torchvision's ImageNet {arch} ({size} px)")

    path = Path(model) if model is not None else latest_encoder()
    state, raw = weights_header(path)  # one-line error if it is not a weights file; the weights are not read
    if raw.get("format") == FORMAT:  # byolcli's own (other tools write {"format": "pt"})
        metadata = decode_metadata(raw, path)
        if arch is not None and arch != metadata["architecture"]:
            raise UserError(f"{path} is a {metadata['architecture']} encoder; --arch {arch} does not match it")
        if image_size is not None:
            metadata = {**metadata, "image_size": image_size}
        description = f"{path} ({metadata['architecture']}, {metadata['image_size']} px)"
        return ModelChoice("encoder", metadata, description, path)
    missing = [flag for flag, value in (("--arch", arch), ("--image-size", image_size)) if value is None]
    if missing:
        raise UserError(
            f"{path}: a plain state dict without byolcli metadata; add {' and '.join(missing)} to say "
            f"what it is (--arch {'|'.join(BACKBONES)}, --image-size in pixels)"
        )
    assert arch is not None and image_size is not None  # both given, or missing was not empty
    metadata = _plain_metadata(arch, image_size, str(path), MEAN, STD, BACKBONES, stem_of(state))
    return ModelChoice("state dict", metadata, f"{path} (plain {arch} state dict, {image_size} px)", path)


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
