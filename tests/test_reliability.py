"""Nothing lost, nothing mixed up: locks, SIGTERM, file names that map back, duplicate labels, a full disk."""

import codecs
import errno
import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from helpers import (
    TRAIN_ARGS,
    LockHolder,
    embed_on_cpu,
    noise_image,
    random_encoder_file,
    run_byol,
    run_byol_process,
    shapes_folder,
    start_training,
    wait_for_file,
)

from byolcli.core import embed as e
from byolcli.core.errors import Stopped, UserError, WriteFailed
from byolcli.core.labels import read_labels, repeated_warning
from byolcli.core.names import escape_name, read_names, write_names
from byolcli.core.terminal import Reporter
from byolcli.training.byol import BYOL

HOSTILE_NAMES = [
    "new\nline.png",
    "tab\there.png",
    "carriage\rreturn.png",
    os.fsdecode(b"latin1-\xe9t\xe9.png"),
    "back\\slash.png",
    "line\u2028separator.png",
    "plain.png",
]


@pytest.fixture(scope="module")
def encoder_file(tmp_path_factory):
    return random_encoder_file(tmp_path_factory.mktemp("model") / "encoder.safetensors")


def embed(folder, out, model, batch_size=4):
    return embed_on_cpu(folder, out, model, batch_size=batch_size)


# --- file names -------------------------------------------------------------------------


def test_every_name_survives_the_list_and_ordinary_names_are_written_as_they_are():
    names = [*HOSTILE_NAMES, "café ü.png", "nel\x85.png", "bell\x07.png", "zwj👩‍👧.png", "a b/c.png"]
    text = write_names(names)
    assert len(text.split("\n")) == len(names) + 1 and "\t" not in text and "\r" not in text
    assert len(text.splitlines()) == len(names)  # no separator str.splitlines() breaks on, either
    assert read_names(text) == names and read_names(text.rstrip("\n")) == names and read_names("") == []
    assert escape_name("plain.png") == "plain.png" and escape_name("café ü.png") == "café ü.png"
    assert escape_name("new\nline.png") == "new\\nline.png" and escape_name("back\\slash.png") == "back\\\\slash.png"
    # The README's snippet, without byolcli:
    assert [
        os.fsdecode(codecs.escape_decode(line.rstrip("\n").encode())[0]) for line in text.splitlines(keepends=True)
    ] == names


def test_each_row_belongs_to_the_file_the_map_names_whatever_its_name(tmp_path, encoder_file):
    folder = tmp_path / "photos"
    folder.mkdir()
    for seed, name in enumerate(HOSTILE_NAMES):
        noise_image((40, 36), seed=seed).save(folder / name, "PNG")
    (folder / "broken\tname.png").write_bytes(b"not a png")
    vectors, paths = embed(folder, tmp_path / "vecs.npy", encoder_file)
    assert sorted(paths) == sorted(HOSTILE_NAMES) and len(vectors) == len(HOSTILE_NAMES)
    for row, name in enumerate(paths):  # the file the map names, embedded on its own
        alone = tmp_path / f"alone{row}"
        alone.mkdir()
        os.link(folder / name, alone / "only.png")
        single, _ = embed(alone, tmp_path / f"alone{row}.npy", encoder_file)
        np.testing.assert_allclose(vectors[row], single[0], atol=1e-5)
    skipped = e.sidecars(tmp_path / "vecs.npy")["skipped"].read_text(encoding="utf-8").splitlines()
    assert skipped == ["broken\\tname.png\tnot an image"]
    # A rerun reads the map back and reuses every row.
    again, again_paths = embed(folder, tmp_path / "vecs.npy", encoder_file)
    assert again_paths == paths and np.array_equal(again, vectors)


def test_byol_embed_and_scan_take_names_that_are_not_utf8(tmp_path, encoder_file):
    folder = shapes_folder(tmp_path / "photos", count=6)
    for i, raw in enumerate((b"caf\xe9-1.png", b"caf\xe9-2.png")):
        noise_image(seed=i).save(folder / os.fsdecode(raw), "PNG")
    (folder / os.fsdecode(b"bad\xff.png")).write_bytes(b"")
    out = tmp_path / "vecs.npy"
    result = run_byol_process("embed", folder, "--out", out, "--model", encoder_file, "--precision", "fp32")
    assert result.returncode == 0 and "Traceback" not in result.stderr, result.stderr
    names = read_names(e.sidecars(out)["paths"].read_text(encoding="utf-8"))
    assert os.fsdecode(b"caf\xe9-1.png") in names and len(names) == 8
    assert e.sidecars(out)["skipped"].read_text(encoding="utf-8") == "bad\\xff.png\tzero bytes\n"
    scan = run_byol_process("scan", folder)
    assert scan.returncode == 0 and "Traceback" not in scan.stderr, scan.stderr


