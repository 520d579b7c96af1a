import os
import shutil
import subprocess
import sys

import pytest
from helpers import (
    SHARED_DATA,
    TRAIN_ARGS,
    broken_files,
    deny_read,
    good_images,
    litter,
    noise_image,
    run_byol,
    shapes_folder,
)

from byolcli.core import scan as s
from byolcli.core.errors import UserError


@pytest.fixture
def mixed_folder(tmp_path, monkeypatch):
    folder = tmp_path / "photos"
    good = good_images(folder)
    bad = broken_files(folder)
    litter(folder)
    deny_read(monkeypatch, "locked.jpg")
    return folder, good, bad


def test_keeps_every_good_image_and_names_every_bad_one(mixed_folder):
    folder, good, bad = mixed_folder
    manifest = s.scan(folder)
    assert {i.path: i.format for i in manifest.images} == good
    assert {k.path: k.reason for k in manifest.skipped} == bad
    assert manifest.ignored == 1  # readme.txt
    assert manifest.root == folder.resolve()


def test_results_are_cached_and_only_changed_files_rechecked(mixed_folder, monkeypatch):
    folder, good, bad = mixed_folder
    first = s.scan(folder)
    calls = []
    real = s.check_image
    monkeypatch.setattr(s, "check_image", lambda path, size: calls.append(path) or real(path, size))

    again = s.scan(folder)
    assert calls == [] and again.reused == len(good) + len(bad)
    assert again.images == first.images and again.skipped == first.skipped

    noise_image((64, 64), seed=7).save(folder / "rgb.png")  # replaced, new size and mtime
    (folder / "added.jpg").write_bytes((folder / "rgb.jpg").read_bytes())
    third = s.scan(folder)
    assert sorted(os.path.basename(c) for c in calls) == ["added.jpg", "rgb.png"]
    assert {i.path for i in third.images} == set(good) | {"rgb.png", "added.jpg"}


def test_cache_is_never_written_inside_the_input_folder(tmp_path, monkeypatch):
    folder = tmp_path / "photos"
    good_images(folder)
    monkeypatch.setenv("BYOL_CACHE_DIR", str(folder / ".cache"))
    manifest = s.scan(folder)
    assert manifest.cache_file is None
    assert not (folder / ".cache").exists()


def test_symlink_loops_and_links_are_walked_once(tmp_path):
    folder = tmp_path / "photos"
    (folder / "a").mkdir(parents=True)
    noise_image().save(folder / "a" / "x.jpg")
    os.symlink("..", folder / "a" / "loop")
    os.symlink(folder / "a", folder / "alias")
    manifest = s.scan(folder)
    assert [i.path for i in manifest.images] == ["a/x.jpg"]


def test_unreadable_subfolder_is_reported_and_the_rest_scanned(tmp_path, monkeypatch):
    folder = tmp_path / "photos"
    (folder / "locked").mkdir(parents=True)
    noise_image().save(folder / "ok.jpg")
    noise_image().save(folder / "locked" / "hidden.jpg")
    real_scandir = os.scandir

    def scandir(path):
        if str(path).endswith("locked"):
            raise PermissionError(13, "Permission denied")
        return real_scandir(path)

    monkeypatch.setattr(s.os, "scandir", scandir)
    manifest = s.scan(folder)
    assert [i.path for i in manifest.images] == ["ok.jpg"]
    assert [(k.path, k.reason) for k in manifest.skipped] == [("locked", s.UNREADABLE_FOLDER)]


def test_parallel_validation_matches_serial(tmp_path):
    folder = tmp_path / "many"
    folder.mkdir()
    template = folder / "t.jpg"
    noise_image((20, 20)).save(template)
    for i in range(s.PARALLEL_THRESHOLD + 100):
        shutil.copyfile(template, folder / f"{i:04d}.jpg")
    (folder / "0005.jpg").write_bytes(b"")
    template.unlink()
    parallel = s.scan(folder, use_cache=False)
    serial = {p: s.check_image(folder / p, (folder / p).stat().st_size) for p in ("0004.jpg", "0005.jpg")}
    assert len(parallel.images) == s.PARALLEL_THRESHOLD + 99
    assert [(k.path, k.reason) for k in parallel.skipped] == [("0005.jpg", s.ZERO_BYTES)]
    assert serial["0005.jpg"][3] == s.ZERO_BYTES and serial["0004.jpg"][3] == ""


