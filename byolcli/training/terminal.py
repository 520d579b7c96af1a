"""What `byol train` prints: the plan with the reason for each choice, the progress of training, and the
candidates scored with labels."""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    ProgressColumn,
    Task,
    TextColumn,
    TimeElapsedColumn,
    TimeRemainingColumn,
)
from rich.table import Table
from rich.text import Text

from byolcli.core.terminal import Reporter, err, format_seconds

if TYPE_CHECKING:
    from byolcli.core.scan import Manifest
    from byolcli.training.plan import Plan


def plan_report(plan: Plan, manifest: Manifest, out: Path, reporter: Reporter) -> None:
    """The plan as the user sees it before training: every choice and why."""
    if reporter.quiet:
        return
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


def candidates_report(
    scores: dict[str, dict[str, float]], best: str, reference: str, images: int, given: int, reporter: Reporter
) -> None:
    """`byol train --labels`: every candidate's scores on the choose part and on the check part, and the choice."""
    if reporter.quiet:
        return
    of = f" of the {given:,} given (what a tenth of the run's compute allows)" if given > images else ""
    table = Table(title=f"candidates, scored on {images:,} labelled images{of}", title_justify="left")
    table.add_column("candidate")
    for column in ("kNN", "linear", "kNN check", "linear check"):
        table.add_column(column, justify="right")
    for name, got in scores.items():
        cells = [f"{got[key]:.1%}" for key in ("knn_choose", "linear_choose", "knn_check", "linear_check")]
        label = name + (" (the plan's)" if name == reference else "")
        table.add_row(f"[bold]{label}[/]" if name == best else label, *cells)
    err.print(table)
    why = (
        "no candidate scored clearly better than it (beyond what chance gives)"
        if best == reference
        else f"clearly better than the plan's {reference} (beyond what chance gives), the best mean of those"
    )
    err.print(
        f"exported: {best}, {why} in kNN and linear top-1 on a third of the labelled images; the check "
        "columns score another third, which the choice did not see (the probes fit on the last third)",
        highlight=False,
        soft_wrap=True,
    )
