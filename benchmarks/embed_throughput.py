"""Embedding images/s: byolcli's pipeline against the plain torchvision way, alternated.

    python benchmarks/embed_throughput.py [FOLDER] [--model encoder.safetensors] [--rounds 3]

Plain way: an ImageFolder-style Dataset that opens each file with PIL, converts
to RGB, Resize(size) + CenterCrop(size) + ToTensor + Normalize, in a DataLoader
with the same batch size and workers, through the same model under
inference_mode, fp32. byolcli: `iter_embeddings` with its default precision
(bf16 where the hardware computes it natively) and with fp32, which decodes JPEGs at reduced
scale, resizes and crops in PIL, normalises per batch and keeps loader
processes and compute threads within the cores; and its input pipeline alone, whose
time over the full run is the share spent decoding. Each trial runs in a fresh process (so peak
memory is its own), the two alternate, and medians are reported. Without
--model, a ResNet-18 encoder at 64 px (what `byol train` picks on a CPU for
photos of this size) is exported first.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

from common import export_random_encoder

DEFAULT = Path(__file__).resolve().parents[2] / "shared" / "data" / "clothing10"

TRIAL = r"""
import json, resource, sys, time, torch
from pathlib import Path
from byolcli.core.hardware import detect_hardware
from byolcli.core.inference import iter_embeddings
from byolcli.core.loading import choose_workers
from byolcli.core.encoder import load_encoder
from byolcli.core.scan import scan

way, folder, model_path = sys.argv[1], Path(sys.argv[2]), sys.argv[3]
paths = scan(folder).absolute_paths()
model = load_encoder(model_path)
meta = model.byol_metadata
from byolcli.core.inference import ImageDataset, pick_device
device = pick_device(None)
model = model.to(device)
workers = choose_workers(detect_hardware(str(device)), embedding=True)[0]
start = time.perf_counter()
if way in ("byolcli", "byolcli-fp32"):
    precision = "fp32" if way == "byolcli-fp32" else None  # None: the default, bf16 where native
    rows = sum(len(batch) for _, batch, _ in iter_embeddings(paths, model, device, 256, workers, precision=precision))
elif way == "decode":  # byolcli's input pipeline alone: the floor under any embedding speed
    loader = torch.utils.data.DataLoader(ImageDataset(paths, meta["image_size"]), batch_size=256, num_workers=workers)
    rows = sum(len(images) for images, _ in loader)
else:
    from PIL import Image
    from torchvision import transforms as T
    transform = T.Compose([T.Resize(meta["image_size"]), T.CenterCrop(meta["image_size"]), T.ToTensor(),
                           T.Normalize(meta["mean"], meta["std"])])
    class Plain(torch.utils.data.Dataset):
        def __len__(self): return len(paths)
        def __getitem__(self, i): return transform(Image.open(paths[i]).convert("RGB"))
    loader = torch.utils.data.DataLoader(Plain(), batch_size=256, num_workers=workers)
    rows = 0
    with torch.inference_mode():
        for batch in loader:
            rows += len(model(batch.to(device)))
elapsed = time.perf_counter() - start
peak_kb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss + resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss
print(json.dumps({"rows": rows, "seconds": elapsed, "peak_mb": peak_kb / 1024, "workers": workers,
                  "device": str(device)}))
"""


def trial(way: str, folder: Path, model: Path) -> dict:
    result = subprocess.run(
        [sys.executable, "-c", TRIAL, way, str(folder), str(model)], capture_output=True, text=True, check=True
    )
    return json.loads(result.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("folder", nargs="?", type=Path, default=DEFAULT)
    parser.add_argument("--model", type=Path)
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        model = args.model or export_random_encoder(Path(tmp), 64)
        trial("byolcli", args.folder, model)  # warm-up: page cache, scan cache
        names = {
            "plain": "plain torchvision",
            "byolcli": "byolcli",
            "byolcli-fp32": "byolcli fp32",
            "decode": "byolcli decode only",
        }
        results: dict[str, list[dict]] = {name: [] for name in names.values()}
        for _ in range(args.rounds):
            for way, name in names.items():
                results[name].append(trial(way, args.folder, model))
    rates = {}
    for name, runs in results.items():
        per_second = [r["rows"] / r["seconds"] for r in runs]
        rates[name] = statistics.median(per_second)
        print(
            f"{name:>17}: median {rates[name]:7.1f} images/s, peak memory {max(r['peak_mb'] for r in runs):6.0f} MB "
            f"(rounds: {', '.join(f'{v:.1f}' for v in per_second)}; {runs[0]['rows']:,} images, "
            f"{runs[0]['workers']} workers)"
        )
    print(
        f"device {results['byolcli'][0]['device']}; byolcli / plain = "
        f"{rates['byolcli'] / rates['plain torchvision']:.2f}x (fp32: "
        f"{rates['byolcli fp32'] / rates['plain torchvision']:.2f}x); decoding alone takes "
        f"{rates['byolcli'] / rates['byolcli decode only']:.0%} of byolcli's embedding time"
    )


if __name__ == "__main__":
    main()
