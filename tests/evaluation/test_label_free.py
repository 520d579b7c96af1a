"""Judging an encoder without labels: the measures on known data, the neighbour search, the report."""

import math

import pytest
import torch
import torch.nn.functional as F
from helpers import random_encoder_file, run_byol, shapes_folder

from byolcli.evaluation.label_free import alignment, nearest, rankme, uniformity, view_retrieval


def test_rankme_counts_the_directions_the_embeddings_use():
    assert rankme(torch.eye(64)) == pytest.approx(64, rel=1e-6)
    line = torch.randn(500, 1) @ torch.randn(1, 32)  # every row on one line
    assert rankme(line) == pytest.approx(1, abs=1e-3)
    assert 1 < rankme(torch.randn(500, 4) @ torch.randn(4, 32)) <= 4 + 1e-6


def test_alignment_and_uniformity_at_their_ends():
    z = torch.randn(200, 16)
    assert alignment(z, z) == pytest.approx(0, abs=1e-6)
    assert alignment(z, -z) == pytest.approx(4, abs=1e-5)  # opposite unit vectors are 2 apart
    assert uniformity(torch.ones(50, 8)) == pytest.approx(0, abs=1e-6)  # everything at one point
    spread = uniformity(torch.randn(2000, 64))
    assert spread < -3.5 and math.isfinite(spread)  # uniform on a high-dimensional sphere: about −4


def test_view_retrieval_rewards_views_that_agree_and_images_that_differ():
    torch.manual_seed(0)
    images = torch.randn(100, 32)
    assert view_retrieval(images, images + 0.1 * torch.randn(100, 32)) == 1.0
    collapsed = torch.ones(100, 32)
    assert view_retrieval(collapsed, collapsed) == pytest.approx(1 / 100)  # aligned, but every view alike
    assert view_retrieval(images, torch.randn(100, 32)) < 0.1  # spread, but the views unrelated
    swapped = images.clone()
    swapped[[0, 1]] = images[[1, 0]]
    assert view_retrieval(images, swapped) == pytest.approx(0.98)


def test_neighbours_are_those_of_a_brute_force_cosine_search():
    torch.manual_seed(0)
    features = torch.randn(300, 24)
    queries = torch.tensor([0, 17, 150, 299])
    found, similarity = nearest(features, queries, 6)
    z = F.normalize(features, dim=1)
    for row, q in enumerate(queries.tolist()):
        scores = [(float(z[q] @ z[j]), j) for j in range(len(z)) if j != q]
        expected = [j for _, j in sorted(scores, reverse=True)[:6]]
        assert found[row].tolist() == expected
        assert similarity[row].tolist() == pytest.approx([s for s, _ in sorted(scores, reverse=True)[:6]], abs=1e-5)


def test_evaluate_without_labels_reports_both_networks_and_writes_outside_the_folder(tmp_path):
    import json

    folder = shapes_folder(tmp_path / "photos", count=24)
    model = random_encoder_file(tmp_path / "encoder.safetensors", seed=3)
    inside = run_byol("evaluate", folder, "--model", model, "--report", folder / "page")
    assert inside.returncode == 2 and "inside the input folder" in inside.stderr
    result = run_byol(
        "-q", "evaluate", folder, "--model", model, "--json", tmp_path / "judged.json", "--report", tmp_path / "page"
    )
    assert result.returncode == 0, result.stderr
    judged = json.loads((tmp_path / "judged.json").read_text())
    assert judged["images"] == 24 and set(judged["measures"]) == {"encoder", "random init"}
    assert set(judged["measures"]["encoder"]) == set(judged["meanings"])
    page = (tmp_path / "page" / "index.html").read_text()
    assert page.count('class="group"') == 12 and page.count("data:image/jpeg;base64,") == 12 * 2 * 7
    assert "takes labels" in judged["how_to_read"] and judged["how_to_read"] in page  # the caveat travels with them
    assert sorted(p.name for p in (tmp_path / "page").iterdir()) == ["index.html"]  # no temporary file left
    assert sorted(p.name for p in folder.iterdir()) == sorted(f"{i:03d}.png" for i in range(24))


def test_the_page_stays_the_same_size_for_any_folder(tmp_path, monkeypatch):
    from byolcli.core.encoder import load_encoder
    from byolcli.core.inference import pick_device
    from byolcli.core.scan import scan
    from byolcli.evaluation import judge
    from byolcli.evaluation.html_report import write_report

    monkeypatch.setattr(judge, "SAMPLE", 20)
    model = load_encoder(random_encoder_file(tmp_path / "encoder.safetensors"))
    sizes = []
    for count in (24, 60):
        paths = scan(shapes_folder(tmp_path / f"photos{count}", count=count)).absolute_paths()
        judgement = judge.judge(paths, model, pick_device("cpu"))
        assert len(judgement.paths) == 20
        sizes.append(write_report(tmp_path / f"{count}.html", "t", judgement).stat().st_size)
    assert abs(sizes[0] - sizes[1]) < 0.1 * sizes[0]


def test_byol_train_writes_its_report_even_when_quiet(tmp_path):
    folder = shapes_folder(tmp_path / "photos", count=16)
    result = run_byol(
        "-q",
        "train",
        folder,
        "--epochs",
        "1",
        "--batch-size",
        "8",
        "--image-size",
        "32",
        "--workers",
        "0",
        "--precision",
        "fp32",
        "--out",
        tmp_path / "run",
    )
    assert result.returncode == 0, result.stderr
    page = (tmp_path / "run" / "report.html").read_text()
    for section in ("Training curves", "Plan", "Without labels", "Nearest neighbours"):
        assert f"<h2>{section}</h2>" in page, section
    assert 'class="group"' in page and "random init" in page
    assert (tmp_path / "run" / "report.json").exists()
