"""The `byol` command: parse flags, call one function per command, show the result.

No ML here, and no torch import at module level: `byol --help` must stay fast.
"""

from __future__ import annotations

import contextlib
import os
import re
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any, Optional

import typer

from byolcli.core.errors import OutOfMemoryAcrossRanks, PeerFailed, Stopped, TrainingFailed, UserError, WriteFailed

if TYPE_CHECKING:
    from byolcli.core.terminal import Reporter

app = typer.Typer(
    add_completion=False,
    no_args_is_help=True,
    rich_markup_mode="markdown",
    help="Train a BYOL image encoder on a folder of unlabeled images, then embed and evaluate with it. "
    "Every choice has a printed default derived from your data and hardware; every default has a flag.",
)


class _State:
    debug = False
    quiet = False


state = _State()


@app.callback()
def _global(
    debug: bool = typer.Option(False, "--debug", help="Show full tracebacks instead of one-line errors."),
    quiet: bool = typer.Option(False, "--quiet", "-q", help="No progress bars or chatter; results and errors only."),
) -> None:
    state.debug = debug
    state.quiet = quiet


# What each error says first, and the exit code it ends with.
ONE_LINE_ERRORS = (
    (UserError, "error", 2),
    (WriteFailed, "error", 1),
    (OutOfMemoryAcrossRanks, "out of memory", OutOfMemoryAcrossRanks.EXIT_CODE),
    (TrainingFailed, "training failed", 1),
)


@contextlib.contextmanager
def user_errors() -> Iterator[None]:
    """Turn bad input, failed writes and failed training into one line on stderr and an exit code
    (a traceback with --debug)."""
    # In a distributed run, say which process speaks (rank 0 speaks for the run).
    who = f"rank {os.environ['RANK']}: " if os.environ.get("RANK", "0") != "0" else ""
    try:
        yield
    except tuple(kind for kind, _, _ in ONE_LINE_ERRORS) as exc:
        if state.debug:
            raise
        from rich.markup import escape

        from byolcli.core.terminal import err

        prefix, code = next((prefix, code) for kind, prefix, code in ONE_LINE_ERRORS if isinstance(exc, kind))
        err.print(f"[bold red]{prefix}:[/] {escape(who + str(exc))}", highlight=False, soft_wrap=True)
        raise typer.Exit(code) from None
    except PeerFailed as exc:  # rank 0 has printed why
        raise typer.Exit(exc.exit_code) from None
    except Stopped as exc:  # the work so far is saved, and the command said so
        raise typer.Exit(128 + exc.signum) from None
    except KeyboardInterrupt:
        raise typer.Exit(130) from None


def _reporter() -> Reporter:
    from byolcli.core.terminal import Reporter

    return Reporter(quiet=state.quiet)


def parse_duration(text: str, flag: str = "--time") -> float:
    """'90s', '30m', '2h', '1h30m' or plain seconds -> seconds."""
    text = text.strip().lower()
    if re.fullmatch(r"\d+(\.\d+)?", text):
        seconds = float(text)
        if seconds <= 0:
            raise UserError(f"{flag} {text!r}: must be longer than zero")
        return seconds
    parts = re.findall(r"(\d+(?:\.\d+)?)\s*([hms])", text)
    if not parts or re.sub(r"(\d+(?:\.\d+)?)\s*([hms])", "", text).strip():
        raise UserError(f"{flag} {text!r}: not a duration (use e.g. 90s, 30m, 2h, 1h30m)")
    seconds = sum(float(n) * {"h": 3600, "m": 60, "s": 1}[u] for n, u in parts)
    if seconds <= 0:
        raise UserError(f"{flag} {text!r}: must be longer than zero")
    return seconds


def flag(help_text: str, *names: str) -> Any:
    """An optional flag whose default means 'choose for me'."""
    return typer.Option(None, *names, help=help_text, show_default=False)


