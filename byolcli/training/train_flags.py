"""`byol train`'s flags: refusing contradictory or impossible ones before anything is scanned or
written, filling in what starting weights imply, and naming the flags a resumed run ignores."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path
from typing import TYPE_CHECKING

from byolcli.core.errors import UserError
from byolcli.core.inputs import (
    ARCHITECTURES,
    AUTO,
    IMAGENET,
    PRECISIONS,
    RANDOM,
    STEMS,
    require_choice,
    require_image_size,
)
from byolcli.training.plan import Overrides, Plan

if TYPE_CHECKING:
    from byolcli.core.terminal import Reporter

# Override name -> the Plan field it sets.
PLANNED_AS = {
    "time_budget": "time_budget",
    "backbone": "backbone",
    "image_size": "image_size",
    "batch_size": "batch_size",
    "lr": "base_lr",
    "workers": "workers",
    "precision": "precision",
    "augment_on": "augment_on",
    "init": "init",
    "stem": "stem",
    "mix": "mix",
    "seed": "seed",
}


def warn_changed_flags(over: Overrides, plan: Plan, reporter: Reporter) -> None:
    """Rerunning the same command resumes silently; flags that would change the plan are named."""

    def differs(name: str, field_name: str) -> bool:
        wanted = getattr(over, name)
        if name == "init" and wanted == RANDOM:
            wanted = None  # a plan records random weights as no start
        return getattr(over, name) is not None and wanted != getattr(plan, field_name)

    changed = [f"--{name.replace('_', '-')}" for name, field_name in PLANNED_AS.items() if differs(name, field_name)]
    if over.epochs is not None and (plan.time_budget is not None or over.epochs != round(plan.epochs)):
        changed.append("--epochs")
    if over.device is not None and not plan.device.startswith(over.device):
        changed.append("--device")
    if changed:
        reporter.warn(
            f"resuming with the saved plan; {', '.join(changed)} differ from it and are ignored "
            "(--restart to start a new run with them)"
        )


def validate(over: Overrides) -> Overrides:
    """Refuse contradictory or impossible flags; returns them with what --init implies filled in."""
    require_choice("--backbone", over.backbone, tuple(ARCHITECTURES))
    require_choice("--precision", over.precision, PRECISIONS)
    for name in ("image_size", "batch_size", "epochs"):
        value = getattr(over, name)
        if value is not None and value < 1:
            raise UserError(f"--{name.replace('_', '-')} {value}: must be at least 1")
    require_image_size(over.image_size)
    require_choice("--augment-on", over.augment_on, ("cpu", "device"))
    if over.workers is not None and over.workers < 0:
        raise UserError(f"--workers {over.workers}: must be 0 or more")
    if over.lr is not None and not over.lr > 0:
        raise UserError(f"--lr {over.lr}: must be positive")
    if over.mix is not None and not 0 <= over.mix <= 1:
        raise UserError(f"--mix {over.mix}: must be between 0 (the start) and 1 (the trained weights)")
    if over.epochs is not None and over.time_budget is not None:
        raise UserError("--epochs and --time both set: give one")
    require_choice("--stem", over.stem, STEMS)
    require_image_size(over.start_size, "--start-size")
    if over.start_size is not None and over.init == RANDOM:
        raise UserError(f"--start-size {over.start_size}: --init random has no start to size")
    if over.init in (AUTO, RANDOM):
        return replace(over, init=None if over.init == AUTO else RANDOM)
    if over.init == IMAGENET:  # torchvision's weights come with its strided stem
        if over.stem not in (None, "standard"):
            raise UserError(f"--init imagenet has the standard stem; --stem {over.stem} does not match it")
        return replace(over, stem="standard")
    if over.init is not None:
        from byolcli.core.start import describe_file, start_weights  # torch: only for a file

        found = describe_file(Path(over.init))  # one-line error if it is not a ResNet's weights
        architecture, stem = found["architecture"] or over.backbone, found["stem"]
        if architecture is None:
            raise UserError(
                f"--init {over.init}: a plain state dict; add --backbone {'|'.join(ARCHITECTURES)} to say what it is"
            )
        if over.backbone not in (None, architecture):
            raise UserError(f"--init {over.init} is a {architecture}; --backbone {over.backbone} does not match it")
        if over.stem not in (None, stem):
            raise UserError(f"--init {over.init} has the {stem} stem; --stem {over.stem} does not match it")
        start_weights(over.init, architecture)  # one-line error if the weights are another architecture's
        return replace(
            over,
            backbone=architecture,
            stem=stem,
            init=str(Path(over.init).resolve()),
            start_size=over.start_size or found["image_size"],
        )
    return over
