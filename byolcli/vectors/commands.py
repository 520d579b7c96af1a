"""`byol similar`, `duplicates`, `groups` and `select`: read the vectors, do the one thing, write
what was asked for (CSV, JSON, a gallery page), and show it."""

from __future__ import annotations

import csv
import io
import json
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from byolcli.core.errors import UserError
from byolcli.core.files import atomic_write_text, check_outside_input
from byolcli.core.names import escape_name, write_names
from byolcli.vectors.store import Vectors, load_vectors, model_of

if TYPE_CHECKING:
    from byolcli.core.terminal import Reporter

GROUP_TILES = 12  # tiles per group on a page
PAGE_GROUPS = 100  # groups on a page


def _source(
    source: Path,
    outputs: tuple[Path | None, ...],
    reporter: Reporter,
    model: Path | None,
    arch: str | None,
    image_size: int | None,
    device: str | None,
) -> Vectors:
    """The vectors, centred, once every output is known to be outside the images' folder (a folder
    is checked before it is embedded)."""
    if source.is_dir():
        _check_outputs(source, outputs)
    vectors = load_vectors(source, reporter=reporter, model=model, arch=arch, image_size=image_size, device=device)
    if vectors.root is not None:
        _check_outputs(vectors.root, outputs)
    if len(vectors) < 2:
        raise UserError(f"{source}: {len(vectors)} images; these commands need at least two")
    # What every image shares says nothing about any one of them; compared without it, the
    # vectors spread apart (benchmarks/README.md).
    return vectors.centred()


def _check_outputs(folder: Path, outputs: tuple[Path | None, ...]) -> None:
    for output in filter(None, outputs):
        check_outside_input(output, folder)


