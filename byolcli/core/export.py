"""`byol export`: an encoder as an ONNX model that takes raw images.

Input `images`: uint8 RGB, (batch, 3, size, size), each image resized on its short side
and centre-cropped to `size` as `byol embed` does. Output `embeddings`: float32
(batch, features). The normalisation (x / 255 − mean) / std is folded into the graph,
so nothing outside it needs to know the encoder's statistics; the file's metadata
states all of this along with the encoder's own metadata.

The graph is torch.export's (the exporter PyTorch maintains), built from a stock
torchvision ResNet holding the encoder's weights. Every export is checked with
onnx's checker and run with onnxruntime against PyTorch before it is put in place.
"""

from __future__ import annotations

import contextlib
import copy
import inspect
import io
import json
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
from torch import nn

from byolcli.core.errors import UserError
from byolcli.core.files import atomic_path
from byolcli.core.model_choice import choose_model
from byolcli.core.names import escape_name

if TYPE_CHECKING:
    from byolcli.core.terminal import Reporter

EXTRA = 'pip install "byolcli[onnx]"'
INPUT, OUTPUT = "images", "embeddings"
# Largest difference from PyTorch's fp32 embedding that an export may show, relative to the
# embedding's largest magnitude (fp16 keeps ~3 significant digits through ~20 layers).
TOLERANCE = {torch.float32: 1e-5, torch.float16: 1e-2}


class RawImageEncoder(nn.Module):
    """uint8 images in, embeddings out: the encoder with its input normalisation in front."""

    def __init__(
        self, encoder: nn.Module, mean: Sequence[float], std: Sequence[float], dtype: torch.dtype = torch.float32
    ) -> None:
        super().__init__()
        self.encoder = encoder.to(dtype)
        std_ = torch.tensor(std, dtype=torch.float64).view(1, 3, 1, 1)
        mean_ = torch.tensor(mean, dtype=torch.float64).view(1, 3, 1, 1)
        # (x / 255 − mean) / std as one multiply-add.
        self.scale: torch.Tensor
        self.shift: torch.Tensor
        self.register_buffer("scale", (1 / (255 * std_)).to(dtype))
        self.register_buffer("shift", (mean_ / std_).to(dtype))

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        x = images.to(self.scale.dtype) * self.scale - self.shift
        vectors: torch.Tensor = self.encoder(x)
        return vectors.float()


def stock_backbone(encoder: nn.Module, architecture: str) -> nn.Module:
    """A plain torchvision ResNet with the encoder's weights: none of byolcli's CPU kernels in the graph."""
    from byolcli.core.backbones import BACKBONES, small_stem, stem_of

    stock = BACKBONES[architecture][0](weights=None)
    stock.fc = nn.Identity()
    state = encoder.state_dict()
    if stem_of(state) == "small":
        small_stem(stock)
    stock.load_state_dict(state)
    eval_mode: nn.Module = stock.eval()
    return eval_mode


def export_onnx(
    model: str | Path | None,
    out: Path,
    batch: str,
    fp16: bool,
    reporter: Reporter,
    arch: str | None = None,
    image_size: int | None = None,
) -> dict[str, Any]:
    """Write `out`; returns its metadata (what the file's metadata_props hold)."""
    try:
        import onnx
        import onnxruntime
        import onnxscript  # noqa: F401 - torch.onnx.export(dynamo=True) needs it
    except ImportError as exc:
        raise UserError(f"byol export --onnx needs the onnx extra ({exc.name} is missing): {EXTRA}") from None
    if "dynamo" not in inspect.signature(torch.onnx.export).parameters:
        raise UserError(f"byol export --onnx needs torch 2.5 or newer (this is {torch.__version__})")
    if out.suffix != ".onnx":
        raise UserError(f"--onnx {out}: must end in .onnx")
    dynamic = batch.strip().lower() == "dynamic"
    if not dynamic and not (batch.strip().isdigit() and int(batch) >= 1):
        raise UserError(f"--batch {batch!r}: give a number of images, or 'dynamic'")
    choice = choose_model(model, arch, image_size)
    meta = choice.metadata
    encoder = stock_backbone(choice.load("cpu"), meta["architecture"])
    reference = RawImageEncoder(copy.deepcopy(encoder), meta["mean"], meta["std"]).eval()  # fp32, to check against
    wrapped = RawImageEncoder(encoder, meta["mean"], meta["std"], torch.float16 if fp16 else torch.float32).eval()
    size = meta["image_size"]
    # torch.export fixes a dimension of size 1, so a dynamic batch is traced at 2.
    example = torch.randint(0, 256, (2 if dynamic else int(batch), 3, size, size), dtype=torch.uint8)
    reporter.info(
        f"exporting {choice.description} to ONNX ({'fp16' if fp16 else 'fp32'}, "
        f"batch {'dynamic' if dynamic else batch}) …"
    )
    with torch.no_grad(), contextlib.redirect_stdout(io.StringIO()):  # the exporter's own progress lines
        program = torch.onnx.export(
            wrapped,
            (example,),
            dynamo=True,
            verbose=False,
            input_names=[INPUT],
            output_names=[OUTPUT],
            dynamic_shapes=({0: torch.export.Dim("batch")},) if dynamic else None,
        )
    assert program is not None  # the dynamo exporter returns its program
    proto = program.model_proto
    description = {
        **_as_text(meta),
        "input": f"{INPUT}: uint8 RGB, shape (batch, 3, {size}, {size}); each image resized on its short side to "
        f"{size} px (bilinear) and centre-cropped; normalisation is inside the model",
        "output": f"{OUTPUT}: float32, shape (batch, {meta['feature_dim']})",
        "batch": "dynamic" if dynamic else str(batch),
        "precision": "fp16" if fp16 else "fp32",
        "exported_from": escape_name(str(choice.path or choice.description)),
    }
    onnx.helper.set_model_props(proto, description)
    onnx.checker.check_model(proto, full_check=True)
    largest = _check_against_torch(proto, reference, example, TOLERANCE[wrapped.scale.dtype], onnxruntime)
    with atomic_path(out) as tmp:
        tmp.write_bytes(proto.SerializeToString())
    reporter.info(
        f"wrote {out}: uint8 images (batch, 3, {size}, {size}) in, float32 (batch, {meta['feature_dim']}) "
        f"out; onnxruntime matches PyTorch to {largest:.1e} (largest difference)"
    )
    return description


def _check_against_torch(
    proto: Any, reference: nn.Module, example: torch.Tensor, tolerance: float, onnxruntime: Any
) -> float:
    """Run the export with onnxruntime on `example`; its largest difference from fp32 PyTorch."""
    with torch.no_grad():
        expected = reference(example).numpy()
    session = onnxruntime.InferenceSession(proto.SerializeToString(), providers=["CPUExecutionProvider"])
    got = session.run(None, {INPUT: example.numpy()})[0]
    largest = float(np.abs(got - expected).max())
    bound = tolerance * float(np.abs(expected).max())
    if not largest <= bound:
        raise RuntimeError(f"the ONNX export differs from PyTorch by {largest:.3g} (bound {bound:.3g})")
    return largest


def _as_text(metadata: dict[str, Any]) -> dict[str, str]:
    return {key: value if isinstance(value, str) else json.dumps(value) for key, value in metadata.items()}
