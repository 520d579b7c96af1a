"""The label-free report page in a real browser: does it load whole, offline, and how big is it?

    apt-get install chromium              # once: Debian's Chromium (not a project dependency)
    python benchmarks/report_render.py FOLDER [FOLDER ...] --model ENCODER [--generate 20000] [--out DIR]

For each folder (and, with --generate N, a generated folder of N images), runs `byol evaluate FOLDER
--model ENCODER --report` as a user would, then opens the page in headless Chromium with networking
off: it counts the images that did not load (a copy of the page with a few lines of script that
report them when the page has loaded) and takes a screenshot of the page itself (OUT/NAME.png). It
prints, per folder, the page's size, its images, the broken ones and the time the command took, and
exits 1 if an image is missing or the page refers to anything outside itself.
"""

from __future__ import annotations

import argparse
import json
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from common import host_cpu

CHROMIUM_FLAGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--virtual-time-budget=30000",
]
# Appended to a copy of the page: once everything has loaded, writes how many images there are and how
# many failed into an attribute that --dump-dom prints.
PROBE = """<script>addEventListener("load", () => {
  const images = [...document.images];
  const broken = images.filter((i) => !i.complete || i.naturalWidth === 0).length;
  document.body.setAttribute("data-probe", images.length + " " + broken);
});</script>"""
EXTERNAL = re.compile(r"""(?:src|href)\s*=\s*["'](?!data:|#)""", re.I)


def chromium(browser: str, profile: Path, *args: str) -> str:
    command = [browser, *CHROMIUM_FLAGS, f"--user-data-dir={profile}", *args]
    return subprocess.run(command, capture_output=True, text=True, timeout=300, check=True).stdout


def render(page: Path, screenshot: Path, browser: str) -> dict:
    """Load `page` in Chromium: its images and how many failed, and a screenshot of it."""
    with tempfile.TemporaryDirectory() as scratch:
        probe = Path(scratch) / "probe.html"
        probe.write_text(page.read_text(encoding="utf-8") + PROBE, encoding="utf-8")
        dom = chromium(browser, Path(scratch) / "profile", "--dump-dom", probe.as_uri())
        found = re.search(r'data-probe="(\d+) (\d+)"', dom)
        chromium(
            browser, Path(scratch) / "profile", f"--screenshot={screenshot}", "--window-size=1280,2000", page.as_uri()
        )
    images, broken = (int(found.group(1)), int(found.group(2))) if found else (0, -1)
    return {"images_loaded": images - broken, "images_broken": broken, "screenshot": screenshot.name}


def judge_folder(folder: Path, model: str, out: Path, name: str, browser: str) -> dict:
    start = time.perf_counter()
    command = [sys.executable, "-m", "byolcli", "-q", "evaluate", str(folder), "--model", model]
    command += ["--report", str(out / name), "--json", str(out / f"{name}.json")]
    subprocess.run(command, check=True)
    seconds = time.perf_counter() - start
    page = out / name / "index.html"
    text = page.read_text(encoding="utf-8")
    images = len(list(p for p in folder.rglob("*") if p.is_file()))
    return {
        "folder": name if name != "generated" else f"generated ({images:,} files)",
        "files": images,
        "page_bytes": page.stat().st_size,
        "img_tags": text.count("<img "),
        "external_references": len(EXTERNAL.findall(text)),
        "evaluate_seconds": round(seconds, 1),
        **render(page, out / f"{name}.png", browser),
    }


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("folders", type=Path, nargs="*")
    parser.add_argument("--model", required=True)
    parser.add_argument("--generate", type=int, default=0, help="also a generated folder of this many images")
    parser.add_argument("--out", type=Path, default=None, help="where pages and screenshots go [default: a temp dir]")
    parser.add_argument("--chromium", default="/usr/bin/chromium")
    args = parser.parse_args()
    out = args.out or Path(tempfile.mkdtemp(prefix="report-render-"))
    out.mkdir(parents=True, exist_ok=True)
    # The folder and its parent name the page: shared sets put their splits in folders called "test".
    folders = [(folder, f"{folder.resolve().parent.name}-{folder.name}") for folder in args.folders]
    with tempfile.TemporaryDirectory() as scratch:
        if args.generate:
            generated = Path(scratch) / "generated"
            here = Path(__file__).resolve().parent
            subprocess.run(
                [sys.executable, str(here / "make_images.py"), str(generated), "--count", str(args.generate)]
                + ["--size", "160x120"],
                check=True,
            )
            folders.append((generated, "generated"))
        results = [judge_folder(folder, args.model, out, name, args.chromium) for folder, name in folders]
    failed = False
    for result in results:
        result["host"] = host_cpu()
        print(json.dumps(result))
        whole = result["images_broken"] == 0 and result["images_loaded"] == result["img_tags"] > 0
        failed |= not whole or result["external_references"] > 0
    print(f"pages and screenshots in {out}", file=sys.stderr)
    sys.exit(1 if failed else 0)


if __name__ == "__main__":
    main()