def _write(path: Path, text: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_text(path, text)


def similar_command(
    queries: list[Path],
    source: Path,
    *,
    reporter: Reporter,
    k: int = 10,
    model: Path | None = None,
    arch: str | None = None,
    image_size: int | None = None,
    device: str | None = None,
    json_out: Path | None = None,
    report_dir: Path | None = None,
) -> None:
    from byolcli.core.model_choice import choose_model
    from byolcli.vectors.similar import similar
    from byolcli.vectors.terminal import similar_report

    if k < 1:
        raise UserError(f"-k {k}: must be at least 1")
    vectors = _source(source, (json_out, report_dir), reporter, model, arch, image_size, device)
    choice = choose_model(model, arch, image_size) if source.is_dir() else model_of(vectors.meta)
    results = similar(vectors, queries, k, choice, device)
    if json_out is not None:
        _write(json_out, json.dumps(results, indent=1))
    if report_dir is not None:
        from byolcli.core.gallery import neighbour_row, tile, write_page

        rows = [
            neighbour_row(
                Path(result["query"]).name,
                [tile(Path(result["query"]) if result["row"] is None else vectors.file(result["row"]), "query", "#333")]
                + [tile(vectors.file(n["row"]), f"{n['similarity']:.3f}", "#2a6") for n in result["neighbours"]],
            )
            for result in results
        ]
        page = write_page(report_dir / "index.html", "Similar images", "".join(rows))
        reporter.info(f"wrote {page}")
    similar_report(results)


def duplicates_command(
    source: Path,
    *,
    reporter: Reporter,
    threshold: float | None = None,
    pixel_check: bool = True,
    out: Path | None = None,
    report_dir: Path | None = None,
    model: Path | None = None,
    arch: str | None = None,
    image_size: int | None = None,
    device: str | None = None,
) -> None:
    from byolcli.vectors.duplicates import THRESHOLD, find_duplicates, groups_csv, require_threshold
    from byolcli.vectors.terminal import duplicates_report

    chosen = THRESHOLD if threshold is None else threshold
    require_threshold(chosen)
    vectors = _source(source, (out, report_dir), reporter, model, arch, image_size, device)
    reporter.info(
        f"threshold {chosen} (cosine similarity{'' if threshold else ', the default'}), "
        + ("then the pixels of each pair compared" if pixel_check else "vectors alone")
    )
    groups = find_duplicates(vectors, chosen, pixel_check)
    rule = f"cosine ≥ {chosen}" + (", pixels agreeing" if pixel_check else " alone")
    if out is not None:
        _write(out, groups_csv(vectors, groups))
    if report_dir is not None:
        from byolcli.core.gallery import neighbour_row, tile, write_page

        rows = [
            neighbour_row(
                f"group {number}" + (" (same bytes)" if group.identical else ""),
                [
                    tile(vectors.file(row), "kept" if i == 0 else f"{similarity:.3f}", "#333" if i == 0 else "#d80")
                    for i, (row, similarity) in enumerate(list(zip(group.rows, group.similarity))[:GROUP_TILES])
                ],
            )
            for number, group in enumerate(groups[:PAGE_GROUPS], 1)
        ]
        note = f"<p>{len(groups):,} groups ({rule}); first tile: the largest file.</p>"
        reporter.info(f"wrote {write_page(report_dir / 'index.html', 'Near-duplicates', note + ''.join(rows))}")
    duplicates_report([([vectors.paths[r] for r in g.rows], g.identical) for g in groups], rule, out)


def groups_command(
    source: Path,
    *,
    reporter: Reporter,
    k: int | None = None,
    out: Path | None = None,
    report_dir: Path | None = None,
    seed: int = 0,
    model: Path | None = None,
    arch: str | None = None,
    image_size: int | None = None,
    device: str | None = None,
) -> None:
    from byolcli.vectors.clustering import MOST_GROUPS, choose_k, kmeans
    from byolcli.vectors.terminal import groups_report

    if k is not None and k < 2:
        raise UserError(f"-k {k}: must be at least 2")
    vectors = _source(source, (out, report_dir), reporter, model, arch, image_size, device)
    if k is not None and k > len(vectors):
        raise UserError(f"-k {k}: more groups than the {len(vectors):,} images")
    if k is None:
        k = choose_k(len(vectors))
        reporter.info(f"{k} groups: √(images / 2), at most {MOST_GROUPS} (-k sets it)")
    clusters = kmeans(vectors, k, seed)
    members_of = np.split(np.argsort(clusters.labels, kind="stable"), np.cumsum(clusters.sizes)[:-1])
    if out is not None:
        buffer = io.StringIO()
        writer = csv.writer(buffer, lineterminator="\n")
        writer.writerow(["path", "group", "distance"])
        for row, (group, similarity) in enumerate(zip(clusters.labels.tolist(), clusters.similarity.tolist())):
            writer.writerow([escape_name(vectors.paths[row]), group + 1, f"{1 - similarity:.4f}"])
        _write(out, buffer.getvalue())
    if report_dir is not None:
        from byolcli.core.gallery import neighbour_row, tile, write_page

        rows = []
        for group, members in enumerate(members_of[:PAGE_GROUPS]):
            if not len(members):
                continue
            typical = GROUP_TILES - 4
            order = members[np.argsort(-clusters.similarity[members], kind="stable")]
            shown = np.concatenate([order[:typical], order[typical:][-4:]])
            tiles = [
                tile(vectors.file(r), *(("typical", "#2a6") if i < typical else ("least typical", "#d22")))
                for i, r in enumerate(shown.tolist())
            ]
            rows.append(neighbour_row(f"group {group + 1}: {len(members):,}", tiles))
        note = "<p>Each group's most typical members (green), then its least typical (red).</p>"
        reporter.info(f"wrote {write_page(report_dir / 'index.html', f'{k} groups', note + ''.join(rows))}")
    groups_report(
        [
            (len(members), vectors.paths[int(members[clusters.similarity[members].argmax()])])
            for members in members_of
            if len(members)
        ],
        out,
    )


def select_command(
    source: Path,
    n: int,
    out: Path,
    *,
    reporter: Reporter,
    labels: Path | None = None,
    strategy: str = "typical",
    seed: int = 0,
    model: Path | None = None,
    arch: str | None = None,
    image_size: int | None = None,
    device: str | None = None,
) -> None:
    from byolcli.core.inputs import require_choice
    from byolcli.vectors.selection import STRATEGIES, select

    require_choice("--by", strategy, STRATEGIES)
    if n < 1:
        raise UserError(f"-n {n}: must be at least 1")
    vectors = _source(source, (out,), reporter, model, arch, image_size, device)
    labelled = np.zeros(0, dtype=np.int64)
    if labels is not None:
        labelled, listed = _labelled_rows(vectors, labels)
        if len(labelled) < listed:
            reporter.warn(f"{listed - len(labelled):,} of the {listed:,} images in {labels} are not among the vectors")
    free = len(vectors) - len(labelled)
    if n > free:
        raise UserError(f"-n {n}: more than the {free:,} images" + (" not yet labelled" if len(labelled) else ""))
    chosen = select(vectors, n, labelled, strategy, seed)
    _write(out, write_names(vectors.paths[row] for row in chosen))
    reporter.info(
        f"wrote {n:,} images to label first to {out}, by {strategy}"
        + (f", leaving out the {len(labelled):,} in {labels}" if labels is not None else "")
    )


def _labelled_rows(vectors: Vectors, labels: Path) -> tuple[np.ndarray, int]:
    """Rows of the images a labels CSV already has (matched by file, wherever the CSV puts them),
    and how many images it lists."""
    from byolcli.core.labels import read_labels

    data = read_labels(labels)
    if vectors.root is None:
        raise UserError(f"--labels {labels}: the vectors' folder is unknown, so their files cannot be matched")
    root = vectors.root.resolve()
    row_of = {str(root / name): row for row, name in enumerate(vectors.paths)}
    rows = {row_of.get(str(path.resolve()), -1) for path in data.paths}
    return np.array(sorted(rows - {-1}), dtype=np.int64), len(set(data.paths))
