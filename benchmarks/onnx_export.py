"""An ONNX export against `byol embed`: the same rows, and images/s on this CPU.

    python benchmarks/onnx_export.py ENCODER [ENCODER ...] [--folder DIR] [--rounds 3]

For each encoder (a trained encoder.safetensors), exports fp32 and fp16 ONNX models with a
dynamic batch, then on the first 16 images of FOLDER (default: cifar10-5k's test split)
compares onnxruntime's rows with `byol embed`'s exact (fp32) rows. Then times, alternated
and after a warm-up, embedding the whole folder in batches of 64 with one process: byolcli's
pipeline (iter_embeddings, no loader processes, fp32 and its default precision) against
the same decoding (inference.load_for_embedding) feeding onnxruntime. Prints one JSON line per
encoder with the host it ran on.
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np
import onnxruntime
import torch
from common import host_cpu

from byolcli.core.export import export_onnx
from byolcli.core.inference import iter_embeddings, load_for_embedding
from byolcli.core.model_choice import choose_model
from byolcli.core.scan import scan
from byolcli.core.terminal import Reporter

DATA = Path(__file__).resolve().parents[2] / "shared" / "data" / "cifar10-5k" / "test"
BATCH = 64


def onnx_rows(session, paths: list[Path], size: int) -> np.ndarray:
    out = []
    for start in range(0, len(paths), BATCH):
        images = np.stack([load_for_embedding(p, size).numpy() for p in paths[start : start + BATCH]])
        out.append(session.run(None, {"images": images})[0])
    return np.concatenate(out)


def byol_rows(encoder, paths: list[Path], precision: str | None) -> np.ndarray:
    return np.concatenate(
        [rows for _, rows, _ in iter_embeddings(paths, encoder, torch.device("cpu"), BATCH, 0, precision=precision)]
    )


def measure(encoder_path: Path, paths: list[Path], rounds: int) -> dict:
    choice = choose_model(encoder_path)
    size = choice.metadata["image_size"]
    encoder = choice.load("cpu")
    result = {"encoder": str(encoder_path), "image_size": size, "host": host_cpu(), "images": len(paths)}
    sessions = {}
    with tempfile.TemporaryDirectory() as tmp:
        for precision in ("fp32", "fp16"):
            target = Path(tmp) / f"{precision}.onnx"
            export_onnx(encoder_path, target, "dynamic", precision == "fp16", Reporter(quiet=True))
            sessions[precision] = onnxruntime.InferenceSession(str(target), providers=["CPUExecutionProvider"])
        exact = byol_rows(encoder, paths[:16], "fp32")
        scale = float(np.abs(exact).max())
        for precision, session in sessions.items():
            diff = float(np.abs(onnx_rows(session, paths[:16], size) - exact).max())
            result[f"max_diff_{precision}"] = diff
            result[f"max_diff_{precision}_relative"] = diff / scale

        runs = {
            "byolcli fp32": lambda: byol_rows(encoder, paths, "fp32"),
            "byolcli default precision": lambda: byol_rows(encoder, paths, None),
            "onnxruntime fp32": lambda: onnx_rows(sessions["fp32"], paths, size),
            "onnxruntime fp16": lambda: onnx_rows(sessions["fp16"], paths, size),
        }
        times = {name: [] for name in runs}
        for round_ in range(rounds + 1):  # round 0 warms up
            for name, run in runs.items():
                start = time.perf_counter()
                run()
                if round_:
                    times[name].append(time.perf_counter() - start)
    result["images_per_s"] = {name: round(len(paths) / statistics.median(t), 1) for name, t in times.items()}
    result["onnx_fp32_over_byolcli_fp32"] = round(
        statistics.median(b / o for b, o in zip(times["byolcli fp32"], times["onnxruntime fp32"])), 3
    )
    return result


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("encoders", nargs="+", type=Path)
    parser.add_argument("--folder", type=Path, default=DATA)
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()
    manifest = scan(args.folder)
    paths = manifest.absolute_paths()
    for encoder in args.encoders:
        print(json.dumps(measure(encoder, paths, args.rounds)), flush=True)


if __name__ == "__main__":
    main()