# --- labels -----------------------------------------------------------------------------


@pytest.mark.parametrize(
    "rows, message",
    [
        ("./a.jpg,cat\na.jpg,dog\n", "lines 2 and 3 both list a.jpg, as 'cat' and 'dog'"),
        ("a.jpg,cat,train\nsub/../a.jpg,cat,test\n", "lines 2 and 3 both list sub/../a.jpg, as 'train' and 'test'"),
    ],
)
def test_an_image_listed_twice_differently_is_an_error_naming_both_lines(tmp_path, rows, message):
    csv = tmp_path / "labels.csv"
    header = "path,label,split\n" if rows.count(",") > rows.count("\n") else "path,label\n"
    csv.write_text(header + rows)
    with pytest.raises(UserError, match=message.replace("(", r"\(").replace(")", r"\)")):
        read_labels(csv)


def test_an_image_listed_twice_alike_is_one_row_and_a_warning(tmp_path):
    csv = tmp_path / "labels.csv"
    csv.write_text(f"path,label\na.jpg,cat\nb.jpg,dog\n./a.jpg,cat\n{tmp_path / 'b.jpg'},dog\nc.jpg,cat\n")
    data = read_labels(csv)
    assert [p.name for p in data.paths] == ["a.jpg", "b.jpg", "c.jpg"] and data.labels == ["cat", "dog", "cat"]
    assert data.rows == [2, 3, 6]
    warning = repeated_warning(data, csv)
    assert "2 images listed twice with the same label" in warning and "lines 2 and 4: ./a.jpg" in warning


# --- one process per run folder and per output ---------------------------------------------


def test_a_second_training_process_on_a_run_folder_is_refused_with_the_first_ones_pid(tmp_path):
    folder = shapes_folder(tmp_path / "photos", count=16)
    run = tmp_path / "byol-runs" / "photos"
    first = start_training(folder, tmp_path)
    try:
        wait_for_file(first, run / "checkpoint.pt")
        plan_before = (run / "plan.json").read_text()
        second = run_byol("train", folder, "--epochs", "40", *TRAIN_ARGS, cwd=tmp_path)
        assert second.returncode == 2 and len(second.stderr.strip().splitlines()) == 1, second.stderr
        assert f"byol-runs/photos is in use by another byol process (PID {first.pid})" in second.stderr
        restart = run_byol("train", folder, "--restart", *TRAIN_ARGS, cwd=tmp_path)
        assert restart.returncode == 2 and f"PID {first.pid}" in restart.stderr
        assert (run / "plan.json").read_text() == plan_before and first.poll() is None
        assert not list(tmp_path.glob("byol-runs/photos.old-*"))  # --restart moved nothing aside
    finally:
        first.kill()
        first.communicate()


def test_a_second_embed_into_one_output_is_refused(tmp_path, encoder_file):
    folder = shapes_folder(tmp_path / "photos", count=4)
    out = tmp_path / "vecs.npy"
    with LockHolder(e.sidecars(out)["lock"]) as holder:
        result = run_byol("embed", folder, "--out", out, "--model", encoder_file)
        assert result.returncode == 2 and f"{out} is in use by another byol process (PID {holder.pid})" in result.stderr
        assert not out.exists()
    embed(folder, out, encoder_file)  # the lock went with the process
    assert out.exists()


def test_a_refused_start_leaves_no_run_folder_behind(tmp_path):
    folder = shapes_folder(tmp_path / "photos", count=16)
    run = tmp_path / "runs" / "new"
    refused = run_byol("-q", "train", folder, "--init", "imagenet", "--out", run, *TRAIN_ARGS)  # offline: no weights
    assert refused.returncode == 2 and len(refused.stderr.strip().splitlines()) == 1, refused.stderr
    assert "--init imagenet" in refused.stderr and not run.exists()
    mine = tmp_path / "mine"  # a folder the user made is left where it was
    mine.mkdir()
    assert run_byol("train", folder, "--init", "imagenet", "--out", mine, *TRAIN_ARGS).returncode == 2
    assert mine.is_dir()


