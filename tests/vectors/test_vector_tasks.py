"""byol similar, duplicates, groups and select: the search, grouping and choosing they rest on,
checked against brute force on vectors larger than one block, and the commands end to end."""

import csv
import shutil

import numpy as np
import pytest
from helpers import embed_on_cpu, random_encoder_file, run_byol, shapes_folder
from PIL import Image

from byolcli.vectors.clustering import kmeans
from byolcli.vectors.duplicates import find_duplicates
from byolcli.vectors.search import pairs_above, top_k
from byolcli.vectors.selection import spread, typical
from byolcli.vectors.store import BLOCK, Vectors, unit


def vectors_of(array, paths=None, root=None):
    return Vectors(np.asarray(array, dtype=np.float32), paths or [f"{i}.jpg" for i in range(len(array))], root, {})


def blobs(centres=5, per=200, dim=16, spread_=0.05, seed=0):
    rng = np.random.default_rng(seed)
    middle = unit(rng.standard_normal((centres, dim)))
    labels = np.repeat(np.arange(centres), per)
    return middle[labels] + spread_ * rng.standard_normal((len(labels), dim)), labels


def test_top_k_finds_what_brute_force_finds_across_blocks_and_never_the_query_itself():
    rng = np.random.default_rng(0)
    array = rng.standard_normal((BLOCK + 900, 8)).astype(np.float32)
    vectors = vectors_of(array)
    queries = np.array([3, BLOCK + 5, 100])
    rows, similarity = top_k(vectors, unit(array[queries]), 7, exclude=queries)
    full = unit(array[queries]) @ unit(array).T
    full[np.arange(3), queries] = -np.inf
    expected = np.argsort(-full, axis=1)[:, :7]
    assert (rows == expected).all()
    assert np.allclose(similarity, np.take_along_axis(full, expected, axis=1), atol=1e-5)
    assert (np.diff(similarity, axis=1) <= 0).all()


def test_pairs_above_a_threshold_are_every_such_pair_once_across_blocks():
    rng = np.random.default_rng(1)
    array = rng.standard_normal((BLOCK + 300, 6)).astype(np.float32)
    array[BLOCK + 10] = array[7] + 0.01  # a pair across two blocks
    found = set()
    for i, j, s in pairs_above(vectors_of(array), 0.97):
        assert (s >= 0.97).all()
        found |= set(zip(i.tolist(), j.tolist()))
    z = unit(array)
    brute = set()
    for start in range(0, len(z), 1000):
        a, b = np.nonzero(z[start : start + 1000] @ z.T >= 0.97)
        brute |= {(x + start, y) for x, y in zip(a.tolist(), b.tolist()) if x + start < y}
    assert found == brute and (7, BLOCK + 10) in found


def test_inverted_lists_beyond_the_exact_size_find_close_pairs_once_each(monkeypatch):
    from byolcli.vectors import search

    array, _ = blobs(centres=40, per=150, dim=32, spread_=0.3)
    rng = np.random.default_rng(4)
    copies = rng.choice(len(array), 300, replace=False)
    array = np.concatenate([array, array[copies] + 0.02 * rng.standard_normal((300, 32))])
    vectors = vectors_of(array)
    exact = [np.stack(p[:2], 1) for p in pairs_above(vectors, 0.95)]
    monkeypatch.setattr(search, "EXACT_ROWS", 1000)
    listed = [np.stack(p[:2], 1) for p in pairs_above(vectors, 0.95)]
    exact_pairs, listed_pairs = np.concatenate(exact), np.concatenate(listed)
    assert len(exact_pairs) >= 300
    assert len({tuple(p) for p in listed_pairs.tolist()}) == len(listed_pairs)  # none twice
    assert (listed_pairs[:, 0] < listed_pairs[:, 1]).all()
    assert {tuple(p) for p in listed_pairs.tolist()} == {tuple(p) for p in exact_pairs.tolist()}


