"""The console every command prints to: results on stdout, progress, warnings and errors on stderr,
the Reporter that modules print through, and the scan's summary. Each wing formats its own tables
in its terminal.py, on these consoles.

Other modules never print; they take a progress callback `(done, total)` or return data, and the
terminal modules turn that into output.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator
from typing import TYPE_CHECKING

from rich.console import Console
from rich.markup import escape
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    ProgressColumn,
    Task,
    TaskProgressColumn,
    TextColumn,
    TimeElapsedColumn,
    TimeRemainingColumn,
)
from rich.table import Table
from rich.text import Text

from byolcli.core.names import escape_name

if TYPE_CHECKING:
    from byolcli.core.scan import Manifest

# Results go to stdout; progress, warnings and errors go to stderr, so that
# `byol scan … > report.txt` captures only the report.
out = Console()
err = Console(stderr=True)

SKIPPED_SHOWN = 10


class RateColumn(ProgressColumn):
    def __init__(self, unit: str) -> None:
        super().__init__()
        self.unit = unit

    def render(self, task: Task) -> Text:
        speed = task.finished_speed or task.speed
        return Text(f"{speed:,.0f} {self.unit}/s" if speed else "")


class Reporter:
    def __init__(self, quiet: bool = False, warnings: bool = True) -> None:
        self.quiet = quiet
        self.warnings = warnings  # off for the other ranks of a distributed run: rank 0 speaks for all

    def info(self, message: str) -> None:
        if not self.quiet:
            err.print(message, soft_wrap=True, markup=False)

    def warn(self, message: str) -> None:
        if self.warnings:
            err.print(f"[yellow]warning:[/] {escape(message)}", soft_wrap=True)

    @contextlib.contextmanager
    def progress(self, description: str, unit: str = "files") -> Iterator[Callable[[int, int], None]]:
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


def scan_report(manifest: Manifest, show_all_skipped: bool = False) -> None:
    """Summary of a Manifest: images per format, skipped files per reason, examples."""
    out.print(
        f"[bold]{len(manifest.images):,} images[/] in {escape(str(manifest.root))}", highlight=False, soft_wrap=True
    )
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
            out.print(
                f"  skipped {escape_name(item.path)}: {item.reason}", highlight=False, markup=False, soft_wrap=True
            )
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


def format_seconds(seconds: float) -> str:
    seconds = int(round(seconds))
    if seconds < 90:
        return f"{seconds}s"
    minutes, s = divmod(seconds, 60)
    if minutes < 90:
        return f"{minutes}m{s:02d}s"
    hours, m = divmod(minutes, 60)
    return f"{hours}h{m:02d}m"
