"""Everything the user sees: rich tables, progress bars, warnings.

The core modules never print; they take a progress callback `(done, total)`
or return data, and this module turns that into terminal output.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

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

from byolcli.inputs import RANDOM_INIT, START, is_start_column
from byolcli.names import escape_name

if TYPE_CHECKING:
    from byolcli.plan import Plan
    from byolcli.scan import Manifest

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


def plan_report(plan: Plan, manifest: Manifest, out: Path, reporter: Reporter) -> None:
    """The plan as the user sees it before training: every choice and why."""
    if reporter.quiet:
        return
    from byolcli.rules import format_seconds

    table = Table(title="training plan", title_justify="left", show_lines=False)
    table.add_column("")
    table.add_column("choice")
    table.add_column("why", style="dim")
    r = plan.reasons
    table.add_row("images", f"{plan.images:,} used, {plan.skipped:,} skipped", Text(str(manifest.root)))
    table.add_row("device", plan.device_name, plan.device)
    table.add_row("backbone", plan.backbone, r.get("backbone", ""))
    start = {None: "random weights", "imagenet": "ImageNet weights"}.get(plan.init) or Text(Path(str(plan.init)).name)
    table.add_row("start", start, r.get("init", ""))
    if plan.init is not None:
        table.add_row("normalisation", "ImageNet's mean and std", "what torchvision's weights and byolcli's expect")
        table.add_row(
            "batch norm", "statistics of these images", "re-estimated as training runs: the start's are other images'"
        )
    table.add_row("image size", f"{plan.image_size} px", r.get("image_size", ""))
    batch = f"{plan.batch_size}"
    if plan.world_size > 1:
        batch += f" per device × {plan.accumulation} accumulated × {plan.world_size} processes = {plan.effective_batch}"
    elif plan.accumulation > 1:
        batch += f" × {plan.accumulation} accumulated = {plan.effective_batch}"
    table.add_row("batch", batch, r.get("batch_size", ""))
    if plan.world_size > 1:
        table.add_row(
            "batch norm",
            "synchronised across processes" if plan.sync_batchnorm else "per process",
            r.get("sync_batchnorm", ""),
        )
    table.add_row(
        "precision", plan.precision + (" + channels_last" if plan.channels_last else ""), r.get("precision", "")
    )
    table.add_row("loader workers", str(plan.workers), r.get("workers", ""))
    decoding = "once, into memory" if plan.in_memory else "every epoch, as batches are loaded"
    table.add_row("decoding", decoding, r.get("in_memory", ""))
    where = "batched on the training device" if plan.augment_on == "device" else "per image on the CPU (torchvision)"
    table.add_row("augmentation", where + ", parameters drawn per image", r.get("augment_on", ""))
    table.add_row("length", f"{plan.epochs:g} epochs = {plan.total_steps:,} steps", r.get("epochs", ""))
    table.add_row(
        "learning rate", f"{plan.lr:.4g} (LARS, warm-up {plan.warmup_steps:,} steps, cosine)", r.get("lr", "")
    )
    table.add_row("EMA τ_base", f"{plan.tau_base:g} → 1", r.get("tau_base", ""))
    if plan.init is not None:
        exported = (
            "chosen with labels" if r.get("mix", "").startswith("--labels") else f"mix {plan.mix:g} from the start"
        )
        table.add_row("exported", exported, r.get("mix", ""))
    epoch = plan.step_seconds * plan.steps_per_epoch
    table.add_row(
        "estimated time",
        f"{format_seconds(epoch)} per epoch, {format_seconds(plan.estimated_seconds)} in all",
        f"{plan.step_seconds:.2f} s per step, measured",
    )
    table.add_row("output", Text(str(out)), "plan.json, metrics.jsonl, checkpoint.pt, encoder.safetensors, report.html")
    err.print(table)


class _TrainColumns(ProgressColumn):
    def render(self, task: Task) -> Text:
        f = task.fields
        if "loss" not in f:
            return Text("")
        return Text(f"{loss_text(f['loss'])}  {f['images_per_s']:,.1f} img/s  data wait {f['data_wait']:.0%}")


def loss_text(loss: float | None) -> str:
    """None: every step since the last record was an fp16 overflow the loss scaler skipped."""
    return "loss (steps skipped)" if loss is None else f"loss {loss:.4f}"


@contextlib.contextmanager
def training_progress(plan: Plan, start_step: int, reporter: Reporter) -> Iterator[Callable[[dict[str, Any]], None]]:
    """Yield `show(record)` for each metrics record: a live bar on a terminal, a line otherwise."""
    if reporter.quiet:
        yield lambda record: None
        return
    if not err.is_terminal:

        def line(record: dict[str, Any]) -> None:
            err.print(
                f"step {record['step']:,}/{plan.total_steps:,} epoch {record['epoch']:.2f} "
                f"{loss_text(record['loss'])} {record['images_per_s']:.1f} img/s "
                f"data wait {record['data_wait']:.0%}",
                highlight=False,
                soft_wrap=True,
            )

        yield line
        return
    columns = (
        TextColumn("[bold]{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        _TrainColumns(),
        TimeElapsedColumn(),
        TextColumn("ETA"),
        TimeRemainingColumn(),
    )
    with Progress(*columns, console=err) as bar:
        task = bar.add_task("training", total=plan.total_steps, completed=start_step)

        def show(record: dict[str, Any]) -> None:
            bar.update(
                task,
                completed=record["step"],
                total=plan.total_steps,
                description=f"epoch {record['epoch']:.1f}/{plan.epochs:g}",
                **{k: record[k] for k in ("loss", "images_per_s", "data_wait")},
            )

        yield show


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
    table = Table()
    table.add_column("metric")
    for name in names:
        table.add_column(name, justify="right")
    # Against the start that scored higher (at the encoder's size or its own), and the random init.
    references = [n for n in (report.get("best_start", ""), RANDOM_INIT) if n in results and len(names) > 1]
    for reference in references:
        table.add_column(f"Δ vs {START if is_start_column(reference) else reference}", justify="right")
    rows = [
        ("kNN top-1", "knn", "top1"),
        ("kNN top-5", "knn", "top5"),
        ("kNN balanced acc.", "knn", "balanced"),
        ("linear top-1", "linear", "top1"),
        ("linear top-5", "linear", "top5"),
        ("linear balanced acc.", "linear", "balanced"),
    ]
    for label, method, key in rows:
        if key not in results[names[0]][method]:
            continue
        values = [results[n][method][key] for n in names]
        cells = [f"{v:.1%}" for v in values]
        for reference in references:
            gain = values[0] - results[reference][method][key]
            cells.append(f"[{'green' if gain > 0 else 'red'}]{gain * 100:+.1f} pts[/]")
        table.add_row(label, *cells)
    out.print(table)
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


def candidates_report(scores: dict[str, dict[str, float]], best: str, images: int, given: int) -> None:
    """`byol train --labels`: every candidate's scores on the choose part and on the check part, and the choice."""
    of = f" of the {given:,} given" if given > images else ""
    table = Table(title=f"candidates, scored on {images:,} labelled images{of}", title_justify="left")
    table.add_column("candidate")
    for column in ("kNN", "linear", "kNN check", "linear check"):
        table.add_column(column, justify="right")
    for name, got in scores.items():
        cells = [f"{got[key]:.1%}" for key in ("knn_choose", "linear_choose", "knn_check", "linear_check")]
        table.add_row(f"[bold]{name}[/]" if name == best else name, *cells)
    err.print(table)
    err.print(
        f"exported: {best}, the best mean of kNN and linear top-1 on a third of the labelled images; the check "
        "columns score another third, which the choice did not see (the probes fit on the last third)",
        highlight=False,
        soft_wrap=True,
    )


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
