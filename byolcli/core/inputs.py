"""What a command can refuse before torch is imported: a path that is not there, a flag value outside
its choices. A mistyped path or flag is answered at once instead of after seconds of imports; the
commands, called from Python, check the same things through these functions."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

from byolcli.core.errors import UserError

# name -> feature dimension after global pooling (backbones.py builds each from torchvision)
ARCHITECTURES = {"resnet18": 512, "resnet34": 512, "resnet50": 2048}
# "standard": torchvision's 7×7 stride-2 convolution and max-pool, a quarter of the image per side
# before the first residual stage. "small": a 3×3 stride-1 convolution and no max-pool, the
# CIFAR-style stem, so that 32–64 px images still reach the last stages as maps, not single pixels.
STEMS = ("standard", "small")
PRECISIONS = ("fp32", "bf16", "fp16")
EMBEDDING_DTYPES = ("float32", "float16")
IMAGENET = "imagenet"  # --model, --init and --baseline: torchvision's ImageNet weights
IMAGENET_SIZE = 224  # px: what torchvision's ImageNet weights were trained at
# The networks an encoder is compared with, as evaluate's columns and the reports name them: the
# weights its run started from, and a random-init network of its architecture (the floor to clear).
START = "start"  # at the encoder's size; at another size, start_column names it
RANDOM_INIT = "random init"
AUTO, RANDOM = "auto", "random"  # --init: ImageNet's weights where available, else random; random weights
MIN_IMAGE_SIZE = 16


def start_column(size: int, encoder_size: int) -> str:
    """The name of the start's column at `size` px: plain START at the encoder's own size."""
    return START if size == encoder_size else f"{START} at {size} px"


def is_start_column(name: str) -> bool:
    return name == START or name.startswith(f"{START} at ")


def start_column_size(name: str, encoder_size: int) -> int:
    """The px of a start column that start_column named."""
    return encoder_size if name == START else int(name.split()[-2])


def require_folder(path: str | Path) -> None:
    path = Path(path)
    if not path.exists():
        raise UserError(f"{path}: no such folder")
    if not path.is_dir():
        raise UserError(f"{path}: is a file, not a folder of images")


def require_file(path: str | Path) -> None:
    if not Path(path).is_file():
        raise UserError(f"{path}: no such file")


def require_model_file(model: str | Path | None, names: tuple[str, ...] = (IMAGENET,)) -> None:
    """--model, --init, --baseline: a file, or one of `names` (unless a file has that name); None is the default."""
    if model is not None and str(model) not in names and not Path(model).is_file():
        raise UserError(f"{model}: no such model file")


def require_choice(flag: str, value: str | None, choices: Sequence[str]) -> None:
    if value is not None and value not in choices:
        raise UserError(f"{flag} {value}: choose {', '.join(choices[:-1])} or {choices[-1]}")


def require_image_size(value: int | None, flag: str = "--image-size") -> None:
    if value is not None and value < MIN_IMAGE_SIZE:
        raise UserError(f"{flag} {value}: must be at least {MIN_IMAGE_SIZE}")


def require_model_flags(model: str | Path | None, arch: str | None, image_size: int | None) -> None:
    """The flags that name a model: --model (or --init, --baseline), --arch, --image-size."""
    require_model_file(model)
    require_choice("--arch", arch, tuple(ARCHITECTURES))
    require_image_size(image_size)
