"""Self-contained HTML pages for judging embeddings by eye: one renderer for rows of an image and
its nearest neighbours, used by the labelled page (`byol evaluate --labels --report`) and the
label-free report (`byol train`'s report.html, `byol evaluate FOLDER`). Thumbnails are embedded as
small base64 JPEGs, so a page is one file that can be mailed or opened anywhere, and its size
depends on how many tiles it shows, not on the folder."""

from __future__ import annotations

import base64
import html
import io
from pathlib import Path
from typing import TYPE_CHECKING

from byolcli.core.files import atomic_write_text
from byolcli.core.images import open_rgb

if TYPE_CHECKING:
    import torch

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


def neighbour_row(caption: str, tiles: list[str]) -> str:
    """One row: a caption, the query's tile, then its neighbours' tiles."""
    return f'<div class="row"><span>{html.escape(caption)}</span>{"".join(tiles)}</div>'


STYLE = f"""body{{font:14px system-ui,sans-serif;margin:2em;max-width:80em}}
.row{{display:flex;align-items:center;gap:6px;margin:4px 0}}.row span{{width:9em;font-weight:600}}
figure{{margin:0;border:3px solid;width:{THUMB}px}}
figure img{{width:{THUMB}px;height:{THUMB}px;object-fit:cover;display:block}}
figcaption{{font-size:11px;overflow:hidden;white-space:nowrap}}table{{border-collapse:collapse;margin:1em 0}}
td,th{{border:1px solid #ccc;padding:4px 8px;text-align:right}}td.text,th.text{{text-align:left}}
.group{{margin:1.2em 0;padding-top:.4em;border-top:1px solid #ddd}}svg{{margin:4px 12px 4px 0}}"""


def write_page(target: Path, title: str, body: str) -> Path:
    """The page, written atomically (its folder made if needed)."""
    page = f"""<!doctype html><meta charset="utf-8"><title>{html.escape(title)}</title>
<style>{STYLE}</style><h1>{html.escape(title)}</h1>{body}"""
    target.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_text(target, page)
    return target


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
    import torch.nn.functional as F

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
            rows_html.append(neighbour_row(name, tiles))

    top = max(max(row) for row in confusion) or 1
    header = "".join(f"<th>{html.escape(c)}</th>" for c in classes)
    matrix = []
    for c, row in enumerate(confusion):
        cells = "".join(f'<td style="background:rgba(40,110,220,{v / top:.2f})">{v}</td>' for v in row)
        matrix.append(f"<tr><th>{html.escape(classes[c])}</th>{cells}</tr>")
    body = f"""<h2>Nearest neighbours</h2><p>First tile: a test image; then its {NEIGHBOURS} nearest training images
by cosine similarity (green: same label, red: another).</p>{"".join(rows_html)}
<h2>kNN confusion matrix</h2><p>Rows: true class; columns: predicted.</p>
<table><tr><th></th>{header}</tr>{"".join(matrix)}</table>"""
    return write_page(folder / "index.html", title, body)
