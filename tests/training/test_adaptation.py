"""A run from starting weights: what it exports (the plan's mix of start and trained weights), how
`byol train --labels` chooses among the candidates, and what it refuses."""

import json

import pytest
import torch
from helpers import run_byol
from safetensors.torch import load_file
from test_start import FAST, labelled_colours, plain_state_dict

from byolcli.core.backbones import make_backbone
from byolcli.core.encoder import read_metadata, with_metadata
from byolcli.core.errors import UserError
from byolcli.core.labels import read_labels
from byolcli.core.pixels import MEAN, STD
from byolcli.core.terminal import Reporter
from byolcli.training.candidates import Candidate, best_candidate, mix_states, recalibrated, three_parts

DESCRIBED = dict(architecture="resnet18", image_size=32, mean=MEAN, std=STD, train_images=24, epochs=1, steps=1)


@pytest.fixture(scope="module")
def finished(tmp_path_factory):
    """A finished one-epoch run on red and blue squares, started from a plain state dict."""
    root = tmp_path_factory.mktemp("adapt")
    labels = labelled_colours(root / "colours")
    start = root / "start.safetensors"
    plain_state_dict(start)
    args = ("train", root / "colours", "--epochs", "1", *FAST, "--image-size", "32", "--out", root / "run")
    result = run_byol(*args, "--init", start, "--backbone", "resnet18", cwd=root)
    assert result.returncode == 0, result.stderr
    return root, labels, start, args, result


def test_mixing_runs_from_the_start_to_the_trained_weights():
    start = {"w": torch.zeros(3), "n": torch.tensor(1)}
    trained = {"w": torch.tensor([4.0, 8.0, -4.0]), "n": torch.tensor(7)}
    assert torch.equal(mix_states(start, trained, 0.0)["w"], start["w"])
    assert torch.equal(mix_states(start, trained, 1.0)["w"], trained["w"])
    assert torch.equal(mix_states(start, trained, 0.25)["w"], torch.tensor([1.0, 2.0, -1.0]))
    assert mix_states(start, trained, 0.25)["n"] == 7  # counters are not weights


def test_the_three_parts_cover_every_row_once_and_deal_each_class_evenly():
    y = torch.tensor([0] * 9 + [1] * 7 + [2] * 3)
    parts = three_parts(y)
    rows = torch.cat(parts).sort().values
    assert torch.equal(rows, torch.arange(len(y)))
    for label, size in ((0, 9), (1, 7), (2, 3)):
        counts = [int((y[part] == label).sum()) for part in parts]
        assert sum(counts) == size and max(counts) - min(counts) <= 1


def test_the_plans_export_stays_unless_another_candidate_is_clearly_better():
    def right(first: int, last: int) -> torch.Tensor:  # kNN and linear right on rows first..last-1 of 100
        hits = torch.zeros(2, 100, dtype=torch.bool)
        hits[:, first:last] = True
        return hits

    hits = {"plan's": right(0, 60), "luckier": right(3, 65), "clearly": right(0, 70), "more": right(0, 75)}
    scores = {
        name: {"knn_choose": h[0].float().mean(), "linear_choose": h[1].float().mean()} for name, h in hits.items()
    }

    def best(*names: str) -> str:
        return best_candidate({name: scores[name] for name in names}, hits, "plan's")

    # 10 rows won and 6 lost: a higher mean, well within chance.
    assert best("plan's", "luckier") == "plan's"
    # 20 won and none lost: clearly better; of several, the best mean.
    assert best("luckier", "plan's", "clearly") == "clearly"
    assert best("plan's", "clearly", "more") == "more"
    hits["again"], scores["again"] = hits["clearly"], scores["clearly"]
    assert best("plan's", "clearly", "again") == "clearly"  # of equals, the one listed first


def test_with_labels_the_candidate_that_tells_the_classes_apart_is_chosen_over_one_that_cannot(tmp_path):
    from byolcli.training.train import choose_with_labels

    labels = read_labels(labelled_colours(tmp_path / "colours"))
    torch.manual_seed(0)
    good = with_metadata(make_backbone("resnet18").eval(), **DESCRIBED)
    blind = with_metadata(make_backbone("resnet18").eval(), **DESCRIBED)
    for p in blind.parameters():
        p.data.zero_()  # every image maps to the same vector
    for order in ((blind, good), (good, blind)):
        found = [Candidate(f"c{i}", i / 2, 32, network) for i, network in enumerate(order)]
        chosen = choose_with_labels(found, labels, 24, "c0", torch.device("cpu"), Reporter(quiet=True))
        assert chosen.network is good