FOLDER = typer.Argument(..., help="Folder of images (searched recursively). Never written to.", show_default=False)
MODEL_HELP = (
    "An exported encoder.safetensors; 'imagenet' for torchvision's ImageNet weights (--arch, --image-size); "
    "or a plain torchvision ResNet state dict in safetensors (with --arch and --image-size)."
)
MODEL = flag(f"{MODEL_HELP} \\[default: the most recent run's encoder]")
ARCH = flag(
    "resnet18, resnet34 or resnet50: the architecture of --model imagenet (default resnet18) or of a plain state dict."
)
IMAGE_SIZE = flag(
    "Input size in pixels: for --model imagenet (default 224) or a plain state dict; "
    "for an encoder file, instead of the size it was trained at."
)


@app.command()
def scan(
    folder: Path = FOLDER,
    all_skipped: bool = typer.Option(False, "--all", help="List every skipped file, not only the first few."),
    no_cache: bool = typer.Option(False, "--no-cache", help="Re-check every file instead of reusing the last scan."),
) -> None:
    """Find and check the images in FOLDER: what would be used, what is skipped and why.

    Walks FOLDER recursively (jpg, jpeg, png, webp, bmp, gif, tif, tiff; heic, heif, avif with the
    *heif* extra), skips hidden files and OS litter, and decodes every image to catch broken ones.
    Results are cached per folder outside it, so a rerun only re-checks files that changed.
    """
    with user_errors():
        from byolcli.core.scan import scan as run_scan
        from byolcli.core.terminal import scan_report

        reporter = _reporter()
        with reporter.progress("checking images") as progress:
            manifest = run_scan(folder, progress=progress, use_cache=not no_cache, warn=reporter.warn)
        scan_report(manifest, show_all_skipped=all_skipped)