def test_duplicates_join_same_bytes_and_chains_of_near_copies_keeping_the_largest_file(tmp_path):
    files = []
    for i, size in enumerate((10, 30, 20, 5, 40)):
        path = tmp_path / f"{i}.jpg"
        path.write_bytes(bytes([i]) * size)
        files.append(path.name)
    shutil.copyfile(tmp_path / "4.jpg", tmp_path / "5.jpg")  # same bytes as 4
    files.append("5.jpg")
    rng = np.random.default_rng(2)
    array = rng.standard_normal((6, 32)).astype(np.float32)
    array[1] = array[0] + 0.2 * rng.standard_normal(32)  # 0 ~ 1
    array[2] = array[1] + 0.2 * rng.standard_normal(32)  # 1 ~ 2, so 0, 1 and 2 form one group
    vectors = vectors_of(array, files, tmp_path)
    pair_similarity = float((unit(array[[0]]) @ unit(array[[1]]).T)[0, 0])
    groups = find_duplicates(vectors, threshold=0.95)
    as_sets = sorted(sorted(g.rows) for g in groups)
    assert as_sets == [[0, 1, 2], [4, 5]], (as_sets, pair_similarity)
    chain = next(g for g in groups if 0 in g.rows)
    assert chain.rows[0] == 1 and not chain.identical  # 1.jpg is the largest file of the group
    identical = next(g for g in groups if 4 in g.rows)
    assert identical.identical and identical.similarity == [1.0, 1.0]


def test_kmeans_recovers_separate_groups():
    array, labels = blobs(centres=5)
    keep = np.concatenate([np.flatnonzero(labels == c)[: 40 * (c + 1)] for c in range(5)])  # groups of 40 to 200
    array, labels = array[keep], labels[keep]
    vectors = vectors_of(array)
    clusters = kmeans(vectors, 5)
    pairs = set(zip(labels.tolist(), clusters.labels.tolist()))
    assert len(pairs) == 5  # each true group is exactly one found group
    assert clusters.similarity.min() > 0.8
    assert (np.diff(clusters.sizes) <= 0).all()  # numbered by size


def test_spread_covers_every_group_before_any_twice_and_skips_what_is_labelled():
    array, labels = blobs(centres=6, per=100)
    vectors = vectors_of(array)
    chosen = spread(vectors, 6, np.zeros(0, dtype=np.int64))
    assert sorted(labels[chosen].tolist()) == list(range(6))
    labelled = np.flatnonzero(labels < 2)
    chosen = spread(vectors, 4, labelled)
    assert not set(chosen) & set(labelled.tolist())
    assert sorted(labels[chosen].tolist()) == [2, 3, 4, 5]


def test_typical_choices_are_central_members_not_outliers():
    array, labels = blobs(centres=4, per=150, spread_=0.1)
    rng = np.random.default_rng(3)
    outliers = rng.standard_normal((4, array.shape[1])) * 3  # far from everything
    vectors = vectors_of(np.concatenate([array, outliers]))
    chosen = typical(vectors, 4, np.zeros(0, dtype=np.int64))
    assert all(row < len(array) for row in chosen)
    assert sorted(labels[chosen].tolist()) == [0, 1, 2, 3]
    z = unit(vectors.array)
    for row in chosen:  # nearer its group's centre than most of the group
        group = np.flatnonzero(labels == labels[row])
        centre = unit(z[group].mean(0, keepdims=True))[0]
        assert (z[group] @ centre < z[row] @ centre).mean() > 0.75


@pytest.fixture(scope="module")
def embedded(tmp_path_factory):
    """A folder of shapes with a byte-identical copy and a re-encoded copy, embedded."""
    base = tmp_path_factory.mktemp("vectors")
    folder = shapes_folder(base / "photos", count=24, size=48)
    shutil.copyfile(folder / "003.png", folder / "003-copy.png")
    Image.open(folder / "005.png").save(folder / "005-again.jpg", quality=95)
    model = random_encoder_file(base / "encoder.safetensors", size=48)
    embed_on_cpu(folder, base / "vecs.npy", model)
    return base, folder, model