def test_a_run_from_weights_exports_the_plans_mix_of_its_start_and_the_trained_weights(finished):
    root, _, start, _, result = finished
    run = root / "run"
    plan = json.loads((run / "plan.json").read_text())
    assert plan["mix"] == 0.5 and "batch-norm statistics measured on the folder" in plan["reasons"]["mix"]
    assert "exported" in result.stderr and "mix 0.5 from the start" in result.stderr
    assert "nothing has checked this encoder against the weights it started from" in result.stderr
    assert "byol select FOLDER -n 200" in result.stderr
    exported = load_file(run / "encoder.safetensors")
    trained = torch.load(run / "checkpoint.pt", weights_only=True)["model"]
    begun = plain_state_dict(root / "again.safetensors")  # the same seed: the start's weights
    mixed = {}
    for name in begun:
        online = trained[f"online_encoder.{name}"]
        mixed[name] = (begun[name] + online) / 2 if online.is_floating_point() else online
    for name in ("conv1.weight", "layer4.1.conv2.weight", "layer2.0.downsample.1.bias"):
        assert not torch.equal(trained[f"online_encoder.{name}"], begun[name])  # training moved it
        assert torch.allclose(exported[name], mixed[name], atol=1e-6)
    # The statistics are the folder's as the mix computes them, not the mix of the two networks' statistics.
    network = with_metadata(make_backbone("resnet18"), **DESCRIBED)
    network.load_state_dict(mixed)
    [measured] = recalibrated([network], sorted((root / "colours").glob("*.png")), torch.device("cpu"))
    for name in ("bn1.running_mean", "layer4.1.bn2.running_var"):
        assert not torch.allclose(exported[name], mixed[name], rtol=1e-2)
        assert torch.allclose(exported[name], measured.state_dict()[name], rtol=1e-3, atol=1e-5)
    assert read_metadata(run / "encoder.safetensors")["mix"] == "0.5"
    assert read_metadata(run / "encoder.safetensors")["statistics"] == "folder"


def test_recalibrated_statistics_are_the_folders_as_embedding_sees_it(tmp_path):
    from byolcli.core.inference import load_for_embedding
    from byolcli.core.pixels import normalize_images

    labelled_colours(tmp_path / "colours")
    images = sorted((tmp_path / "colours").glob("*.png"))
    torch.manual_seed(0)
    network = with_metadata(make_backbone("resnet18").eval(), **DESCRIBED)
    before = {name: value.clone() for name, value in network.state_dict().items()}
    other = with_metadata(make_backbone("resnet18").eval(), **DESCRIBED)
    measured, measured_other = recalibrated([network, other], images, torch.device("cpu"))
    assert not measured.training and measured.bn1.momentum == network.bn1.momentum
    assert all(torch.equal(value, network.state_dict()[name]) for name, value in before.items())  # a copy
    pixels = normalize_images(torch.stack([load_for_embedding(path, 32) for path in images]), MEAN, STD)
    with torch.no_grad():
        first = network.conv1(pixels)
    assert torch.allclose(measured.bn1.running_mean, first.mean((0, 2, 3)), atol=1e-4)
    assert torch.allclose(measured.bn1.running_var, first.var((0, 2, 3)), rtol=1e-3)
    assert torch.equal(measured.conv1.weight, network.conv1.weight)
    with torch.no_grad():
        assert torch.allclose(measured_other.bn1.running_mean, other.conv1(pixels).mean((0, 2, 3)), atol=1e-4)
    [few] = recalibrated([network], images, torch.device("cpu"), limit=4)  # a sample: other statistics
    assert not torch.allclose(few.bn1.running_mean, measured.bn1.running_mean, atol=1e-4)


def test_labels_on_a_finished_run_choose_again_and_export_the_choice(finished, tmp_path):
    root, labels, start, args, _ = finished
    result = run_byol(*args, "--init", start, "--backbone", "resnet18", "--labels", labels, cwd=root)
    assert result.returncode == 0, result.stderr
    assert "candidates, scored on 24 labelled images" in result.stderr
    names = ("start", "start + folder stats", "mix 0.5 (the plan's)", "trained")
    for name in names:
        assert f"│ {name}" in result.stderr
    chosen = result.stderr.split("exported: ", 1)[1].split(",")[0]
    mixes = dict(zip(("start", "start + folder stats", "mix 0.5", "trained"), (0.0, 0.0, 0.5, 1.0)))
    metadata = read_metadata(root / "run" / "encoder.safetensors")
    assert float(metadata["mix"]) == mixes[chosen]
    assert metadata["statistics"] == ("" if chosen == "start" else "folder")


def test_bad_labels_are_one_line_and_leave_the_finished_run_as_it_was(finished, tmp_path):
    root, labels, start, args, _ = finished
    encoder = root / "run" / "encoder.safetensors"
    before = encoder.read_bytes()
    elsewhere = tmp_path / "elsewhere"
    elsewhere_csv = labelled_colours(elsewhere)
    one_class = tmp_path / "one.csv"
    one_class.write_text("path,label\n" + "".join(f"{root}/colours/red{i}.png,red\n" for i in range(6)))
    too_few = tmp_path / "few.csv"
    too_few.write_text(
        "path,label\n" + "".join(f"{root}/colours/{c}{i}.png,{c}\n" for c in ("red", "blue") for i in range(2))
    )
    cases = [
        (elsewhere_csv, "24 listed images are not among the folder's images"),
        (one_class, "only one class ('red')"),
        (too_few, "has 2 labelled images; choosing needs 3 or more per class"),
        (tmp_path / "absent.csv", "absent.csv: no such file"),
    ]
    for csv_path, message in cases:
        result = run_byol(*args, "--init", start, "--backbone", "resnet18", "--labels", csv_path, cwd=root)
        assert result.returncode == 2, (csv_path, result.stderr)
        assert message in result.stderr.strip().splitlines()[-1], (csv_path, result.stderr)
        assert "Traceback" not in result.stderr
        assert encoder.read_bytes() == before


