import hashlib
import json
import shutil

import numpy as np
import pytest
import torch
from helpers import embed_on_cpu, noise_image, random_encoder_file, run_byol, shapes_folder

from byolcli.core import embed as e
from byolcli.core.encoder import load_encoder
from byolcli.core.inference import load_for_embedding
from byolcli.core.pixels import MEAN, STD, normalize_images


@pytest.fixture(scope="module")
def encoder_file(tmp_path_factory):
    return random_encoder_file(tmp_path_factory.mktemp("model") / "encoder.safetensors")


@pytest.fixture
def folder(tmp_path):
    photos = shapes_folder(tmp_path / "photos", count=12, size=40)
    noise_image((64, 48), seed=5).save(photos / "big.jpg")
    return photos


def embed(folder, out, model, batch_size=5, workers=0, normalize=False, dtype="float32", precision="fp32"):
    return embed_on_cpu(
        folder,
        out,
        model,
        batch_size=batch_size,
        workers=workers,
        normalize=normalize,
        dtype=dtype,
        precision=precision,
    )


def test_each_row_is_the_embedding_of_its_file_alone(folder, encoder_file, tmp_path):
    vectors, paths = embed(folder, tmp_path / "vecs.npy", encoder_file)
    assert paths == sorted(p.name for p in folder.iterdir()) and vectors.shape == (13, 512)
    model = load_encoder(encoder_file)
    for row in (0, 7, 12):
        image = normalize_images(load_for_embedding(folder / paths[row], 32)[None], MEAN, STD)
        with torch.no_grad():
            alone = model(image)[0].numpy()
        np.testing.assert_allclose(vectors[row], alone, atol=1e-4)


def test_images_are_resized_on_the_short_side_and_centre_cropped(tmp_path):
    from PIL import Image

    picture = Image.new("RGB", (300, 100), (255, 0, 0))
    picture.paste((0, 0, 255), (100, 0, 200, 100))  # blue middle third
    picture.save(tmp_path / "wide.png")
    pixels = load_for_embedding(tmp_path / "wide.png", 32)
    assert pixels.shape == (3, 32, 32) and pixels.dtype == torch.uint8
    assert pixels[2].float().mean() > 250 and pixels[0].float().mean() < 5  # only the blue centre is kept


def test_output_does_not_depend_on_batch_size_or_workers(folder, encoder_file, tmp_path):
    a, paths_a = embed(folder, tmp_path / "a.npy", encoder_file, batch_size=3, workers=0)
    b, paths_b = embed(folder, tmp_path / "b.npy", encoder_file, batch_size=13, workers=1)
    assert paths_a == paths_b
    np.testing.assert_allclose(a, b, atol=1e-4)


def test_reduced_precision_rows_point_where_exact_rows_do(folder, encoder_file, tmp_path):
    exact, _ = embed(folder, tmp_path / "exact.npy", encoder_file)
    fast, _ = embed(folder, tmp_path / "fast.npy", encoder_file, precision="bf16")
    assert not np.array_equal(exact, fast)
    cosine = (exact * fast).sum(1) / np.linalg.norm(exact, axis=1) / np.linalg.norm(fast, axis=1)
    assert cosine.min() > 0.999
    assert json.loads((tmp_path / "fast.meta.json").read_text())["precision"] == "bfloat16"


def test_normalize_and_float16(folder, encoder_file, tmp_path):
    vectors, _ = embed(folder, tmp_path / "v.npy", encoder_file, normalize=True, dtype="float16")
    assert vectors.dtype == np.float16
    np.testing.assert_allclose(np.linalg.norm(vectors.astype(np.float32), axis=1), 1, atol=2e-3)


def test_broken_file_is_reported_and_the_rest_embedded(folder, encoder_file, tmp_path):
    (folder / "broken.jpg").write_bytes(b"\xff\xd8\xff garbage")
    vectors, paths = embed(folder, tmp_path / "vecs.npy", encoder_file)
    assert len(paths) == len(vectors) == 13 and "broken.jpg" not in paths
    skipped = (tmp_path / "vecs.skipped.txt").read_text()
    assert skipped.startswith("broken.jpg\t")


def test_interrupted_embed_resumes_to_the_same_result(folder, encoder_file, tmp_path, monkeypatch):
    whole, _ = embed(folder, tmp_path / "whole.npy", encoder_file)
    monkeypatch.setattr(e, "SAVE_EVERY_ROWS", 2)
    real = e.iter_embeddings

    def interrupted(*args, **kwargs):
        for n, item in enumerate(real(*args, **kwargs)):
            if n == 2:
                raise KeyboardInterrupt
            yield item

    monkeypatch.setattr(e, "iter_embeddings", interrupted)
    out = tmp_path / "vecs.npy"
    with pytest.raises(KeyboardInterrupt):
        embed(folder, out, encoder_file, batch_size=3)
    assert not out.exists() and e.sidecars(out)["partial"].exists()
    done = json.loads(e.sidecars(out)["progress"].read_text())["done"]
    assert done == 6

    seen = []

    def counting(paths, *args, **kwargs):
        seen.extend(paths)
        return real(paths, *args, **kwargs)

    monkeypatch.setattr(e, "iter_embeddings", counting)
    resumed, _ = embed(folder, out, encoder_file, batch_size=3)
    assert len(seen) == 13 - 6
    np.testing.assert_allclose(resumed, whole, atol=1e-5)
    assert not e.sidecars(out)["partial"].exists()