@pytest.mark.parametrize("make", ["missing", "file", "empty", "only_broken"])
def test_unusable_folders_raise_user_error(tmp_path, make):
    target = tmp_path / "x"
    if make == "file":
        noise_image().save(target, "PNG")
    elif make == "empty":
        target.mkdir()
    elif make == "only_broken":
        target.mkdir()
        (target / "empty.jpg").write_bytes(b"")
    with pytest.raises(UserError, match=str(target)):
        s.scan(target)


# --- the command line ---------------------------------------------------------


def test_byol_scan_prints_summary_and_exits_zero(tmp_path):
    folder = tmp_path / "photos"
    good = good_images(folder)
    broken_files(folder)
    result = run_byol("scan", folder, "--all")
    assert result.returncode == 0, result.stderr
    assert f"{len(good) + 1} images" in result.stdout  # + locked.jpg, readable here
    for reason in (s.ZERO_BYTES, s.NOT_AN_IMAGE, s.UNDECODABLE, s.TOO_MANY_PIXELS, s.TOO_SMALL):
        assert reason in result.stdout
    assert "skipped cut_short.jpg: truncated or undecodable" in result.stdout
    for fmt in ("JPEG", "PNG", "WEBP", "BMP", "TIFF", "GIF"):
        assert fmt in result.stdout
    rerun = run_byol("scan", folder)
    assert "results reused from the scan cache" in rerun.stdout


def test_an_unwritable_cache_is_said_once_and_scan_train_and_embed_go_on(tmp_path):
    folder = shapes_folder(tmp_path / "photos", count=16)
    blocker = tmp_path / "not-a-folder"
    blocker.write_text("a file where the cache folder should be: no one can write under it, root included")
    unwritable = {"BYOL_CACHE_DIR": str(blocker / "cache")}
    run = tmp_path / "run"
    results = [
        run_byol("scan", folder, env_extra=unwritable),
        run_byol("train", folder, "--epochs", "1", *TRAIN_ARGS, "--out", run, env_extra=unwritable),
        run_byol(
            "embed",
            folder,
            "--out",
            tmp_path / "vecs.npy",
            "--model",
            run / "encoder.safetensors",
            env_extra=unwritable,
        ),
    ]
    for result in results:
        assert result.returncode == 0, result.stderr
        warnings = [line for line in result.stderr.splitlines() if "will not be cached" in line]
        assert len(warnings) == 1 and str(blocker) in warnings[0], result.stderr
    assert "16 images" in results[0].stdout
    assert (run / "encoder.safetensors").is_file() and (tmp_path / "vecs.npy").is_file()


@pytest.mark.parametrize(
    "make, message", [("missing", "no such folder"), ("file", "is a file, not a folder"), ("empty", "no usable images")]
)
def test_byol_scan_bad_input_is_one_line_exit_2(tmp_path, make, message):
    target = tmp_path / "input"
    if make == "file":
        target.write_text("x")
    elif make == "empty":
        target.mkdir()
    result = run_byol("scan", target)
    assert result.returncode == 2
    assert "Traceback" not in result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and message in lines[0] and "input" in lines[0]


def test_debug_shows_the_traceback(tmp_path):
    result = run_byol("--debug", "scan", tmp_path / "missing")
    assert result.returncode != 0 and "Traceback" in result.stderr


def test_help_does_not_import_torch():
    code = "import sys, byolcli, byolcli.cli; print('torch' in sys.modules)"
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert result.stdout.strip() == "False"
    assert run_byol("--help").returncode == 0


@pytest.mark.skipif(not (SHARED_DATA / "clothing10").is_dir(), reason="../shared/data not present")
def test_scan_real_read_only_folder_writes_nothing_there():
    folder = SHARED_DATA / "clothing10"
    before = sorted((p, p.stat().st_mtime_ns) for p in folder.rglob("*"))
    result = run_byol("scan", folder)
    assert result.returncode == 0, result.stderr
    assert "3,781 images" in result.stdout
    assert sorted((p, p.stat().st_mtime_ns) for p in folder.rglob("*")) == before
