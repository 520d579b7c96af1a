"""`byol train`: the command around the engine. Scans the folder, takes the run folder's lock,
plans a new run or resumes the saved one, then trains (engine.py) with progress, metrics,
checkpoints, stop signals and the time-budget re-plan, and exports the encoder. Rank 0 does the
scanning, planning, printing and writing; the other processes follow what it shares."""

from __future__ import annotations

import json
import shutil
import signal
import time
from collections.abc import Callable
from contextlib import ExitStack, nullcontext, suppress
from dataclasses import dataclass, field, replace
from datetime import datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any, TextIO

import numpy as np
import torch
from torch import nn

from byolcli.core.backbones import make_backbone
from byolcli.core.encoder import save_encoder, with_metadata
from byolcli.core.errors import OutOfMemoryAcrossRanks, PeerLost, Stopped, TrainingFailed, UserError
from byolcli.core.files import atomic_write_text, check_outside_input, default_run_dir, write_failed
from byolcli.core.hardware import Hardware, detect_hardware, is_out_of_memory, release_cached_memory
from byolcli.core.inference import embed_many
from byolcli.core.inputs import IMAGENET
from byolcli.core.labels import LabelledImages
from byolcli.core.locks import exclusive
from byolcli.core.names import read_names, write_names
from byolcli.core.pixels import MEAN, STD
from byolcli.core.scan import Manifest, scan
from byolcli.core.signals import StopRequests
from byolcli.core.start import fetch_imagenet, start_name, start_weights
from byolcli.core.terminal import format_seconds
from byolcli.training import distributed
from byolcli.training.candidates import (
    Candidate,
    best_candidate,
    candidates,
    labels_to_score,
    mixed_encoder,
    read_training_labels,
    recalibrated,
    score_candidates,
    scored_sample,
)
from byolcli.training.data import time_decoding
from byolcli.training.distributed import World
from byolcli.training.engine import Trainer, load_checkpoint
from byolcli.training.plan import (
    Overrides,
    Plan,
    fit_to_world,
    halve_batch,
    make_plan,
    refit_to_budget,
    short_run_warning,
)
from byolcli.training.probe import probe_step
from byolcli.training.train_flags import validate, warn_changed_flags

if TYPE_CHECKING:
    from byolcli.core.terminal import Reporter

CHECKPOINT = "checkpoint.pt"
ENCODER = "encoder.safetensors"
PLAN = "plan.json"
METRICS = "metrics.jsonl"
IMAGES = "images.txt"
REPORT = "report.html"
LOCK = ".lock"
OUT_OF_MEMORY = "out-of-memory.json"  # a distributed run's note to its next start: halve the batch

# With a time budget, the loop is timed over these steps (the first ones run slow
# while the loader and the kernels warm up) and the run's length re-planned.
CALIBRATION = (10, 40)
MIN_HALVED_BATCH = 2  # the projector's batch norm needs two images per view


@dataclass
class TrainRequest:
    folder: Path
    choices: Overrides = field(default_factory=Overrides)  # what the user pinned by flag
    out: Path | None = None
    restart: bool = False
    checkpoint_every: float = 300.0  # seconds between checkpoints
    log_every: float = 10.0  # seconds between metrics lines
    labels: Path | None = None  # a CSV of some of the folder's images: export the candidate they score best


def train_folder(request: TrainRequest, reporter: Reporter) -> Path:
    """Run `byol train`: a new run, or the continuation of an interrupted one. Returns the encoder's path.

    Under torchrun every process runs this; rank 0 does all the scanning,
    planning, printing and writing, and the others follow what it shares.
    """
    world = World.from_env()
    distributed.start(world)
    if not world.is_main:
        from byolcli.core.terminal import Reporter

        reporter = Reporter(quiet=True, warnings=False)
    try:
        # `held`: the run folder's lock, taken by rank 0 once it knows the folder, until the encoder is written.
        with distributed.collective_errors(world), ExitStack() as held:
            return _train_folder(request, reporter, world, held)
    except PeerLost:
        # The process that left may have run out of memory, noted so and exited: then every process
        # stops as it did, so that the next start halves the batch for all (`--gpus` starts it).
        if _ran_out_of_memory(Path(request.out) if request.out else default_run_dir(request.folder)) is None:
            raise
        raise OutOfMemoryAcrossRanks(
            "another process ran out of memory; run the same command again to continue at half the batch"
        ) from None
    finally:
        distributed.stop(world)


