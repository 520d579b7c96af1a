"""The tables of benchmarks/README.md and docs/adaptation.md from benchmarks/adaptation.jsonl:

    python benchmarks/adaptation_tables.py [--record benchmarks/adaptation.jsonl] [--tag 2ep-recal] [--mix 0.5]
        [--recalibrated]

1. Per set: the exported encoder (the run's last point at the plan's mix, with its batch-norm statistics
   measured on the folder where --recalibrated says the plan does) against the frozen start at the run's size
   and at 32 px, the start with the folder's statistics, the trained weights unmixed, and random init (kNN /
   linear top-1 on the test split). Where a tag holds several seeds, each figure is their mean.
2. With labels: the candidate `byol train --labels` picks from the train split's labels alone (best mean of
   kNN and linear on its choose part: the frozen start and the plan's kind of mix at each measured mix, the
   start with the folder's statistics among them where the plan measures them),
   scored on the test split.
3. The curves: every scored point, epoch by epoch, at each mix.
4. Whether a label-free measure orders each scored encoder against its start as kNN and linear top-1 do
   (lines that hold them).

The frozen start and random init are deterministic, so they are taken from any line of the set's record.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from statistics import mean

RECORD = Path(__file__).resolve().parent / "adaptation.jsonl"
# Which way each label-free measure is said to be better.
HIGHER_IS_BETTER = {"view_retrieval": True, "rankme": True, "alignment": False, "uniformity": False}


def pct(x: float) -> str:
    return f"{100 * x:.1f}"


def pts(x: float) -> str:
    return f"{100 * x:+.1f}"


def pair(rows: list[dict] | None) -> str:
    return f"{pct(mean(r['knn'] for r in rows))} / {pct(mean(r['linear'] for r in rows))}" if rows else "–"


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--record", type=Path, default=RECORD)
    parser.add_argument("--tag", default="2ep-recal")
    parser.add_argument("--mix", type=float, default=0.5, help="the plan's mix")
    parser.add_argument("--recalibrated", action="store_true", help="the plan's mix has the folder's statistics")
    args = parser.parse_args()
    every = [json.loads(line) for line in args.record.read_text().splitlines() if line.strip()]
    lines = [line for line in every if line["tag"] == args.tag]
    sets = list(dict.fromkeys(line["set"] for line in lines))
    host = lines[0]["host"] if lines else "?"
    plan_kind = bool(args.recalibrated)

    def baselines(name: str) -> tuple[dict[int, dict], dict | None]:
        rows = [r for r in every if r["set"] == name and r["epoch"] == 0 and not r.get("recalibrated")]
        start = {r["size"]: r for r in rows if r.get("network") != "random init"}
        return start, next((r for r in rows if r.get("network") == "random init"), None)

    print(f"## Exported encoder against its start ({host})\n")
    print(
        "| set | epochs | seeds | encoder (mix) kNN / linear | mix, statistics mixed | trained (unmixed) "
        "| start, 64 px | start, 32 px | start, folder's statistics | random init | Δ vs better start "
        "| with --labels: chosen | its kNN / linear | Δ vs better start |"
    )
    print("|---" * 14 + "|")
    gains, label_gains = [], []
    for name in sets:
        rows = [r for r in lines if r["set"] == name]
        start, random = baselines(name)
        best_start = max(start.values(), key=lambda r: r["knn"] + r["linear"])
        last = max(r["epoch"] for r in rows)
        final = [r for r in rows if r["epoch"] == last]
        seeds = sorted({r.get("seed", 0) for r in final})

        def at(mix: float, recalibrated: bool, seed: int | None = None) -> list[dict]:
            return [
                r
                for r in final
                if r["mix"] == mix and bool(r.get("recalibrated")) == recalibrated and seed in (None, r.get("seed", 0))
            ]

        encoder = at(args.mix, plan_kind)
        if not encoder:
            continue
        gain = tuple(mean(r[m] for r in encoder) - best_start[m] for m in ("knn", "linear"))
        gains.append(gain)
        chosen_rows = []
        for seed in seeds:
            mixes = sorted({r["mix"] for r in final if r["mix"] > 0 or plan_kind})
            offered = [start[encoder[0]["size"]]] + [r for m in mixes for r in at(m, plan_kind, seed)]
            chosen_rows.append(max(offered, key=lambda r: r["knn_choose"] + r["linear_choose"]))
        chosen_gain = tuple(mean(r[m] for r in chosen_rows) - best_start[m] for m in ("knn", "linear"))
        label_gains.append(chosen_gain)
        chosen = ", ".join(
            "start" if r["epoch"] == 0 else "start + folder stats" if r["mix"] == 0 else f"mix {r['mix']:g}"
            for r in chosen_rows
        )
        cells = [
            name,
            last,
            len(seeds),
            f"**{pair(encoder)}** ({args.mix:g})",
            pair(at(args.mix, not plan_kind)),
            pair(at(1.0, False)),
            pair([start[64]] if 64 in start else None),
            pair([start[32]] if 32 in start else None),
            pair(at(0.0, True)),
            pair([random] if random else None),
            f"{pts(gain[0])} / {pts(gain[1])}",
            chosen,
            pair(chosen_rows),
            f"{pts(chosen_gain[0])} / {pts(chosen_gain[1])}",
        ]
        print("| " + " | ".join(str(c) for c in cells) + " |")
    for what, values in (("plan's export", gains), ("with --labels", label_gains)):
        if values:
            knn, linear = mean(g[0] for g in values), mean(g[1] for g in values)
            print(
                f"\nmean gain over the better start, {what}: {pts(knn)} kNN / {pts(linear)} linear; "
                f"worst {pts(min(min(g) for g in values))}"
            )

    print("\n## Curves (kNN / linear top-1, mean over seeds; epoch 0 is the frozen start)\n")
    for name in sets:
        rows = [r for r in lines if r["set"] == name and r["epoch"] > 0]
        start, _ = baselines(name)
        epochs = sorted({r["epoch"] for r in rows})
        kinds = sorted({(r["mix"], bool(r.get("recalibrated"))) for r in rows})
        print(f"| {name}: mix | 0 (start) | " + " | ".join(f"epoch {e}" for e in epochs) + " |")
        print("|---" * (len(epochs) + 2) + "|")
        for m, recalibrated in kinds:
            cells = [
                pair(
                    [
                        r
                        for r in rows
                        if r["epoch"] == e and r["mix"] == m and bool(r.get("recalibrated")) == recalibrated
                    ]
                )
                for e in epochs
            ]
            label = f"{m:g}" + (", folder's statistics" if recalibrated else "")
            print(f"| {label} | {pair([start[64]])} | " + " | ".join(c if c != "–" else "" for c in cells) + " |")
        print()

    pairs = []
    for name in sets:
        start = next(
            (r for r in every if r["set"] == name and r["epoch"] == 0 and r["size"] == 64 and "rankme" in r), None
        )
        pairs += [(r, start) for r in lines if r["set"] == name and r["epoch"] > 0 and "rankme" in r and start]
    if not pairs:
        return
    print("## Label-free measures against the start\n")
    print("| measure | agrees with kNN | agrees with linear | agrees with both |")
    print("|---|---|---|---|")
    for measure, higher in HIGHER_IS_BETTER.items():
        said = [((r[measure] > s[measure]) == higher, r["knn"] > s["knn"], r["linear"] > s["linear"]) for r, s in pairs]
        knn = sum(says == by_knn for says, by_knn, _ in said)
        linear = sum(says == by_linear for says, _, by_linear in said)
        both = sum(says == by_knn for says, by_knn, by_linear in said if by_knn == by_linear)
        agreeing = sum(1 for _, by_knn, by_linear in said if by_knn == by_linear)
        print(f"| {measure} | {knn} of {len(said)} | {linear} of {len(said)} | {both} of {agreeing} |")


if __name__ == "__main__":
    main()