def test_labels_and_mix_are_refused_where_they_cannot_apply(tmp_path):
    labels = labelled_colours(tmp_path / "colours")
    base = ("train", tmp_path / "colours", "--epochs", "1", *FAST, "--image-size", "32", "--out", tmp_path / "run")
    cases = [
        (("--init", "random", "--labels", labels), "this run starts from random weights"),
        (("--mix", "1.5"), "--mix 1.5: must be between 0 (the start) and 1 (the trained weights)"),
        (("--init", "random", "--start-size", "64"), "--start-size 64: --init random has no start to size"),
    ]
    for flags, message in cases:
        result = run_byol(*base, *flags, cwd=tmp_path)
        assert result.returncode == 2, (flags, result.stderr)
        assert message in result.stderr.strip().splitlines()[-1], (flags, result.stderr)
    assert not (tmp_path / "run" / "encoder.safetensors").exists()


def test_training_labels_must_name_the_folders_own_images(tmp_path):
    from byolcli.training.candidates import read_training_labels

    csv_path = labelled_colours(tmp_path / "colours")
    images = sorted((tmp_path / "colours").glob("*.png"))
    assert len(read_training_labels(csv_path, images).paths) == 24
    with pytest.raises(UserError, match="2 listed images are not among the folder's images"):
        read_training_labels(csv_path, images[2:])


def test_the_labels_scored_are_what_the_candidates_can_embed_in_a_tenth_of_the_runs_compute(tmp_path):
    from byolcli.core.labels import LabelledImages
    from byolcli.training.candidates import (
        MIN_SCORED_PER_CLASS,
        PROBE_FORWARDS,
        RECALIBRATION_IMAGES,
        SCORING_SHARE,
        TRAINED_IMAGE_FORWARDS,
        labels_to_score,
    )

    data = LabelledImages([tmp_path / f"{i}.png" for i in range(9000)], ["a", "b"] * 4500, None, list(range(9000)), [])
    start = Candidate("start", 0.0, 64, None)
    measured = [Candidate(f"mix {m}", m, 64, None, "folder") for m in (0.0, 0.5, 1.0)]
    at_own = Candidate("start at 128 px", 0.0, 128, None)
    images = 10 * RECALIBRATION_IMAGES

    def trained_for(forwards: int) -> int:  # the images a run trains on to leave `forwards` for choosing
        return round(forwards / (SCORING_SHARE * TRAINED_IMAGE_FORWARDS))

    # Measuring three networks' statistics takes 3 · RECALIBRATION_IMAGES passes, and each candidate's probes
    # PROBE_FORWARDS; the candidates share the rest.
    run = trained_for(3 * RECALIBRATION_IMAGES + 4 * PROBE_FORWARDS + 4000)
    assert labels_to_score(run, [start, *measured], images, data) == 1000
    # The start at twice the size costs four passes per image.
    assert labels_to_score(run, [start, at_own, *measured], images, data) == (4000 - PROBE_FORWARDS) // 8
    # A small folder: its statistics take fewer passes, which leaves more for the labels.
    assert labels_to_score(run, [start, *measured], 100, data) == 1000 + 3 * (RECALIBRATION_IMAGES - 100) // 4
    # Compute for more than there are: all of them.
    assert labels_to_score(100 * run, [start, *measured], images, data) == 9000
    # None left: still the fewest that say anything per class, or every label where there are fewer.
    assert labels_to_score(0, [start, *measured], images, data) == 2 * MIN_SCORED_PER_CLASS
    assert labels_to_score(0, [start, *measured], images, data.subset(list(range(10)))) == 10


def test_past_the_limit_candidates_are_scored_on_a_stratified_sample_of_the_labels(tmp_path):
    from byolcli.core.labels import LabelledImages
    from byolcli.training.candidates import scored_sample

    labels = ["a"] * 3000 + ["b"] * 1500 + ["c"] * 500
    data = LabelledImages([tmp_path / f"{i}.png" for i in range(5000)], labels, None, list(range(5000)), [])
    sample = scored_sample(data, limit=2000)
    assert len(sample.paths) == 2000 and len(set(sample.paths)) == 2000
    assert set(sample.paths) <= set(data.paths)
    assert {c: sample.labels.count(c) for c in "abc"} == {"a": 1200, "b": 600, "c": 200}
    assert scored_sample(data, limit=5000) is data
