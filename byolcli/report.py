"""Everything the user sees: rich tables, progress bars, warnings.

The core modules never print; they take a progress callback `(done, total)`
or return data, and this module turns that into terminal output.
"""

from __future__ import annotations

import contextlib
from typing import Iterator

from rich.console import Console
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    ProgressColumn,
    TaskProgressColumn,
    TextColumn,
    TimeElapsedColumn,
    TimeRemainingColumn,
)
from rich.table import Table
from rich.text import Text

# Results go to stdout; progress, warnings and errors go to stderr, so that
# `byol scan … > report.txt` captures only the report.
out = Console()
err = Console(stderr=True)

SKIPPED_SHOWN = 10


class RateColumn(ProgressColumn):
    def __init__(self, unit: str) -> None:
        super().__init__()
        self.unit = unit

    def render(self, task) -> Text:
        speed = task.finished_speed or task.speed
        return Text(f"{speed:,.0f} {self.unit}/s" if speed else "")


class Reporter:
    def __init__(self, quiet: bool = False) -> None:
        self.quiet = quiet

    def info(self, message: str) -> None:
        if not self.quiet:
            err.print(message, soft_wrap=True)

    def warn(self, message: str) -> None:
        err.print(f"[yellow]warning:[/] {message}", soft_wrap=True)

    @contextlib.contextmanager
    def progress(self, description: str, unit: str = "files") -> Iterator:
        """Yield a `(done, total)` callback that drives a progress bar with rate and ETA."""
        if self.quiet or not err.is_terminal:
            yield lambda done, total: None
            return
        columns = (
            TextColumn("[bold]{task.description}"),
            BarColumn(),
            MofNCompleteColumn(),
            TaskProgressColumn(),
            RateColumn(unit),
            TimeElapsedColumn(),
            TextColumn("ETA"),
            TimeRemainingColumn(),
        )
        with Progress(*columns, console=err, transient=True) as bar:
            task = bar.add_task(description, total=None)

            def update(done: int, total: int) -> None:
                bar.update(task, completed=done, total=total)

            yield update


def scan_report(manifest, show_all_skipped: bool = False) -> None:
    """Summary of a Manifest: images per format, skipped files per reason, examples."""
    out.print(f"[bold]{len(manifest.images):,} images[/] in {manifest.root}", highlight=False, soft_wrap=True)
    formats = Table()
    formats.add_column("format")
    formats.add_column("images", justify="right")
    for fmt, count in manifest.formats.most_common():
        formats.add_row(fmt, f"{count:,}")
    out.print(formats)

    if manifest.skipped:
        out.print(f"[bold]{len(manifest.skipped):,} skipped[/]")
        reasons = Table()
        reasons.add_column("reason")
        reasons.add_column("files", justify="right")
        for reason, count in manifest.reasons().most_common():
            reasons.add_row(reason, f"{count:,}")
        out.print(reasons)
        shown = manifest.skipped if show_all_skipped else manifest.skipped[:SKIPPED_SHOWN]
        for item in shown:
            out.print(f"  skipped {item.path}: {item.reason}", highlight=False, markup=False, soft_wrap=True)
        if len(shown) < len(manifest.skipped):
            out.print(f"  … and {len(manifest.skipped) - len(shown):,} more (--all to list them)")
    else:
        out.print("nothing skipped")
    notes = []
    if manifest.ignored:
        notes.append(f"{manifest.ignored:,} non-image files ignored")
    if manifest.reused:
        notes.append(f"{manifest.reused:,} results reused from the scan cache")
    if notes:
        out.print("; ".join(notes))