def test_similar_finds_the_copy_of_a_folder_image_and_of_an_outside_file(embedded, tmp_path):
    base, folder, model = embedded
    outside = tmp_path / "query.png"
    shutil.copyfile(folder / "005.png", outside)
    result = run_byol(
        "similar",
        "003.png",
        outside,
        "--in",
        base / "vecs.npy",
        "-k",
        "3",
        "--json",
        tmp_path / "s.json",
        "--report",
        tmp_path / "page",
    )
    assert result.returncode == 0, result.stderr
    import json

    answers = json.loads((tmp_path / "s.json").read_text())
    assert answers[0]["neighbours"][0]["path"] == "003-copy.png"
    assert answers[0]["neighbours"][0]["similarity"] == pytest.approx(1.0, abs=1e-4)
    assert all(n["path"] != "003.png" for n in answers[0]["neighbours"])  # never itself
    assert answers[1]["neighbours"][0]["path"] == "005.png"  # the outside file, embedded by the same encoder
    assert len(answers[1]["neighbours"]) == 3
    assert (tmp_path / "page" / "index.html").read_text().count("<figure") == 2 * 4


def test_duplicates_writes_the_groups_and_the_folder_route_reuses_the_cache(embedded, tmp_path):
    base, folder, model = embedded
    result = run_byol("duplicates", base / "vecs.npy", "--threshold", "0.999", "--out", tmp_path / "d.csv")
    assert result.returncode == 0, result.stderr
    rows = list(csv.DictReader((tmp_path / "d.csv").open()))
    groups = {}
    for row in rows:
        groups.setdefault(row["group"], []).append(row["path"])
    assert sorted(map(sorted, groups.values()))[0] == ["003-copy.png", "003.png"]
    assert "threshold 0.999" in result.stderr
    count = f"{len(groups)} group" + ("s" if len(groups) != 1 else "")
    assert f"{count} of near-duplicates (cosine ≥ 0.999, pixels agreeing)" in result.stdout
    first = run_byol(
        "-q", "groups", folder, "--model", model, "--device", "cpu", "-k", "3", "--out", tmp_path / "g.csv"
    )
    assert first.returncode == 0, first.stderr
    again = run_byol("groups", folder, "--model", model, "--device", "cpu", "-k", "3", "--report", tmp_path / "gp")
    assert again.returncode == 0, again.stderr
    assert "embedding 0" in again.stderr  # every vector came from the cache
    listed = list(csv.DictReader((tmp_path / "g.csv").open()))
    assert len(listed) == 26 and {row["group"] for row in listed} == {"1", "2", "3"}
    assert all(0 <= float(row["distance"]) <= 2 for row in listed)
    assert not any(p.name.endswith((".npy", ".csv")) for p in folder.iterdir())  # nothing written in the input


def test_select_leaves_out_the_labelled_images(embedded, tmp_path):
    base, folder, _ = embedded
    labels = tmp_path / "labels.csv"
    elsewhere = shapes_folder(tmp_path / "elsewhere", count=1) / "000.png"
    listed = [folder / f"{i:03d}.png" for i in range(10)] + [elsewhere]
    labels.write_text("path,label\n" + "".join(f"{path},a\n" for path in listed))
    for by in ("typical", "spread"):
        out = tmp_path / f"{by}.txt"
        result = run_byol("select", base / "vecs.npy", "-n", "5", "--labels", labels, "--by", by, "--out", out)
        assert result.returncode == 0, result.stderr
        chosen = out.read_text().splitlines()
        assert len(set(chosen)) == 5
        assert not set(chosen) & {f"{i:03d}.png" for i in range(10)}
        assert "1 of the 11 images" in result.stderr  # the one labelled image that is not in the folder


