"""Write benchmarks/README.md's generated tables from the results the benchmarks store.

    python benchmarks/tables.py          # rewrite each block between its markers
    python benchmarks/tables.py --check  # exit 1 if a block differs from what the data gives

A block is the text between `<!-- generated: NAME -->` and `<!-- end: NAME -->`; NAME says which
data it shows (peers: benchmarks/peers/results.json; learning-curve and label-free:
benchmarks/learning_curve.json).
"""

from __future__ import annotations

import argparse
import json
import re
import sys
from pathlib import Path

from common import label_free_table, learning_curve_table, peers_tables

HERE = Path(__file__).resolve().parent
README = HERE / "README.md"


def blocks() -> dict[str, str]:
    def stored(path: Path, empty):
        return json.loads(path.read_text()) if path.exists() else empty

    return {
        "peers": peers_tables(stored(HERE / "peers" / "results.json", {})),
        "learning-curve": learning_curve_table(stored(HERE / "learning_curve.json", [])),
        "label-free": label_free_table(stored(HERE / "learning_curve.json", [])),
    }


def rendered(text: str) -> str:
    for name, table in blocks().items():
        pattern = re.compile(rf"(<!-- generated: {name} -->\n).*?(<!-- end: {name} -->)", re.S)
        text = pattern.sub(lambda m: m.group(1) + table + "\n" + m.group(2), text)
    return text


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--check", action="store_true")
    args = parser.parse_args()
    text = README.read_text(encoding="utf-8")
    new = rendered(text)
    if args.check:
        sys.exit(0 if new == text else "benchmarks/README.md: tables differ from the stored results; run tables.py")
    tmp = README.with_suffix(".tmp")
    tmp.write_text(new, encoding="utf-8")
    tmp.replace(README)


if __name__ == "__main__":
    main()