def _prepare(
    request: TrainRequest, reporter: Reporter, world: World, held: ExitStack
) -> tuple[Plan, list[Path], dict[str, Any] | None, Path, str, bool, LabelledImages | None]:
    """Rank 0's part: scan, read --labels, take the run folder's lock, and plan a new run or load the saved
    one. Returns (plan, image paths, checkpoint or None, run folder, the folder's root, whether the batch was
    halved, the labelled images)."""
    overrides = validate(request.choices)  # before anything is scanned, moved or written
    with reporter.progress("checking images") as progress:
        manifest = scan(request.folder, progress=progress, warn=reporter.warn)
    labelled = read_training_labels(request.labels, manifest.absolute_paths()) if request.labels else None
    out = Path(request.out) if request.out else default_run_dir(request.folder)
    check_outside_input(out, manifest.root)
    held.enter_context(exclusive(out / LOCK, out))
    if request.restart:
        _move_aside(out, reporter)

    state = load_checkpoint(out / CHECKPOINT) if (out / CHECKPOINT).exists() else None
    halved = False
    if state is not None:
        plan, paths = _resume(state, manifest.root, out, overrides, reporter, world, labelled is not None)
        failed_at = _ran_out_of_memory(out)
        if failed_at is not None and plan.batch_size >= failed_at:  # the checkpoint may predate the last halving
            state, halved = _halve_batch(plan, out, reporter, to=failed_at // 2), True
        _truncate_metrics(out / METRICS, state["step"] if state else 0)
    else:
        plan, paths = _plan_new_run(manifest, out, overrides, reporter, world, labelled is not None)

    from byolcli.training.terminal import plan_report

    plan_report(plan, manifest, out, reporter)
    warning = short_run_warning(plan) if state is None else None
    if warning:
        reporter.warn(warning)
    return plan, paths, state, out, str(manifest.root), halved, labelled


def _train_folder(request: TrainRequest, reporter: Reporter, world: World, held: ExitStack) -> Path:
    # Scanned and planned once, on rank 0; every rank gets the same plan, files and checkpoint.
    plan, paths, state, out, root, halved, labelled = distributed.share(
        world, lambda: _prepare(request, reporter, world, held)
    )
    while True:
        decoding = reporter.progress("decoding images into memory", unit="images") if plan.in_memory else nullcontext()
        with decoding as progress:
            trainer = Trainer(plan, paths, world, decode_progress=progress, start_from=state)
        if trainer.step >= plan.total_steps:
            break
        try:
            _train(trainer, out, request, reporter, recalibrate=halved)
            break
        except RuntimeError as exc:
            if not is_out_of_memory(exc):
                raise
            _cannot_continue(exc, plan, out, world)
        # Past the except block, so that the failed step's tensors are gone with its traceback.
        del trainer
        release_cached_memory(torch.device(plan.device))
        state, halved = _halve_batch(plan, out, reporter), True

    encoder_path = out / ENCODER
    if world.is_main:
        _export(trainer, encoder_path, root, labelled, reporter)
        reporter.info(f"encoder written to {encoder_path}")
        _write_report(out, plan, paths, Path(root), reporter)
        if plan.init and labelled is None:
            reporter.info(
                "nothing has checked this encoder against the weights it started from: labels can. "
                f"`byol evaluate --labels LABELS.csv --model {encoder_path}` compares them; rerun this command with "
                "--labels LABELS.csv to export whichever scores best; `byol select FOLDER -n 200` picks what to label"
            )
        elif not plan.init:
            reporter.info(
                "next, to see it against a random-init network on labels you have: "
                f"byol evaluate --labels LABELS.csv --model {encoder_path}"
            )
    distributed.barrier(world)  # nobody leaves before the encoder is written
    return encoder_path


def _export(trainer: Trainer, path: Path, root: str, labelled: LabelledImages | None, reporter: Reporter) -> None:
    """Write the encoder: the trained weights (from random weights), the plan's mix with the start, or
    the candidate that the labels score best."""
    plan = trainer.plan
    described: dict[str, Any] = dict(
        architecture=plan.backbone,
        image_size=plan.image_size,
        mean=MEAN,
        std=STD,
        train_images=plan.images,
        epochs=plan.epochs,
        steps=trainer.step,
        source=root,
        init=start_name(plan.init),
        init_path=plan.init if plan.init not in (None, IMAGENET) else "",
        start_size=plan.start_size,
    )
    trained = with_metadata(plain_backbone(trainer.model.online_encoder, plan), **described)
    if plan.init is None:
        save_encoder(trained, path, **described)
        return
    start = start_weights(plan.init, plan.backbone)
    if labelled is None:
        with reporter.progress("measuring the mix's batch-norm statistics", unit="images") as progress:
            [exported] = recalibrated(
                [mixed_encoder(trained, start, plan.mix)], trainer.paths, trainer.device, progress
            )
        save_encoder(exported, path, **{**described, "mix": plan.mix, "statistics": "folder"})
        return
    began = time.perf_counter()
    with reporter.progress("measuring the candidates' batch-norm statistics", unit="images") as progress:
        found = candidates(trained, start, plan.start_size, plan.mix, trainer.paths, trainer.device, progress)
    limit = labels_to_score(
        plan.total_steps * plan.effective_batch // plan.world_size, found, len(trainer.paths), labelled
    )
    plans_export = next(c.name for c in found if c.statistics and c.mix == plan.mix)
    chosen = choose_with_labels(found, labelled, limit, plans_export, trainer.device, reporter)
    reporter.info(
        f"choosing took {format_seconds(time.perf_counter() - began)}; the run's plan "
        f"{format_seconds(plan.estimated_seconds)}"
    )
    chose = {"image_size": chosen.image_size, "mix": chosen.mix, "statistics": chosen.statistics}
    save_encoder(chosen.network, path, **{**described, **chose})


def _choose_with_labels_in(plan: Plan) -> None:
    """--labels: the plan exports the candidate the labels score best (a finished run only chooses again)."""
    if plan.init is None:
        raise UserError(
            "--labels chooses between the weights a run started from and what training made of them, and this run "
            "starts from random weights; byol evaluate --labels scores its encoder"
        )
    plan.reasons["mix"] = (
        "--labels: the start, mixes of it with the trained weights, and the trained weights, scored on the labels"
    )


def plain_backbone(online: nn.Module, plan: Plan) -> nn.Module:
    """The online encoder's weights in a stock backbone (plain batch norm), in eval mode, where it trained."""
    backbone = make_backbone(plan.backbone, stem=plan.stem)
    backbone.load_state_dict(online.state_dict())
    return backbone.to(next(online.parameters()).device).eval()


def choose_with_labels(
    found: list[Candidate],
    labelled: LabelledImages,
    limit: int,
    reference: str,
    device: torch.device,
    reporter: Reporter,
) -> Candidate:
    """Score every candidate on (a stratified sample of `limit` of) the labelled images (candidates.py) and
    return `reference` (the plan's export) or one clearly better, after printing all."""
    from byolcli.training.terminal import candidates_report

    given = len(labelled.paths)
    labelled = scored_sample(labelled, limit)
    index = {label: i for i, label in enumerate(labelled.classes)}
    y = torch.tensor([index[label] for label in labelled.labels])
    with reporter.progress("scoring candidates", unit="images") as progress:
        networks = {candidate.name: candidate.network for candidate in found}
        features, good = embed_many(labelled.paths, networks, device, 256, None, progress)
    keep = torch.from_numpy(np.flatnonzero(good))
    scores, hits = score_candidates({name: x[keep] for name, x in features.items()}, y[keep], len(labelled.classes))
    best = best_candidate(scores, hits, reference)
    candidates_report(scores, best, reference, len(keep), given, reporter)
    return next(candidate for candidate in found if candidate.name == best)


def _write_report(out: Path, plan: Plan, paths: list[Path], root: Path, reporter: Reporter) -> None:
    """report.html beside the encoder: the plan, the curves, and the trained encoder against a
    random-init one without labels; report.json holds the measures and neighbours."""
    from byolcli.core.encoder import load_encoder
    from byolcli.evaluation.html_report import write_report
    from byolcli.evaluation.judge import judge

    device = torch.device(plan.device)
    judgement = judge(paths, load_encoder(out / ENCODER, device), device, reporter.progress, seed=plan.seed)
    records = []
    for line in (out / METRICS).read_text(encoding="utf-8", errors="replace").splitlines():
        with suppress(ValueError):
            records.append(json.loads(line))
    page = write_report(out / REPORT, f"byol train {root.name}", judgement, plan.to_dict(), records)
    atomic_write_text(out / "report.json", json.dumps(judgement.to_dict(root), indent=2))
    reporter.info(f"report written to {page}")


def plan_for(manifest: Manifest, hw: Hardware, overrides: Overrides, world_size: int = 1) -> Plan:
    """The plan `byol train` makes for these images on this hardware, timing real steps and decoding."""
    return make_plan(
        [min(image.width, image.height) for image in manifest.images],
        len(manifest.skipped),
        hw,
        overrides,
        probe=lambda setting: probe_step(hw, setting),
        data_cost=lambda size, augment_on: time_decoding(manifest.absolute_paths(), size, augment_on),
        world_size=world_size,
        find_imagenet=fetch_imagenet,  # downloads here, once, before any rank needs the file
    )


def _plan_new_run(
    manifest: Manifest, out: Path, overrides: Overrides, reporter: Reporter, world: World, labelled: bool = False
) -> tuple[Plan, list[Path]]:
    hw = detect_hardware(overrides.device)
    if world.local_size > 1:  # the processes on this machine share its cores and memory
        hw = replace(
            hw,
            ram=hw.ram // world.local_size,
            cores=max(1, hw.cores // world.local_size),
            shared_memory=hw.shared_memory // world.local_size,
        )
    reporter.info(f"planning for {hw.name}: timing a few real training steps …")
    plan = plan_for(manifest, hw, overrides, world.size)
    if labelled:
        _choose_with_labels_in(plan)  # before the run folder is made: a refused --labels leaves nothing behind
    out.mkdir(parents=True, exist_ok=True)
    atomic_write_text(out / IMAGES, write_names(image.path for image in manifest.images))
    _write_plan(out, plan)
    (out / METRICS).unlink(missing_ok=True)
    return plan, manifest.absolute_paths()


def _write_plan(out: Path, plan: Plan) -> None:
    atomic_write_text(out / PLAN, json.dumps(plan.to_dict(), indent=2))


def _cannot_continue(exc: RuntimeError, plan: Plan, out: Path, world: World) -> None:
    """Out of memory mid-run: returns if this process may halve the batch and go on by itself, else
    raises what the user reads."""
    why = None
    if plan.batch_size < 2 * MIN_HALVED_BATCH:
        why = f"batch norm needs at least {MIN_HALVED_BATCH} images"
    elif plan.batch_size % 2:
        why = "an odd batch cannot be halved into the same global batch"
    if why:
        raise TrainingFailed(
            f"out of memory at a batch of {plan.batch_size} per device, and {why} "
            f"({str(exc).splitlines()[0][:120]}); try --restart with a smaller --batch-size, --image-size or --backbone"
        ) from None
    if world.size > 1:
        # The other processes wait in a collective this one will never join: all of them stop,
        # and the next start halves the batch for every one (the checkpoint at step 0 or later).
        atomic_write_text(out / OUT_OF_MEMORY, json.dumps({"batch_size": plan.batch_size}))
        raise OutOfMemoryAcrossRanks(
            f"at a batch of {plan.batch_size} per device; run the same command again to continue from the last "
            f"checkpoint at {plan.batch_size // 2} per device on every process (byol train --gpus does so by itself)"
        ) from None


def _ran_out_of_memory(out: Path) -> int | None:
    """The batch size at which a process of this run's last start ran out of memory, if one did."""
    try:
        return int(json.loads((out / OUT_OF_MEMORY).read_text())["batch_size"])
    except (OSError, ValueError, KeyError, TypeError):
        return None


def _halve_batch(plan: Plan, out: Path, reporter: Reporter, to: int | None = None) -> dict[str, Any] | None:
    """After running out of memory mid-run: half the batch (or `to`, where the checkpoint predates
    the last halving), as much more accumulation (the same global batch, so the learning rate, the
    data order and the checkpoint stay valid). Returns the last checkpoint to continue from."""
    (out / OUT_OF_MEMORY).unlink(missing_ok=True)
    before = plan.batch_size
    halve_batch(plan, to)
    _write_plan(out, plan)
    state = load_checkpoint(out / CHECKPOINT) if (out / CHECKPOINT).exists() else None
    _truncate_metrics(out / METRICS, state["step"] if state else 0)
    reporter.warn(
        f"out of memory at a batch of {before}: continuing with {plan.batch_size} × {plan.accumulation} "
        f"accumulated (the same global batch of {plan.effective_batch}) from "
        + (f"the checkpoint at step {state['step']:,}" if state else "the start")
    )
    return state


def _resume(
    state: dict[str, Any],
    root: Path,
    out: Path,
    overrides: Overrides,
    reporter: Reporter,
    world: World,
    labelled: bool = False,
) -> tuple[Plan, list[Path]]:
    plan = Plan.from_dict(state["plan"])
    if labelled:
        _choose_with_labels_in(plan)
    elif state["step"] >= plan.total_steps and (out / ENCODER).exists():
        raise UserError(
            f"{out} already holds a finished run ({out / ENCODER}); "
            "use --restart to train again or --out for a new run folder"
        )
    warn_changed_flags(overrides, plan, reporter)
    hw = detect_hardware(plan.device)  # fails clearly if that device is gone
    if plan.precision == "bf16" and hw.kind == "cuda" and not hw.bf16:
        reporter.warn(
            f"this run was planned in bf16, which {hw.name} only emulates, far slower than fp16: "
            "--restart plans the run anew for this GPU"
        )
    # The image list the run started with: the sampler's order depends on it.
    if not (out / IMAGES).is_file():
        raise UserError(f"{out / IMAGES}: missing, so the run cannot resume; use --restart to train again")
    paths = [root / name for name in read_names((out / IMAGES).read_text(encoding="utf-8"))]
    reporter.info(f"resuming the run in {out} from step {state['step']:,} of {plan.total_steps:,}")
    rescaled = fit_to_world(plan, world.size)
    if rescaled:
        reporter.info(rescaled)
        _write_plan(out, plan)
    return plan, paths


def _train(trainer: Trainer, out: Path, request: TrainRequest, reporter: Reporter, recalibrate: bool = False) -> None:
    """The loop with progress, metrics, checkpoints, Ctrl-C / SIGTERM handling and the budget re-plan
    (at the start, and again after the batch was halved: its steps take another time). Only rank 0
    writes; every rank runs the same steps."""
    from byolcli.training.terminal import training_progress

    plan, world = trainer.plan, trainer.world
    metrics = (out / METRICS).open("a", encoding="utf-8") if world.is_main else None

    def on_stop_request(signum: int) -> None:
        trainer.stop_requested = signum
        when = "after this step" if world.size == 1 else "at the next step all processes reach"
        again = " (Ctrl-C again to quit at once)" if world.size == 1 and signum == signal.SIGINT else ""
        reporter.warn(f"{signal.Signals(signum).name}: stopping {when} to save a checkpoint{again}")

    # Under a launcher a second signal is the launcher passing on the terminal's own.
    try:
        with (
            StopRequests(on_stop_request, second_quits=world.size == 1),
            training_progress(plan, trainer.step, reporter) as show,
        ):
            on_log = _metrics_logger(trainer, metrics, out / METRICS, show, reporter) if metrics else None

            def train_until(step: int) -> None:
                trainer.run(
                    step,
                    on_log=on_log,
                    on_checkpoint=(lambda _: trainer.save(out / CHECKPOINT)) if world.is_main else None,
                    log_every=request.log_every,
                    checkpoint_every=request.checkpoint_every,
                )

            if world.size > 1 and world.is_main and trainer.step == 0:
                trainer.save(out / CHECKPOINT)  # where every process continues if one runs out of memory
            calibrate = plan.time_budget is not None and (trainer.step == 0 or recalibrate)
            if calibrate and plan.total_steps - trainer.step > 2 * CALIBRATION[1]:
                _calibrate(trainer, train_until, out, reporter)
            train_until(plan.total_steps)
    finally:
        if metrics:
            with suppress(OSError):  # a full disk was reported where it happened
                metrics.close()
    if trainer.stopping and trainer.step < plan.total_steps:  # a stop asked for at the last step changes nothing
        reporter.info(
            f"stopped at step {trainer.step:,}; checkpoint saved in {out}. Run the same command again to resume."
        )
        raise Stopped(int(trainer.stopping))


def _metrics_logger(
    trainer: Trainer, metrics: TextIO, path: Path, show: Callable[[dict[str, Any]], None], reporter: Reporter
) -> Callable[[dict[str, Any]], None]:
    """What each metrics record goes through: a line of metrics.jsonl, the progress display, and a
    warning the first time the representation looks collapsed."""

    def on_log(record: dict[str, Any]) -> None:
        try:
            metrics.write(json.dumps(record) + "\n")
            metrics.flush()
        except OSError as exc:
            raise write_failed(path, exc) from exc
        show(record)
        if record["collapsed"] and not trainer.warned_collapse:
            trainer.warned_collapse = True
            reporter.warn(
                f"the representation looks collapsed at step {record['step']} (projection spread "
                f"{record['projection_std']}, effective rank {record['effective_rank']}): every image "
                "maps to nearly the same vector. The learning rate may be too high (--lr)."
            )

    return on_log


def _calibrate(trainer: Trainer, train_until: Callable[[int], None], out: Path, reporter: Reporter) -> None:
    """Under --time: train the calibration steps, then re-plan the run's length from their speed."""
    plan, world = trainer.plan, trainer.world
    budget = plan.time_budget
    assert budget is not None  # calibrated only under --time
    spent = trainer.step * plan.step_seconds  # by the steps before, at the speed last measured
    warm, timed = (trainer.step + steps for steps in CALIBRATION)
    started = time.perf_counter()
    train_until(warm)
    timing = time.perf_counter()
    train_until(timed)
    if trainer.stopping:
        return
    # Rank 0's clock decides for all, so every rank re-plans the same length.
    now = time.perf_counter()
    seconds_left, step_seconds = distributed.share(
        world, lambda: (budget - spent - (now - started), (now - timing) / (timed - warm))
    )
    warned = short_run_warning(plan) is not None  # said before the first step
    refit_to_budget(plan, trainer.step, seconds_left, step_seconds)
    if world.is_main:
        _write_plan(out, plan)
    reporter.info(
        f"re-planned from the measured speed: {plan.total_steps:,} steps "
        f"({plan.epochs:g} epochs) at {plan.step_seconds:.2f} s per step"
    )
    warning = short_run_warning(plan)
    if warning and not warned:
        reporter.warn(warning)


def _truncate_metrics(path: Path, step: int) -> None:
    """Drop metrics lines logged after the checkpoint we resume from, and a line torn by a crash
    or a full disk."""
    if not path.exists():
        return
    kept = []
    for line in path.read_text(encoding="utf-8", errors="replace").splitlines():
        try:
            if json.loads(line)["step"] <= step:
                kept.append(line)
        except (ValueError, KeyError, TypeError):
            pass
    atomic_write_text(path, "".join(f"{line}\n" for line in kept))


def _move_aside(out: Path, reporter: Reporter) -> None:
    """--restart: the previous run's files go to a sibling folder; the lock stays where it is held."""
    previous = [entry for entry in out.iterdir() if entry.name != LOCK]
    if not previous:
        return
    aside = out.with_name(f"{out.name}.old-{datetime.now():%Y%m%d-%H%M%S}")
    aside.mkdir()
    for entry in previous:
        shutil.move(str(entry), str(aside / entry.name))
    reporter.info(f"previous run moved to {aside}")
