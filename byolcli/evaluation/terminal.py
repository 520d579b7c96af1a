"""What `byol evaluate` prints: the labelled comparison with its gains, per-class recall, and the
label-free measures with what each means."""

from __future__ import annotations

from typing import Any

from rich import box
from rich.table import Table
from rich.text import Text

from byolcli.core.inputs import RANDOM_INIT, START, is_start_column
from byolcli.core.terminal import out


def evaluation_report(report: dict[str, Any]) -> None:
    """Side-by-side table of every encoder's scores, with the gain over its start and over the random init,
    and per-class recall."""
    results = report["results"]
    names = list(results)
    out.print(
        f"[bold]{report['images']:,} labelled images, {len(report['classes'])} classes[/]; {report['protocol']}",
        highlight=False,
        soft_wrap=True,
    )
    # Fits 80 columns with the usual four networks: no vertical rules, short labels, gains in points.
    table = Table(box=box.SIMPLE_HEAD, show_edge=False, pad_edge=False, collapse_padding=True)
    table.add_column("metric")
    for name in names:
        table.add_column(name, justify="right")
    # Against the start that scored higher (at the encoder's size or its own), and the random init.
    references = [n for n in (report.get("best_start", ""), RANDOM_INIT) if n in results and len(names) > 1]
    for reference in references:
        table.add_column(f"Δ {START if is_start_column(reference) else 'random'}", justify="right")
    rows = [
        ("kNN top-1", "knn", "top1"),
        ("kNN top-5", "knn", "top5"),
        ("kNN balanced", "knn", "balanced"),
        ("linear top-1", "linear", "top1"),
        ("linear top-5", "linear", "top5"),
        ("linear balanced", "linear", "balanced"),
    ]
    for label, method, key in rows:
        if key not in results[names[0]][method]:
            continue
        values = [results[n][method][key] for n in names]
        cells = [f"{v:.1%}" for v in values]
        for reference in references:
            gain = values[0] - results[reference][method][key]
            cells.append(f"[{'green' if gain > 0 else 'red'}]{gain * 100:+.1f}[/]")
        table.add_row(label, *cells)
    out.print(table)
    if references:
        out.print(f"Δ: {names[0]} minus {', minus '.join(references)}, in percentage points", highlight=False)
    if "use_start" in report:
        out.print(
            f"{names[0]} scores below the weights it started from ({report['best_start']}) on kNN and linear "
            f"top-1: use the start instead, `{report['use_start']}`",
            highlight=False,
            soft_wrap=True,
            markup=False,
        )
    edge = [n for n in names if results[n]["linear"].get("weight_decay_at_grid_edge")]
    if edge:
        out.print(
            f"note: the linear probe's L2 strength for {', '.join(edge)} was chosen at an end of its grid; "
            "the linear score may be an underestimate",
            highlight=False,
            soft_wrap=True,
        )

    per_class = Table(title=f"per-class recall ({names[0]})", title_justify="left")
    per_class.add_column("class")
    per_class.add_column("kNN", justify="right")
    per_class.add_column("linear", justify="right")
    first = results[names[0]]
    for i, label in enumerate(report["classes"]):
        per_class.add_row(
            Text(str(label)),
            f"{first['knn']['per_class_recall'][i]:.1%}",
            f"{first['linear']['per_class_recall'][i]:.1%}",
        )
    out.print(per_class)


def judgement_report(result: dict[str, Any]) -> None:
    """The label-free measures of the encoder and the network it is compared with, with what each means."""
    out.print(f"[bold]{result['images']:,} images[/] (a seeded sample of the folder), no labels", highlight=False)
    table = Table()
    compared = ("encoder", result["reference"])
    for column in ("measure", *compared, "what it means"):
        table.add_column(column, justify="left" if column in ("measure", "what it means") else "right")
    for key, meaning in result["meanings"].items():
        table.add_row(key, *(str(result["measures"][who][key]) for who in compared), meaning)
    out.print(table)
    out.print(result["how_to_read"], highlight=False, soft_wrap=True, markup=False)
    pairs = result["near_duplicates"]
    if pairs:
        shown = ", ".join(f"{p['a']} ~ {p['b']}" for p in pairs[:5])
        out.print(f"{len(pairs)} near-duplicate pairs (all in --json): {shown}", highlight=False, soft_wrap=True)
