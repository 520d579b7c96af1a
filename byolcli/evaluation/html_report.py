"""The label-free report page: the plan and the training curves when there was a run, the label-free
measures of the encoder and of the network it is compared with (its start, or a random-init network),
and each sampled image's nearest neighbours under both, one row above the other (gallery.py draws the rows)."""

from __future__ import annotations

import html
from pathlib import Path
from typing import Any

from byolcli.core.gallery import neighbour_row, tile, write_page
from byolcli.core.inputs import RANDOM_INIT, START
from byolcli.evaluation.judge import ENCODER, MEANINGS, NEIGHBOURS, VERDICTS, Judgement

REFERENCE_WORDS = {
    RANDOM_INIT: "a random-init network of the same architecture",
    START: "the weights training started from",
}

GALLERY_READING = {
    RANDOM_INIT: "Training helped where the blue rows look more like their image.",
    START: "Where the blue rows look more like their image, training moved these neighbours toward it; "
    "a dozen images do not say whether the encoder is better than its start overall.",
}

CURVES = (
    ("loss", "loss"),
    ("lr", "learning rate"),
    ("tau", "EMA τ"),
    ("images_per_s", "images/s"),
    ("data_wait", "share of time waiting for data"),
    ("projection_std", "projection spread"),
    ("effective_rank", "projections' effective rank"),
)
WIDTH, HEIGHT = 300, 120


def curve_svg(steps: list[float], values: list[float | None], title: str) -> str:
    """One inline SVG line chart, with its range written at the corners."""
    points = [(s, v) for s, v in zip(steps, values) if v is not None]
    if len(points) < 2:
        return ""
    (x0, x1), (y0, y1) = (
        (min(p[0] for p in points), max(p[0] for p in points)),
        (min(p[1] for p in points), max(p[1] for p in points)),
    )
    span_x, span_y = (x1 - x0) or 1, (y1 - y0) or 1
    line = " ".join(
        f"{40 + (s - x0) / span_x * (WIDTH - 50):.1f},{HEIGHT - 20 - (v - y0) / span_y * (HEIGHT - 40):.1f}"
        for s, v in points
    )
    return (
        f'<svg width="{WIDTH}" height="{HEIGHT}" role="img" aria-label="{html.escape(title)}">'
        f'<text x="40" y="12" font-size="12">{html.escape(title)}</text>'
        f'<text x="0" y="24" font-size="10">{y1:.4g}</text><text x="0" y="{HEIGHT - 20}" font-size="10">{y0:.4g}</text>'
        f'<text x="40" y="{HEIGHT - 4}" font-size="10">step {x0:,.0f}</text>'
        f'<text x="{WIDTH - 70}" y="{HEIGHT - 4}" font-size="10">{x1:,.0f}</text>'
        f'<polyline fill="none" stroke="#2864dc" stroke-width="1.5" points="{line}"/></svg>'
    )


def curves_html(records: list[dict[str, Any]]) -> str:
    if not records:
        return ""
    steps = [r["step"] for r in records]
    charts = "".join(curve_svg(steps, [r.get(key) for r in records], title) for key, title in CURVES)
    return f"<h2>Training curves</h2><div>{charts}</div>"


def plan_html(plan: dict[str, Any]) -> str:
    rows = "".join(
        f'<tr><th class="text">{html.escape(key)}</th><td class="text">{html.escape(str(plan.get(key)))}</td>'
        f'<td class="text">{html.escape(why)}</td></tr>'
        for key, why in plan.get("reasons", {}).items()
    )
    return f"<h2>Plan</h2><table><tr><th></th><th>choice</th><th>why</th></tr>{rows}</table>"


def measures_html(judgement: Judgement) -> str:
    rows = []
    for key, meaning in MEANINGS.items():
        cells = "".join(f"<td>{judgement.measures[who][key]}</td>" for who in (ENCODER, judgement.reference))
        rows.append(f'<tr><th class="text">{key}</th>{cells}<td class="text">{html.escape(meaning)}</td></tr>')
    return (
        f"<h2>Without labels</h2><p>On {len(judgement.paths):,} images (a seeded sample of the folder).</p>"
        f"<table><tr><th></th><th>encoder</th><th>{judgement.reference}</th>"
        '<th class="text">what it means</th></tr>'
        f"{''.join(rows)}</table><p>{html.escape(VERDICTS[judgement.reference])}</p>"
    )


def gallery_html(judgement: Judgement) -> str:
    groups = []
    for row, query in enumerate(judgement.queries):
        lines = []
        for who, border in ((ENCODER, "#2864dc"), (judgement.reference, "#999")):
            neighbours = [int(n) for n in judgement.neighbours[who][row]]
            tiles = [tile(judgement.paths[query], "query", "#333")]
            tiles += [tile(judgement.paths[n], judgement.paths[n].name, border) for n in neighbours]
            lines.append(neighbour_row(who, tiles))
        groups.append(f'<div class="group">{"".join(lines)}</div>')
    return (
        f"<h2>Nearest neighbours</h2><p>Each sampled image, then its {NEIGHBOURS} nearest images by cosine "
        f"similarity under the trained encoder (blue) and, beneath, under {REFERENCE_WORDS[judgement.reference]} "
        f"(grey). {GALLERY_READING[judgement.reference]}</p>{''.join(groups)}"
    )


def write_report(
    target: Path,
    title: str,
    judgement: Judgement,
    plan: dict[str, Any] | None = None,
    records: list[dict[str, Any]] | None = None,
) -> Path:
    body = (plan_html(plan) if plan else "") + curves_html(records or []) + measures_html(judgement)
    return write_page(target, title, body + gallery_html(judgement))