@app.command()
def train(
    folder: Path = FOLDER,
    out: Optional[Path] = flag(
        "Run folder for plan, checkpoints, metrics and the encoder. \\[default: ./byol-runs/<folder name>]"
    ),
    time: Optional[str] = flag("Wall-clock budget, e.g. 30m or 2h; the plan picks the epochs to fit it.", "--time"),
    epochs: Optional[int] = flag("Number of epochs (instead of --time)."),
    backbone: Optional[str] = flag("resnet18, resnet34 or resnet50. \\[default: chosen for the hardware]"),
    image_size: Optional[int] = flag("Training crop size in pixels. \\[default: chosen from the images and hardware]"),
    stem: Optional[str] = flag(
        "The backbone's first layers: standard (torchvision's 7x7 stride-2 convolution and max-pool) "
        "or small (3x3 stride 1, no max-pool, for images of 32-64 px). \\[default: standard]"
    ),
    batch_size: Optional[int] = flag(
        "Images per step on the device. \\[default: the largest that fits, probed on GPUs]"
    ),
    lr: Optional[float] = flag(
        "Base learning rate for batch 256 (scaled with the batch). \\[default: from the run length]"
    ),
    device: Optional[str] = flag("cuda, cuda:N, mps or cpu. \\[default: the best available]"),
    workers: Optional[int] = flag("Data-loading processes. \\[default: from the CPU cores]"),
    precision: Optional[str] = flag("fp32, bf16 or fp16. \\[default: the fastest the device supports]"),
    augment_on: Optional[str] = flag(
        "Where views are augmented: cpu (loader processes) or device (batched on the GPU, per-image "
        "parameters). \\[default: device on CUDA at >= 96 px]"
    ),
    init: Optional[str] = flag(
        "Starting weights: auto (torchvision's ImageNet weights when cached or downloadable, else random), "
        "random, imagenet (insist), or a file: an exported encoder or a plain torchvision state dict "
        "(with --backbone). \\[default: auto]"
    ),
    mix: Optional[float] = flag(
        "For a start from weights: how far the exported encoder moves from the start toward the trained "
        "weights, 0 to 1; its batch-norm statistics are then measured on FOLDER. \\[default: chosen in the plan]"
    ),
    start_size: Optional[int] = flag(
        "Pixels the --init file's weights were trained at, where the file does not say (ImageNet's: 224); "
        "a start's images are upsampled toward it."
    ),
    labels: Optional[Path] = flag(
        "A labels CSV (as for byol evaluate) of some of FOLDER's images: after training, the start (also "
        "with FOLDER's batch-norm statistics), the mix and the trained weights are scored on as many of them as "
        "a tenth of the run's compute allows; the mix is exported unless another scores clearly better. Also on "
        "a finished run."
    ),
    seed: int = typer.Option(0, help="Random seed for initialisation, order and augmentation."),
    restart: bool = typer.Option(
        False,
        "--restart",
        help="Start over in a run folder that already holds a run (the old run is moved aside, not deleted).",
    ),
    checkpoint_every: str = typer.Option(
        "5m", help="How often to save a checkpoint (also saved at the end and on Ctrl-C or SIGTERM)."
    ),
    gpus: Optional[str] = flag(
        "Train data-parallel on this machine's GPUs: 'all' or a count, one process each. For several "
        "machines, launch with torchrun (see docs/gpus.md)."
    ),
) -> None:
    """Train a BYOL encoder on FOLDER and export it as encoder.safetensors.

    Scans FOLDER, plans for this machine (device, backbone, image size, batch, precision, epochs,
    learning rate, EMA rate), prints the plan, then trains. Rerunning the same command after an
    interruption (Ctrl-C, SIGTERM, crash, kill -9) resumes from the last checkpoint. Only the encoder f_θ
    is exported; projector, predictor and target network are discarded.
    """
    with user_errors():
        from byolcli.core.inputs import AUTO, IMAGENET, RANDOM, require_file, require_folder, require_model_file
        from byolcli.training.plan import Overrides
        from byolcli.training.train_flags import validate

        # Under a launcher every process runs this command: the run's own checks on rank 0 speak for all.
        launched = "WORLD_SIZE" in os.environ
        if not launched:
            require_folder(folder)
            require_model_file(init, (AUTO, RANDOM, IMAGENET))
            if labels is not None:
                require_file(labels)
        choices = Overrides(
            backbone=backbone,
            image_size=image_size,
            batch_size=batch_size,
            epochs=epochs,
            time_budget=parse_duration(time) if time is not None else None,
            lr=lr,
            device=device,
            workers=workers,
            precision=precision,
            augment_on=augment_on,
            init=init,
            stem=stem,
            mix=mix,
            start_size=start_size,
            seed=seed,
        )
        checkpoint_seconds = parse_duration(checkpoint_every, "--checkpoint-every")
        if not launched and init in (None, AUTO, RANDOM, IMAGENET):
            validate(choices)  # before torch is imported; an --init file is read, with torch, by the run
        if gpus is not None:
            from byolcli.training.distributed import gpu_processes, launch_local

            processes = gpu_processes(gpus, device)
            if processes > 1:  # each process runs this same command, without --gpus
                raise typer.Exit(launch_local(processes, _without_option(sys.argv[1:], "--gpus")))
        from byolcli.training.train import TrainRequest, train_folder

        request = TrainRequest(
            folder=folder, choices=choices, out=out, restart=restart, checkpoint_every=checkpoint_seconds, labels=labels
        )
        train_folder(request, _reporter())


def _without_option(argv: list[str], name: str) -> list[str]:
    """argv minus `name VALUE` or `name=VALUE`."""
    kept, skip = [], False
    for arg in argv:
        if skip:
            skip = False
        elif arg == name:
            skip = True
        elif not arg.startswith(f"{name}="):
            kept.append(arg)
    return kept