def test_a_lock_whose_holder_removed_it_is_taken_afresh_by_the_process_that_waited(tmp_path):
    from byolcli.core.locks import exclusive

    lock = tmp_path / "made-by-the-holder" / ".lock"
    waited = []
    with LockHolder(lock) as holder:

        def release(pid):  # called once, when the lock is found held: let the holder go
            waited.append((pid, holder.release()))

        with exclusive(lock, tmp_path, waiting=release):
            assert waited == [(str(holder.pid), 0)]  # it removed its lock file and folder as it let go
            assert lock.read_text() == f"{os.getpid()}\n"  # the file at that path is the one held now
    assert not lock.parent.exists()  # made by the lock, empty again: removed


def test_two_vector_commands_on_one_folder_at_once_both_succeed_one_waiting_for_the_others_embedding(tmp_path):
    from byolcli.core.files import file_sha256
    from byolcli.vectors.store import cached_embedding

    folder = shapes_folder(tmp_path / "photos", count=12)
    model = random_encoder_file(tmp_path / "encoder.safetensors")
    lock = e.sidecars(cached_embedding(folder, file_sha256(model)))["lock"]
    with LockHolder(lock) as holder:  # a third command, embedding the folder when the two start
        groups = (sys.executable, "-m", "byolcli", "groups", folder, "--model", model, "--device", "cpu", "-k", "2")
        commands = [
            subprocess.Popen(
                [*groups, "--out", tmp_path / f"groups{i}.csv"],
                stdout=subprocess.PIPE,
                stderr=subprocess.PIPE,
                text=True,
            )
            for i in (1, 2)
        ]
        try:
            for command in commands:  # each reaches the lock and says it waits
                lines = iter(command.stderr.readline, "")
                assert any("waiting for another byol process" in line for line in lines), command.communicate()
            holder.release()
            results = [command.communicate(timeout=300) for command in commands]
        finally:
            for command in commands:
                command.kill()
    assert [command.returncode for command in commands] == [0, 0], results
    assert (tmp_path / "groups1.csv").read_text() == (tmp_path / "groups2.csv").read_text()
    assert any("embedding 0" in stderr for _, stderr in results)  # the second used what the first embedded


# --- SIGTERM --------------------------------------------------------------------------------


