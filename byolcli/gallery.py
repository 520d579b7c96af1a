"""A self-contained HTML page for judging embeddings by eye.

For a few query images per class: the query and its nearest neighbours among
the training rows (green border: same label, red: another), then the kNN
confusion matrix. Thumbnails are embedded as base64 JPEG, so the page is one
file that can be mailed or opened anywhere.
"""

from __future__ import annotations

import base64
import html
import io
from pathlib import Path

import torch
import torch.nn.functional as F

from byolcli.files import atomic_write_text
from byolcli.images import open_rgb

THUMB = 96
QUERIES_PER_CLASS = 3
NEIGHBOURS = 8


def thumbnail(path: Path) -> str:
    try:
        image = open_rgb(path, min_side=THUMB)
    except Exception:  # noqa: BLE001 - a picture that will not open shows as a blank tile
        return ""
    image.thumbnail((THUMB, THUMB))
    buffer = io.BytesIO()
    image.save(buffer, "JPEG", quality=80)
    return "data:image/jpeg;base64," + base64.b64encode(buffer.getvalue()).decode()


def tile(path: Path, label: str, border: str) -> str:
    title = html.escape(f"{label} — {path.name}")
    return (
        f'<figure style="border-color:{border}"><img src="{thumbnail(path)}" title="{title}">'
        f"<figcaption>{html.escape(label)}</figcaption></figure>"
    )


def write_gallery(
    folder: Path,
    title: str,
    paths: list[Path],
    labels: list[str],
    features: torch.Tensor,
    train: torch.Tensor,
    test: torch.Tensor,
    classes: list[str],
    confusion: list[list[int]],
) -> Path:
    memory = F.normalize(features[train].float(), dim=1)
    rows_html = []
    for name in classes:
        queries = [int(i) for i in test if labels[int(i)] == name][:QUERIES_PER_CLASS]
        for q in queries:
            similarity = memory @ F.normalize(features[q].float(), dim=0)
            nearest = train[similarity.topk(min(NEIGHBOURS, len(train))).indices]
            tiles = [tile(paths[q], labels[q], "#333")]
            tiles += [
                tile(paths[int(n)], labels[int(n)], "#2a2" if labels[int(n)] == name else "#d22") for n in nearest
            ]
            rows_html.append(f'<div class="row"><span>{html.escape(name)}</span>{"".join(tiles)}</div>')

    top = max(max(row) for row in confusion) or 1
    header = "".join(f"<th>{html.escape(c)}</th>" for c in classes)
    body = []
    for c, row in enumerate(confusion):
        cells = "".join(f'<td style="background:rgba(40,110,220,{v / top:.2f})">{v}</td>' for v in row)
        body.append(f"<tr><th>{html.escape(classes[c])}</th>{cells}</tr>")
    page = f"""<!doctype html><meta charset="utf-8"><title>{html.escape(title)}</title>
<style>body{{font:14px system-ui,sans-serif;margin:2em}}.row{{display:flex;align-items:center;gap:6px;margin:4px 0}}
.row span{{width:9em;font-weight:600}}figure{{margin:0;border:3px solid;width:{THUMB}px}}
figure img{{width:{THUMB}px;height:{THUMB}px;object-fit:cover;display:block}}
figcaption{{font-size:11px;overflow:hidden;white-space:nowrap}}table{{border-collapse:collapse}}
td,th{{border:1px solid #ccc;padding:4px 8px;text-align:right}}</style>
<h1>{html.escape(title)}</h1>
<h2>Nearest neighbours</h2><p>First tile: a test image; then its {NEIGHBOURS} nearest training images
by cosine similarity (green: same label, red: another).</p>{"".join(rows_html)}
<h2>kNN confusion matrix</h2><p>Rows: true class; columns: predicted.</p>
<table><tr><th></th>{header}</tr>{"".join(body)}</table>"""
    target = folder / "index.html"
    folder.mkdir(parents=True, exist_ok=True)
    atomic_write_text(target, page)
    return target