@app.command()
def embed(
    folder: Path = FOLDER,
    out: Path = typer.Option(
        ...,
        help=(
            "Where to write the vectors (.npy); beside it go <name>.paths.txt (row order), "
            "<name>.skipped.txt and <name>.meta.json."
        ),
        show_default=False,
    ),
    model: Optional[Path] = MODEL,
    arch: Optional[str] = ARCH,
    image_size: Optional[int] = IMAGE_SIZE,
    normalize: bool = typer.Option(False, "--normalize", help="L2-normalise each row."),
    dtype: str = typer.Option("float32", help="float32 or float16 (half the size)."),
    batch_size: int = typer.Option(256, help="Images per forward pass."),
    workers: Optional[int] = flag("Decoding processes. \\[default: from the CPU cores]"),
    device: Optional[str] = flag("cuda, mps or cpu. \\[default: the best available]"),
    precision: Optional[str] = flag(
        "fp32 (exact), bf16 or fp16. \\[default: bf16 where the hardware computes it natively, else fp32]"
    ),
) -> None:
    """Embed every image of FOLDER with an encoder: one row per image in OUT.

    Row i of OUT belongs to line i of <name>.paths.txt (paths relative to FOLDER, UTF-8, one per
    line; a backslash, tab, line break or other control character in a name is written as a Python
    bytes escape, e.g. \\n); files that could not be used are listed with their reason in
    <name>.skipped.txt. A rerun embeds only new or changed images; an interrupted run (Ctrl-C,
    SIGTERM, a full disk) continues where it stopped. Image size and normalisation come from the
    encoder file.
    """
    with user_errors():
        from byolcli.core.inputs import (
            EMBEDDING_DTYPES,
            PRECISIONS,
            require_choice,
            require_folder,
            require_model_flags,
        )

        require_folder(folder)
        require_model_flags(model, arch, image_size)
        require_choice("--precision", precision, PRECISIONS)
        require_choice("--dtype", dtype, EMBEDDING_DTYPES)
        from byolcli.core.embed import embed_command

        embed_command(
            folder,
            out,
            reporter=_reporter(),
            model=model,
            normalize=normalize,
            dtype=dtype,
            batch_size=batch_size,
            workers=workers,
            device=device,
            precision=precision,
            arch=arch,
            image_size=image_size,
        )


@app.command()
def evaluate(
    folder: Optional[Path] = typer.Argument(
        None, help="Judge the encoder on this folder without labels (instead of --labels).", show_default=False
    ),
    labels: Optional[Path] = flag(
        "CSV with a header: an image path column (path/file/filename/image) and a label column "
        "(label/class/category); optional split column."
    ),
    model: Optional[Path] = MODEL,
    arch: Optional[str] = ARCH,
    image_size: Optional[int] = IMAGE_SIZE,
    root: Optional[Path] = flag("Folder the CSV paths are relative to. \\[default: the CSV's folder]"),
    embeddings: Optional[Path] = flag(
        "Evaluate vectors from `byol embed` (its .npy, with the files beside it) instead of embedding again."
    ),
    baseline: Optional[Path] = flag(
        "Another encoder file to compare against, side by side, or 'imagenet' for torchvision's "
        "pretrained weights of the same architecture."
    ),
    skip_missing: bool = typer.Option(
        False,
        "--skip-missing",
        help="Evaluate the rows whose files exist (and decode) instead of stopping at the first problem.",
    ),
    device: Optional[str] = flag("cuda, mps or cpu. \\[default: the best available]"),
    json_out: Optional[Path] = flag("Also write the results as JSON here.", "--json"),
    report: Optional[Path] = flag(
        "Write a self-contained HTML page here (DIR/index.html): nearest neighbours of a few images "
        "per class, and the confusion matrix."
    ),
    start_size: Optional[int] = flag(
        "Pixels the encoder's starting weights were trained at, for a start from a plain weights file "
        "(ImageNet's and byolcli encoders record theirs); the start is also scored at that size."
    ),
) -> None:
    """How good is the encoder, compared with an untrained one: on your labels, or without any.

    With --labels: weighted kNN (k=20, T=0.07, cosine) and a linear probe, on the CSV's split or by
    stratified cross-validation. With FOLDER: effective rank (RankMe), alignment, uniformity and
    near-duplicates of a seeded sample, and its nearest neighbours (--report). Both side by side with
    a random-init encoder of the same architecture.
    """
    with user_errors():
        from byolcli.core.inputs import require_file, require_folder, require_image_size, require_model_flags

        if (folder is None) == (labels is None):
            raise UserError("give FOLDER to judge without labels, or --labels CSV, not both or neither")
        for path in filter(None, (folder, root)):
            require_folder(path)
        if labels is not None:
            require_file(labels)
        require_model_flags(model, arch, image_size)
        require_model_flags(baseline, None, None)
        require_image_size(start_size, "--start-size")
        if folder is not None:
            from byolcli.evaluation.evaluate import evaluate_folder_command

            if root or embeddings or baseline or start_size:
                raise UserError("--root, --embeddings, --baseline and --start-size go with --labels")
            evaluate_folder_command(
                folder,
                reporter=_reporter(),
                model=model,
                arch=arch,
                image_size=image_size,
                device=device,
                json_out=json_out,
                report_dir=report,
            )
            return
        from byolcli.evaluation.evaluate import evaluate_command

        assert labels is not None  # one of FOLDER and --labels, checked above
        evaluate_command(
            labels,
            reporter=_reporter(),
            model=model,
            root=root,
            device=device,
            json_out=json_out,
            embeddings=embeddings,
            baseline=baseline,
            skip_missing=skip_missing,
            report_dir=report,
            arch=arch,
            image_size=image_size,
            start_size=start_size,
        )