def test_sigterm_ends_training_with_143_and_the_same_command_resumes(tmp_path):
    folder = shapes_folder(tmp_path / "photos", count=16)
    run = tmp_path / "byol-runs" / "photos"
    process = start_training(folder, tmp_path, epochs=12)
    wait_for_file(process, run / "checkpoint.pt")  # the loop runs, with its signal handlers in place
    process.send_signal(signal.SIGTERM)
    _, stderr = process.communicate(timeout=120)
    assert process.returncode == 143 and "Traceback" not in stderr, stderr
    step = torch.load(run / "checkpoint.pt", weights_only=True)["step"]
    assert 0 < step < 24 and "SIGTERM: stopping after this step to save a checkpoint" in stderr
    assert json.loads((run / "metrics.jsonl").read_text().splitlines()[-1])["step"] == step

    result = run_byol("train", folder, "--epochs", "12", *TRAIN_ARGS, cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    assert f"resuming the run in byol-runs/photos from step {step}" in result.stderr


def test_sigterm_finishes_the_step_in_progress_and_checkpoints_it(tmp_path, monkeypatch):
    from helpers import tiny_plan

    from byolcli.training import engine, train

    folder = shapes_folder(tmp_path / "photos", count=16)
    trainer = engine.Trainer(tiny_plan(16, total_steps=10), sorted(folder.iterdir()))
    real_rate = engine.learning_rate

    def rate_then_sigterm(step, *args):
        if step == 2:
            os.kill(os.getpid(), signal.SIGTERM)  # during step 3
        return real_rate(step, *args)

    monkeypatch.setattr(engine, "learning_rate", rate_then_sigterm)
    out = tmp_path / "run"
    out.mkdir()
    request = train.TrainRequest(folder, checkpoint_every=3600.0)  # no periodic checkpoint comes
    with pytest.raises(Stopped) as stopped:
        train._train(trainer, out, request, Reporter(quiet=True))
    assert stopped.value.signum == signal.SIGTERM
    assert torch.load(out / "checkpoint.pt", weights_only=True)["step"] == 3 == trainer.step
    assert json.loads((out / "metrics.jsonl").read_text().splitlines()[-1])["step"] == 3
    assert signal.getsignal(signal.SIGTERM) == signal.SIG_DFL  # handlers put back


def test_a_stop_signal_during_embed_keeps_every_finished_batch(tmp_path, encoder_file, monkeypatch):
    folder = shapes_folder(tmp_path / "photos", count=13)
    whole, _ = embed(folder, tmp_path / "whole.npy", encoder_file)
    real = e.iter_embeddings

    def terminated(*args, **kwargs):
        for n, item in enumerate(real(*args, **kwargs)):
            if n == 1:
                os.kill(os.getpid(), signal.SIGTERM)  # arrives while the second batch is being stored
            yield item

    monkeypatch.setattr(e, "iter_embeddings", terminated)
    out = tmp_path / "vecs.npy"
    with pytest.raises(Stopped) as stopped:
        embed(folder, out, encoder_file)
    assert stopped.value.signum == signal.SIGTERM and not out.exists()
    assert json.loads(e.sidecars(out)["progress"].read_text())["done"] == 8  # both batches, not the last 4096

    seen = []
    monkeypatch.setattr(e, "iter_embeddings", lambda paths, *a, **k: seen.extend(paths) or real(paths, *a, **k))
    resumed, _ = embed(folder, out, encoder_file)
    assert len(seen) == 13 - 8
    np.testing.assert_allclose(resumed, whole, atol=1e-5)
    assert signal.getsignal(signal.SIGTERM) == signal.SIG_DFL  # handlers put back


# --- a full disk ------------------------------------------------------------------------------


@pytest.fixture
def small_disk(tmp_path):
    """A tmpfs of a chosen size (root and mount(8) needed; skipped elsewhere) and a way to grow it."""
    mount = tmp_path / "disk"
    mount.mkdir()

    def sized(nbytes: int) -> Path:
        options = f"size={nbytes}" if not os.path.ismount(mount) else f"remount,size={nbytes}"
        done = subprocess.run(["mount", "-t", "tmpfs", "-o", options, "tmpfs", str(mount)], capture_output=True)
        if done.returncode != 0:
            pytest.skip(f"cannot mount a tmpfs here ({done.stderr.decode().strip()[:80]})")
        return mount

    yield sized
    if os.path.ismount(mount):
        subprocess.run(["umount", str(mount)], check=True)


def checkpoint_bytes() -> int:
    """About what one checkpoint of a ResNet-18 BYOL run takes: model, target and LARS momentum."""
    model = BYOL("resnet18")
    state = sum(t.numel() * t.element_size() for t in model.state_dict().values())
    momentum = sum(p.numel() * p.element_size() for p in model.parameters() if p.requires_grad)
    return state + momentum


def test_disk_full_at_a_checkpoint_keeps_the_last_one_and_the_run_resumes(tmp_path, small_disk):
    folder = shapes_folder(tmp_path / "photos", count=16)
    disk = small_disk(int(1.5 * checkpoint_bytes()))  # room for one checkpoint, not for the next beside it
    run = disk / "run"
    result = run_byol("train", folder, "--epochs", "2", *TRAIN_ARGS, "--checkpoint-every", "0.01", "--out", run)
    assert result.returncode == 1 and "Traceback" not in result.stderr, result.stderr
    last = result.stderr.strip().splitlines()[-1]
    assert last.startswith(f"error: {run / 'checkpoint.pt'}: could not write it (No space left on device)")
    assert torch.load(run / "checkpoint.pt", weights_only=True)["step"] == 1  # the previous one, whole
    assert not [p for p in run.iterdir() if p.name.endswith(".tmp")] and not (run / "encoder.safetensors").exists()

    small_disk(4 * checkpoint_bytes())  # space freed
    result = run_byol("train", folder, "--epochs", "2", *TRAIN_ARGS, "--out", run)
    assert result.returncode == 0, result.stderr
    assert f"resuming the run in {run} from step 1 of 4" in result.stderr and (run / "encoder.safetensors").exists()


def test_disk_full_during_an_embed_keeps_the_previous_vectors(tmp_path, small_disk, encoder_file):
    folder = shapes_folder(tmp_path / "photos", count=8)
    disk = small_disk(64 * 1024)
    out = disk / "vecs.npy"
    first, first_paths = embed(folder, out, encoder_file)
    before = {p.name: p.read_bytes() for p in disk.iterdir()}
    shapes_folder(tmp_path / "more", count=40)
    for image in (tmp_path / "more").iterdir():
        image.rename(folder / f"more-{image.name}")
    result = run_byol("embed", folder, "--out", out, "--model", encoder_file, "--precision", "fp32")
    assert result.returncode == 1 and "Traceback" not in result.stderr, result.stderr
    assert result.stderr.strip().splitlines()[-1].startswith(f"error: {out}: could not write it (No space left")
    after = {p.name: p.read_bytes() for p in disk.iterdir()}
    for state in (before, after):
        state.pop(".vecs.npy.lock")  # holds the PID of whichever embed ran last
    assert after == before  # the earlier output whole, the partial file gone

    small_disk(1024 * 1024)
    vectors, paths = embed(folder, out, encoder_file)
    assert len(paths) == 48 and np.array_equal(vectors[[paths.index(p) for p in first_paths]], first)


def test_a_failed_checkpoint_write_keeps_the_previous_checkpoint(tmp_path, monkeypatch):
    from helpers import tiny_plan

    from byolcli.training.engine import Trainer

    folder = shapes_folder(tmp_path / "photos", count=16)
    trainer = Trainer(tiny_plan(16, total_steps=2), sorted(folder.iterdir()))
    path = tmp_path / "checkpoint.pt"
    trainer.save(path)
    saved = path.read_bytes()
    trainer.run(1)
    real_save = torch.save

    def full_disk(obj, file, *args, **kwargs):
        file.write(b"partial")
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(torch, "save", full_disk)
    with pytest.raises(WriteFailed, match=f"{path}: could not write it \\(No space left on device\\)"):
        trainer.save(path)
    monkeypatch.setattr(torch, "save", real_save)
    assert path.read_bytes() == saved and sorted(p.name for p in tmp_path.iterdir()) == ["checkpoint.pt", "photos"]


def test_a_failed_write_while_publishing_an_embed_changes_nothing(tmp_path, encoder_file, monkeypatch):
    folder = shapes_folder(tmp_path / "photos", count=6)
    out = tmp_path / "out" / "vecs.npy"
    embed(folder, out, encoder_file)
    before = {p.name: p.read_bytes() for p in out.parent.iterdir()}
    noise_image(seed=7).save(folder / "new.png")
    real_write = Path.write_text

    def full_disk(self, text, *args, **kwargs):
        if self.name.startswith(".vecs.meta.json"):
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        return real_write(self, text, *args, **kwargs)

    monkeypatch.setattr(Path, "write_text", full_disk)
    with pytest.raises(WriteFailed, match=f"{out}: could not write it"):
        embed(folder, out, encoder_file)
    monkeypatch.setattr(Path, "write_text", real_write)
    after = {p.name: p.read_bytes() for p in out.parent.iterdir() if not p.name.startswith(".vecs.npy.partial")}
    assert after == before  # the finished partial array waits for the rerun, nothing else changed
    seen = []
    real = e.iter_embeddings
    monkeypatch.setattr(e, "iter_embeddings", lambda paths, *a, **k: seen.extend(paths) or real(paths, *a, **k))
    _, paths = embed(folder, out, encoder_file)
    assert "new.png" in paths and seen == []  # published from the partial array, nothing embedded again


# --- hostile inputs, end to end -------------------------------------------------------------------


def hostile_folder(folder: Path) -> tuple[set[str], dict[str, str]]:
    """Every kind of file users' folders hold; returns (good images, bad file -> reason)."""
    from helpers import bomb_png, good_images
    from PIL import Image

    from byolcli.core import scan as s

    good = set(good_images(folder))
    rotated = noise_image((48, 32), seed=3)
    exif = rotated.getexif()
    exif[0x0112] = 6  # orientation: rotate 90° to view
    rotated.save(folder / "exif_rotated.jpg", exif=exif)
    noise_image(seed=4).save(folder / "png_named.jpg", "PNG")
    frames = [noise_image(seed=i) for i in range(3)]
    frames[0].save(folder / "animated.gif", save_all=True, append_images=frames[1:], duration=100, loop=0)
    frames[0].save(folder / "pages.tiff", save_all=True, append_images=frames[1:])
    noise_image((2000, 20), seed=5).save(folder / "panorama.png")
    good |= {"exif_rotated.jpg", "png_named.jpg", "animated.gif", "pages.tiff", "panorama.png"}

    (folder / "empty.jpg").write_bytes(b"")
    (folder / "text.jpg").write_text("not a picture\n" * 20)
    whole = folder / "whole.tmp"
    noise_image((200, 150)).save(whole, "JPEG", quality=95)
    (folder / "truncated.jpg").write_bytes(whole.read_bytes()[:2000])
    whole.unlink()
    bomb_png(folder / "bomb.png")
    noise_image((10, 8)).save(folder / "tiny.png")
    (folder / "dangling.jpg").symlink_to(folder / "gone.jpg")
    (folder / "._rgb.jpg").write_bytes(b"\x00\x05\x16\x07AppleDouble resource fork")  # macOS metadata, not an image
    (folder / "nested" / "._rgb.png").write_bytes(b"\x00\x05\x16\x07")
    assert {Image.open(folder / name).mode for name in ("deep_i16.png", "cmyk.jpg")} == {"I;16", "CMYK"}
    bad = {
        "empty.jpg": s.ZERO_BYTES,
        "text.jpg": s.NOT_AN_IMAGE,
        "truncated.jpg": s.UNDECODABLE,
        "bomb.png": s.TOO_MANY_PIXELS,
        "tiny.png": s.TOO_SMALL,
        "dangling.jpg": s.BROKEN_LINK,
    }
    return good, bad


@pytest.mark.parametrize("umask", [0o022, 0o077])
def test_every_file_written_has_the_mode_the_umask_gives(tmp_path, umask):
    folder = shapes_folder(tmp_path / "photos", count=16)
    run, vectors = tmp_path / "run", tmp_path / "vecs" / "vecs.npy"
    trained = run_byol("train", folder, "--epochs", "1", *TRAIN_ARGS, "--out", run, umask=umask)
    assert trained.returncode == 0, trained.stderr
    embedded = run_byol("embed", folder, "--out", vectors, "--model", run / "encoder.safetensors", umask=umask)
    assert embedded.returncode == 0, embedded.stderr
    written = [*run.iterdir(), *vectors.parent.iterdir()]
    names = {path.name for path in written}
    assert {"encoder.safetensors", "checkpoint.pt", "report.html", "plan.json", "vecs.npy", "vecs.meta.json"} <= names
    modes = {path.name: oct(path.stat().st_mode & 0o777) for path in written if path.is_file()}
    assert modes == dict.fromkeys(modes, oct(0o666 & ~umask))


def test_a_folder_of_hostile_files_goes_through_scan_train_embed_and_evaluate(tmp_path):
    folder = tmp_path / "photos"
    good, bad = hostile_folder(folder)
    run, out = tmp_path / "run", tmp_path / "vecs.npy"

    scanned = run_byol("scan", folder, "--all")
    trained = run_byol("train", folder, "--epochs", "1", *TRAIN_ARGS, "--out", run)
    embedded = run_byol("embed", folder, "--out", out, "--model", run / "encoder.safetensors", "--precision", "fp32")
    classes = {name: ("a", "b")[i % 2] for i, name in enumerate(sorted(good))}
    (tmp_path / "labels.csv").write_text("path,label\n" + "".join(f"{n},{c}\n" for n, c in classes.items()))
    evaluated = run_byol(
        "evaluate",
        "--labels",
        tmp_path / "labels.csv",
        "--root",
        folder,
        "--model",
        run / "encoder.safetensors",
        "--json",
        tmp_path / "scores.json",
    )
    for result in (scanned, trained, embedded, evaluated):
        assert result.returncode == 0 and "Traceback" not in result.stderr + result.stdout, result.stderr

    for name, reason in bad.items():
        assert f"skipped {name}: {reason}" in scanned.stdout
    assert read_names((run / "images.txt").read_text(encoding="utf-8")) == sorted(good)
    assert json.loads((run / "plan.json").read_text())["skipped"] == len(bad)
    assert sorted(read_names(e.sidecars(out)["paths"].read_text(encoding="utf-8"))) == sorted(good)
    skipped = dict(line.split("\t") for line in e.sidecars(out)["skipped"].read_text().splitlines())
    assert skipped == bad
    assert json.loads((tmp_path / "scores.json").read_text())["images"] == len(good)