@pytest.mark.parametrize(
    "args, message",
    [
        (["similar", "{folder}/notes.txt", "--in", "{vecs}"], "not an image"),
        (["similar", "001.png", "--in", "{vecs}", "-k", "30"], "larger than"),
        (["duplicates", "{short}"], "rows but"),
        (["duplicates", "{vecs}", "--threshold", "0"], "must be above 0"),
        (["duplicates", "{vecs}", "--threshold", "1.5"], "must be above 0"),
        (["groups", "{vecs}", "-k", "40"], "more groups than"),
        (["select", "{vecs}", "-n", "27", "--out", "{tmp}/x.txt"], "more than the 26"),
        (["duplicates", "{folder}/missing.npy"], "not found"),
        (["groups", "{images}", "--out", "{images}/groups.csv"], "inside the input folder"),
        (["select", "{vecs}", "-n", "2", "--out", "{images}/sub/x.txt"], "inside the input folder"),
    ],
)
def test_bad_input_is_one_line_and_exit_2(embedded, tmp_path, args, message):
    base, folder, _ = embedded
    before = sorted(p.name for p in folder.iterdir())
    (tmp_path / "notes.txt").write_text("not a picture")
    short = tmp_path / "short.npy"
    np.save(short, np.load(base / "vecs.npy")[:5])
    (tmp_path / "short.paths.txt").write_text((base / "vecs.paths.txt").read_text())
    fill = {"folder": tmp_path, "vecs": base / "vecs.npy", "short": short, "tmp": tmp_path, "images": folder}
    result = run_byol(*[a.format(**fill) for a in args])
    assert result.returncode == 2, result.stderr
    assert message in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1 and "Traceback" not in result.stderr
    assert sorted(p.name for p in folder.iterdir()) == before  # nothing written into the images' folder


def photo(path, seed):
    """A picture with structure at several scales: smooth noise, a few shapes."""
    from PIL import ImageDraw, ImageFilter

    rng = np.random.default_rng(seed)
    noise = rng.integers(0, 256, (12, 16, 3), dtype=np.uint8)
    image = Image.fromarray(noise).resize((320, 240), Image.Resampling.BICUBIC)
    draw = ImageDraw.Draw(image)
    for _ in range(6):
        x, y = rng.integers(0, 280), rng.integers(0, 200)
        draw.ellipse([x, y, x + 40, y + 30], fill=tuple(int(c) for c in rng.integers(0, 256, 3)))
    image.filter(ImageFilter.GaussianBlur(1)).save(path, quality=95)
    return path