@app.command()
def export(
    model: Path = typer.Argument(..., help=MODEL_HELP, show_default=False),
    onnx: Path = typer.Option(..., "--onnx", help="Where to write the ONNX model.", show_default=False),
    batch: str = typer.Option("1", help="Images per call the model takes: a number, or 'dynamic' for any."),
    fp16: bool = typer.Option(
        False, "--fp16", help="Weights and arithmetic in float16 (half the file); the output stays float32."
    ),
    arch: Optional[str] = ARCH,
    image_size: Optional[int] = IMAGE_SIZE,
) -> None:
    r"""Export an encoder as ONNX, for onnxruntime, TensorRT, a browser, a phone or C++.

    The model takes uint8 RGB images, shape (batch, 3, size, size), resized on the short side and
    centre-cropped as `byol embed` does, and returns float32 embeddings, shape (batch, features):
    the normalisation is inside. The file's metadata says the same, with the encoder's own. The
    export is checked with onnx's checker and against PyTorch with onnxruntime. Needs the *onnx*
    extra: pip install "byolcli\[onnx]".
    """
    with user_errors():
        from byolcli.core.inputs import require_model_flags

        require_model_flags(model, arch, image_size)
        from byolcli.core.export import export_onnx

        export_onnx(model, onnx, batch, fp16, _reporter(), arch=arch, image_size=image_size)


SOURCE = typer.Argument(
    ...,
    help="A folder of images (embedded with --model, reusing unchanged images' vectors from the cache), "
    "or a `byol embed` output (.npy, with its .paths.txt beside it).",
    show_default=False,
)
REPORT = flag("Write a self-contained HTML gallery page here (DIR/index.html).")
DEVICE = flag("cuda, mps or cpu, for embedding. \\[default: the best available]")


@app.command()
def similar(
    queries: list[Path] = typer.Argument(
        ..., help="Images to find similar ones for: paths in the folder, or any image files.", show_default=False
    ),
    source: Path = typer.Option(
        ..., "--in", help="The folder or `byol embed` output (.npy) to search.", show_default=False
    ),
    k: int = typer.Option(10, "-k", help="How many similar images per query."),
    json_out: Optional[Path] = flag("Also write the results as JSON here.", "--json"),
    report: Optional[Path] = REPORT,
    model: Optional[Path] = MODEL,
    arch: Optional[str] = ARCH,
    image_size: Optional[int] = IMAGE_SIZE,
    device: Optional[str] = DEVICE,
) -> None:
    """The images most like each QUERY, by cosine similarity of their vectors, most similar first."""
    with user_errors():
        from byolcli.vectors.commands import similar_command

        similar_command(
            queries,
            source,
            reporter=_reporter(),
            k=k,
            model=model,
            arch=arch,
            image_size=image_size,
            device=device,
            json_out=json_out,
            report_dir=report,
        )


