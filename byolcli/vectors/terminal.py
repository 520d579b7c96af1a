"""What the vector commands print: neighbours, duplicate groups, groups."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from rich.markup import escape
from rich.table import Table

from byolcli.core.names import escape_name
from byolcli.core.terminal import out


def similar_report(results: list[dict[str, Any]]) -> None:
    for result in results:
        table = Table(title=escape_name(result["query"]), title_justify="left")
        table.add_column("#", justify="right")
        table.add_column("similarity", justify="right")
        table.add_column("image")
        for rank, neighbour in enumerate(result["neighbours"], 1):
            table.add_row(str(rank), f"{neighbour['similarity']:.3f}", escape(escape_name(neighbour["path"])))
        out.print(table)


def duplicates_report(groups: list[tuple[list[str], bool]], rule: str, csv_path: Path | None) -> None:
    """How many groups (found by `rule`) and images, and the largest groups: (paths, kept first;
    whether the bytes are the same)."""
    extra = sum(len(paths) - 1 for paths, _ in groups)
    identical = sum(same for _, same in groups)
    out.print(
        f"[bold]{_count(len(groups), 'group')}[/] of near-duplicates ({rule}), {identical:,} of them "
        f"byte-identical files: {_count(extra, 'image')} could go, keeping the largest file of each group",
        highlight=False,
        soft_wrap=True,
    )
    for number, (paths, _) in enumerate(groups[:5], 1):
        names = ", ".join(escape(escape_name(path)) for path in paths[:4])
        out.print(f"  {number}. {names}" + (f" and {len(paths) - 4} more" if len(paths) > 4 else ""), soft_wrap=True)
    if csv_path is not None:
        out.print(f"every group in {csv_path}", highlight=False)


def _count(number: int, thing: str) -> str:
    return f"{number:,} {thing}" + ("" if number == 1 else "s")


def groups_report(groups: list[tuple[int, str]], csv_path: Path | None) -> None:
    """Each group's size and its most typical image, group 1 first."""
    table = Table()
    for column in ("group", "images", "most typical"):
        table.add_column(column, justify="left" if column == "most typical" else "right")
    for number, (size, typical) in enumerate(groups, 1):
        table.add_row(str(number), f"{size:,}", escape(escape_name(typical)))
    out.print(table)
    if csv_path is not None:
        out.print(f"every image's group in {csv_path}", highlight=False)