def test_rerun_embeds_only_new_or_changed_images(folder, encoder_file, tmp_path, monkeypatch):
    out = tmp_path / "vecs.npy"
    first, first_paths = embed(folder, out, encoder_file)
    shutil.copyfile(folder / "000.png", folder / "000-copy.png")
    noise_image((40, 40), seed=99).save(folder / "005.png")  # changed content
    seen = []
    real = e.iter_embeddings
    monkeypatch.setattr(e, "iter_embeddings", lambda paths, *a, **k: seen.extend(paths) or real(paths, *a, **k))
    second, paths = embed(folder, out, encoder_file)
    assert sorted(p.name for p in seen) == ["000-copy.png", "005.png"]
    np.testing.assert_allclose(second[paths.index("000-copy.png")], second[paths.index("000.png")], atol=1e-5)
    unchanged = paths.index("003.png")
    np.testing.assert_array_equal(second[unchanged], first[first_paths.index("003.png")])
    alone, _ = embed(folder, tmp_path / "fresh.npy", encoder_file)
    np.testing.assert_allclose(second, alone, atol=1e-5)


def test_python_api_returns_vectors_and_paths(folder, encoder_file):
    result = e.embed_folder(folder, encoder_file, batch_size=4, workers=0, device="cpu", precision="fp32")
    assert result.vectors.shape == (13, 512) and result.paths[0] == "000.png"


def test_model_errors_are_one_line_exit_2(folder, tmp_path):
    fake = tmp_path / "fake.safetensors"
    fake.write_text("not a model")
    cases = [
        (("--model", fake), "not a safetensors model file"),
        (("--model", tmp_path / "missing.safetensors"), "no such model file"),
        ((), "no encoder found"),
    ]
    for args, message in cases:
        result = run_byol("embed", folder, "--out", tmp_path / "v.npy", *args, cwd=tmp_path)
        assert result.returncode == 2 and "Traceback" not in result.stderr
        assert len(result.stderr.strip().splitlines()) == 1 and message in result.stderr, result.stderr


def test_byol_embed_uses_the_latest_run_and_names_it(folder, encoder_file, tmp_path):
    run = tmp_path / "byol-runs" / "photos"
    run.mkdir(parents=True)
    shutil.copyfile(encoder_file, run / "encoder.safetensors")
    result = run_byol("embed", folder, "--out", tmp_path / "out" / "vecs.npy", cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    assert "using encoder byol-runs/photos/encoder.safetensors" in result.stderr
    assert np.load(tmp_path / "out" / "vecs.npy").shape == (13, 512)
    inside = run_byol("embed", folder, "--out", folder / "vecs.npy", cwd=tmp_path)
    assert inside.returncode == 2 and "inside the input folder" in inside.stderr


def test_a_model_file_is_read_once_its_header_to_choose_it_and_its_weights_to_load_them(tmp_path):
    import os

    from byolcli.core.model_choice import choose_model

    if not os.path.exists("/proc/self/io"):
        pytest.skip("counting what a process reads takes Linux's /proc/self/io")
    path = random_encoder_file(tmp_path / "encoder.safetensors")
    size = path.stat().st_size

    def read_from_disk(action):
        """What `action` returns, and the bytes it read from the disk, the file's pages dropped from memory first."""
        descriptor = os.open(path, os.O_RDONLY)
        os.fsync(descriptor)
        os.posix_fadvise(descriptor, 0, 0, os.POSIX_FADV_DONTNEED)
        os.close(descriptor)
        before = _bytes_read()
        result = action()
        return result, _bytes_read() - before

    if read_from_disk(path.read_bytes)[1] < 0.9 * size:
        pytest.skip("this file system does not count what a process reads from it")
    choice, choosing = read_from_disk(lambda: choose_model(path))
    encoder, loading = read_from_disk(choice.load)
    fingerprint, fingerprinting = read_from_disk(lambda: choice.fingerprint)
    assert choosing < size / 2  # the header (and what the kernel reads ahead of it), not the weights
    assert 0.9 * size < loading < 1.5 * size and fingerprinting < size / 2  # the fingerprint came with the load
    assert fingerprint == hashlib.sha256(path.read_bytes()).hexdigest()
    reference = load_encoder(path)
    assert all(torch.equal(a, b) for a, b in zip(encoder.state_dict().values(), reference.state_dict().values()))


def _bytes_read() -> int:
    with open("/proc/self/io") as counters:
        return next(int(line.split()[1]) for line in counters if line.startswith("read_bytes"))


def test_several_networks_decode_each_image_once_per_size_and_embed_as_alone(folder, tmp_path, monkeypatch):
    from byolcli.core import inference

    networks = {
        f"{seed}@{size}": load_encoder(random_encoder_file(tmp_path / f"{seed}-{size}.safetensors", seed, size))
        for seed, size in ((0, 32), (1, 32), (2, 24))
    }
    paths = sorted(folder.iterdir())
    alone = {
        name: inference.embed_paths(paths, network, torch.device("cpu"), 5, 0)[0] for name, network in networks.items()
    }
    decoded = []
    load = inference.load_for_embedding
    monkeypatch.setattr(inference, "load_for_embedding", lambda path, size: decoded.append(size) or load(path, size))
    together, good = inference.embed_many(paths, networks, torch.device("cpu"), 5, 0)
    assert good.all() and sorted(decoded) == sorted([24] * len(paths) + [32] * len(paths))
    for name in networks:
        torch.testing.assert_close(together[name], alone[name], atol=1e-5, rtol=0)
    assert not torch.allclose(together["0@32"], together["1@32"])