@app.command()
def duplicates(
    source: Path = SOURCE,
    threshold: Optional[float] = flag(
        "Cosine similarity from which two images' pixels are compared, in (0, 1]. "
        "\\[default: measured, printed as it runs]"
    ),
    vectors_only: bool = typer.Option(
        False,
        "--vectors-only",
        help="Decide by the vectors alone, without comparing pixels: images that show the same thing, "
        "not only copies of one picture.",
    ),
    out: Optional[Path] = flag("Write the groups here as CSV: group,path,similarity (the kept image first)."),
    report: Optional[Path] = REPORT,
    model: Optional[Path] = MODEL,
    arch: Optional[str] = ARCH,
    image_size: Optional[int] = IMAGE_SIZE,
    device: Optional[str] = DEVICE,
) -> None:
    """Groups of near-duplicate images: byte-identical files, then pairs whose vectors are at least
    --threshold similar and whose pixels agree (the fine detail of small grey thumbnails, either way
    round, whole or a little cropped), joined: a near-duplicate of a near-duplicate is in the same
    group. The kept image of a group is its largest file."""
    with user_errors():
        from byolcli.vectors.commands import duplicates_command

        duplicates_command(
            source,
            reporter=_reporter(),
            threshold=threshold,
            pixel_check=not vectors_only,
            out=out,
            report_dir=report,
            model=model,
            arch=arch,
            image_size=image_size,
            device=device,
        )


@app.command()
def groups(
    source: Path = SOURCE,
    k: Optional[int] = typer.Option(
        None, "-k", help="How many groups. \\[default: the highest silhouette on a sample]", show_default=False
    ),
    out: Optional[Path] = flag("Write each image's group here as CSV: path,group,distance (1 − cosine)."),
    report: Optional[Path] = REPORT,
    seed: int = typer.Option(0, help="Random seed of the k-means."),
    model: Optional[Path] = MODEL,
    arch: Optional[str] = ARCH,
    image_size: Optional[int] = IMAGE_SIZE,
    device: Optional[str] = DEVICE,
) -> None:
    """What kinds of images the folder holds: spherical k-means groups of the vectors, each with its
    most and least typical members."""
    with user_errors():
        from byolcli.vectors.commands import groups_command

        groups_command(
            source,
            reporter=_reporter(),
            k=k,
            out=out,
            report_dir=report,
            seed=seed,
            model=model,
            arch=arch,
            image_size=image_size,
            device=device,
        )


@app.command()
def select(
    source: Path = SOURCE,
    n: int = typer.Option(..., "-n", help="How many images to choose.", show_default=False),
    out: Path = typer.Option(
        ..., help="Write the chosen paths here, one per line, first choice first.", show_default=False
    ),
    labels: Optional[Path] = flag("A labels CSV (as for byol evaluate): leave out what it already has."),
    by: str = typer.Option(
        "typical",
        "--by",
        help="typical: the most typical image of each of n k-means groups (TypiClust); spread: each next "
        "image the farthest from those chosen (k-center greedy).",
    ),
    seed: int = typer.Option(0, help="Random seed of the k-means."),
    model: Optional[Path] = MODEL,
    arch: Optional[str] = ARCH,
    image_size: Optional[int] = IMAGE_SIZE,
    device: Optional[str] = DEVICE,
) -> None:
    """Which images to label first: n images that between them teach a classifier the most."""
    with user_errors():
        from byolcli.vectors.commands import select_command

        select_command(
            source,
            n,
            out,
            reporter=_reporter(),
            labels=labels,
            strategy=by,
            seed=seed,
            model=model,
            arch=arch,
            image_size=image_size,
            device=device,
        )


def main() -> None:
    app()


if __name__ == "__main__":
    main()
