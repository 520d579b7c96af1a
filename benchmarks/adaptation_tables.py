"""The tables of benchmarks/README.md and docs/adaptation.md from benchmarks/adaptation.jsonl:

    python benchmarks/adaptation_tables.py [--record benchmarks/adaptation.jsonl] [--tag default]

1. Per set: the exported encoder (the plan's length and mix) against the frozen start at the run's size and
   at 32 px, the trained weights unmixed, and random init (kNN / linear top-1 on the test split).
2. With labels: the candidate `byol train --labels` picks from the train split's labels alone (best mean of
   kNN and linear on its choose part), scored on the test split.
3. The curves: every scored point, epoch by epoch, at each mix.
4. Whether a label-free measure orders each scored encoder against its start as kNN and linear top-1 do.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

RECORD = Path(__file__).resolve().parent / "adaptation.jsonl"
# Which way each label-free measure is said to be better.
HIGHER_IS_BETTER = {"view_retrieval": True, "rankme": True, "alignment": False, "uniformity": False}


def pct(x: float) -> str:
    return f"{100 * x:.1f}"


def pts(x: float) -> str:
    return f"{100 * x:+.1f}"


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--record", type=Path, default=RECORD)
    parser.add_argument("--tag", default="default")
    parser.add_argument("--mix", type=float, default=0.5, help="the plan's mix")
    args = parser.parse_args()
    lines = [json.loads(line) for line in args.record.read_text().splitlines() if line.strip()]
    lines = [line for line in lines if line["tag"] == args.tag]
    sets = list(dict.fromkeys(line["set"] for line in lines))
    host = lines[0]["host"] if lines else "?"

    print(f"## Exported encoder against its start ({host})\n")
    print(
        "| set | epochs | encoder (mix) kNN / linear | trained (unmixed) | start, 64 px | start, 32 px | random init "
        "| Δ vs better start | with --labels: chosen | its kNN / linear | Δ vs better start |"
    )
    print("|---|---|---|---|---|---|---|---|---|---|---|")
    gains, label_gains = [], []
    for name in sets:
        rows = [line for line in lines if line["set"] == name]
        start = {r["size"]: r for r in rows if r["epoch"] == 0 and r.get("network") != "random init"}
        random = next((r for r in rows if r.get("network") == "random init"), None)
        last = max(r["epoch"] for r in rows)
        final = {r["mix"]: r for r in rows if r["epoch"] == last}
        if args.mix not in final:
            continue
        encoder, trained = final[args.mix], final.get(1.0)
        best_start = max(start.values(), key=lambda r: r["knn"] + r["linear"])
        gain = (encoder["knn"] - best_start["knn"], encoder["linear"] - best_start["linear"])
        gains.append(gain)
        candidates = [start[best_start["size"]] if best_start["size"] == encoder["size"] else start[encoder["size"]]]
        candidates += [final[m] for m in sorted(final)]
        chosen = max(candidates, key=lambda r: r["knn_choose"] + r["linear_choose"])
        chosen_gain = (chosen["knn"] - best_start["knn"], chosen["linear"] - best_start["linear"])
        label_gains.append(chosen_gain)
        label = "start" if chosen["epoch"] == 0 else f"mix {chosen['mix']:g}"

        def pair(r):
            return f"{pct(r['knn'])} / {pct(r['linear'])}" if r else "–"

        print(
            f"| {name} | {last} | **{pair(encoder)}** ({args.mix:g}) | {pair(trained)} | {pair(start.get(64))} | "
            f"{pair(start.get(32))} | {pair(random)} | {pts(gain[0])} / {pts(gain[1])} | {label} | {pair(chosen)} | "
            f"{pts(chosen_gain[0])} / {pts(chosen_gain[1])} |"
        )
    for what, values in (("plan's mix", gains), ("with --labels", label_gains)):
        if values:
            knn = sum(g[0] for g in values) / len(values)
            linear = sum(g[1] for g in values) / len(values)
            worst = min(min(g) for g in values)
            print(
                f"\nmean gain over the better start, {what}: {pts(knn)} kNN / {pts(linear)} linear; worst {pts(worst)}"
            )

    print("\n## Curves (kNN / linear top-1; epoch 0 is the frozen start)\n")
    for name in sets:
        rows = [line for line in lines if line["set"] == name and line.get("network") != "random init"]
        epochs = sorted({r["epoch"] for r in rows if r["epoch"] > 0})
        mixes = sorted({r["mix"] for r in rows if r["epoch"] > 0})
        start = next(r for r in rows if r["epoch"] == 0 and r["size"] == 64)
        print(f"| {name}: mix | 0 (start) | " + " | ".join(f"epoch {e}" for e in epochs) + " |")
        print("|---" * (len(epochs) + 2) + "|")
        for m in mixes:
            cells = []
            for e in epochs:
                r = next((r for r in rows if r["epoch"] == e and r["mix"] == m), None)
                cells.append(f"{pct(r['knn'])} / {pct(r['linear'])}" if r else "")
            print(f"| {m:g} | {pct(start['knn'])} / {pct(start['linear'])} | " + " | ".join(cells) + " |")
        print()

    print("## Label-free measures against the start\n")
    print("| measure | agrees with kNN | agrees with linear | agrees with both |")
    print("|---|---|---|---|")
    pairs = []
    for name in sets:
        rows = [line for line in lines if line["set"] == name and "rankme" in line]
        start = next(r for r in rows if r["epoch"] == 0 and r["size"] == 64)
        pairs += [(r, start) for r in rows if r["epoch"] > 0]
    for measure, higher in HIGHER_IS_BETTER.items():
        said = [((r[measure] > s[measure]) == higher, r["knn"] > s["knn"], r["linear"] > s["linear"]) for r, s in pairs]
        knn = sum(says == by_knn for says, by_knn, _ in said)
        linear = sum(says == by_linear for says, _, by_linear in said)
        both = sum(says == by_knn for says, by_knn, by_linear in said if by_knn == by_linear)
        agreeing = sum(1 for _, by_knn, by_linear in said if by_knn == by_linear)
        print(f"| {measure} | {knn} of {len(said)} | {linear} of {len(said)} | {both} of {agreeing} |")


if __name__ == "__main__":
    main()