def test_the_pixel_check_knows_copies_from_other_pictures(tmp_path, monkeypatch):
    from PIL import ImageEnhance, ImageOps

    from byolcli.vectors.pixel_check import Thumbprints

    original = photo(tmp_path / "original.jpg", 0)
    image = Image.open(original)
    width, height = image.size
    copies = {
        "jpeg60.jpg": (image, 60),
        "half.jpg": (image.resize((width // 2, height // 2)), 95),
        "crop5.jpg": (image.crop((8, 6, width - 8, height - 6)), 95),
        "mirror.jpg": (ImageOps.mirror(image), 95),
        "colour.jpg": (ImageEnhance.Brightness(ImageEnhance.Color(image).enhance(1.6)).enhance(1.1), 95),
    }
    prints = Thumbprints()
    for name, (copy, quality) in copies.items():
        copy.save(tmp_path / name, quality=quality)
        assert prints.same_picture(original, tmp_path / name), name
    for seed in range(1, 6):
        assert prints.same_picture(original, photo(tmp_path / f"other{seed}.jpg", seed)) is False
    (tmp_path / "broken.jpg").write_bytes(b"not a picture")
    assert prints.same_picture(original, tmp_path / "broken.jpg") is None
    # Many pairs at once, a few at a time, give what one pair at a time gives.
    from byolcli.vectors import pixel_check

    others = [tmp_path / name for name in copies] + [tmp_path / "broken.jpg"]
    one_by_one = [prints.agreement([original], [other])[0] for other in others]
    monkeypatch.setattr(pixel_check, "PAIRS_AT_ONCE", 2)
    together = prints.agreement([original] * len(others), others)
    assert np.allclose(together, one_by_one, equal_nan=True) and np.isnan(together[-1])


def shirt(path, seed):
    """A pale shirt on a red cloth, laid out the same way every time, a few pixels either way; only
    its print differs."""
    from PIL import ImageDraw

    rng = np.random.default_rng(seed)
    image = Image.new("RGB", (240, 320), (170, 30, 50))
    draw = ImageDraw.Draw(image)
    x, y = rng.integers(-2, 3, 2)
    outline = [(60, 40), (180, 40), (230, 110), (190, 130), (190, 290), (50, 290), (50, 130), (10, 110)]
    draw.polygon([(a + x, b + y) for a, b in outline], fill=(235, 235, 230))
    for _ in range(12):
        left, top = rng.integers(70, 160) + x, rng.integers(90, 250) + y
        size = rng.integers(4, 14, 2)
        draw.ellipse([left, top, left + size[0], top + size[1]], fill=tuple(int(c) for c in rng.integers(0, 160, 3)))
    image.save(path, quality=95)
    return path


def test_the_pixel_check_tells_apart_photos_that_share_only_their_layout(tmp_path):
    from byolcli.vectors.pixel_check import Thumbprints

    prints = Thumbprints()
    shirts = [shirt(tmp_path / f"shirt{seed}.jpg", seed) for seed in range(4)]
    Image.open(shirts[0]).save(tmp_path / "copy.jpg", quality=60)
    assert prints.same_picture(shirts[0], tmp_path / "copy.jpg")
    assert not any(prints.same_picture(shirts[0], other) for other in shirts[1:])


def test_close_vectors_of_different_pictures_are_not_duplicates_unless_by_vectors_alone(tmp_path):
    names = [photo(tmp_path / f"{i}.jpg", i).name for i in range(3)]
    rng = np.random.default_rng(5)
    array = rng.standard_normal((3, 16)).astype(np.float32)
    array[1] = array[0]  # the encoder cannot tell 0 and 1 apart
    vectors = vectors_of(array, names, tmp_path)
    assert find_duplicates(vectors, 0.9) == []
    assert [sorted(g.rows) for g in find_duplicates(vectors, 0.9, pixel_check=False)] == [[0, 1]]


def test_images_added_to_a_cached_folder_are_appended_in_place_without_rewriting_its_rows(tmp_path):
    import os

    from byolcli.core.embed import sidecars
    from byolcli.core.files import file_sha256
    from byolcli.core.names import read_names
    from byolcli.vectors.store import cached_embedding, open_vectors

    folder = shapes_folder(tmp_path / "photos", count=12, size=32)
    model = random_encoder_file(tmp_path / "encoder.safetensors")
    command = ("-q", "groups", folder, "--model", model, "--device", "cpu", "-k", "2", "--out", tmp_path / "g.csv")
    assert run_byol(*command).returncode == 0
    cache = cached_embedding(folder, file_sha256(model))
    files = sidecars(cache)
    first, inode = cache.read_bytes(), cache.stat().st_ino

    def written():  # when each file of the cache last changed
        return [path.stat().st_mtime_ns for path in (cache, files["paths"], files["meta"])]

    unchanged = written()
    assert run_byol(*command).returncode == 0
    assert written() == unchanged  # nothing new: nothing written

    for name in ("000.png", "001.png", "002.png"):
        shutil.copyfile(folder / name, folder / f"new-{name}")
    assert run_byol(*command).returncode == 0
    assert cache.stat().st_ino == inode  # the same file, grown
    vectors = open_vectors(cache)
    assert len(vectors) == 15 and vectors.paths[12:] == ["new-000.png", "new-001.png", "new-002.png"]
    header = len(first) - 12 * 512 * 4
    assert cache.read_bytes()[header : len(first)] == first[header:]  # the earlier rows, untouched
    alone, names = embed_on_cpu(folder, tmp_path / "all.npy", model)
    assert np.allclose(vectors.array, alone[[names.index(path) for path in vectors.paths]], atol=1e-5)

    # An append that stopped before publishing its rows: readers and the next append see only what was published.
    from byolcli.core.embed import append_rows

    append_rows(cache, 15, np.full((2, 512), 7.0, dtype=np.float32))
    assert len(open_vectors(cache)) == 15
    shutil.copyfile(folder / "003.png", folder / "new-003.png")
    assert run_byol(*command).returncode == 0
    vectors = open_vectors(cache)
    assert len(vectors) == 16 and np.allclose(vectors.array[15], alone[names.index("003.png")], atol=1e-5)
    assert read_names(files["paths"].read_text())[15] == "new-003.png"

    os.remove(folder / "new-000.png")  # a row no image has any more: the cache is written anew, without it
    assert run_byol(*command).returncode == 0
    assert "new-000.png" not in open_vectors(cache).paths and len(open_vectors(cache)) == 15
