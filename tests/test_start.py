"""Starting weights: what `--init` takes, what the plan does with a start, and how a start is judged."""

import json

import numpy as np
import pytest
import torch
from helpers import cache_imagenet_weights, random_encoder_file, run_byol, shapes_folder
from PIL import Image
from safetensors.torch import save_file

from byolcli.core.encoder import read_metadata


@pytest.fixture(scope="module")
def photos(tmp_path_factory):
    return shapes_folder(tmp_path_factory.mktemp("start") / "photos", count=16)


def plain_state_dict(path, architecture="resnet18", seed=3):
    """A torchvision state dict as other tools save it: no byolcli metadata, the classifier kept."""
    import torchvision

    torch.manual_seed(seed)
    state = getattr(torchvision.models, architecture)(num_classes=7).state_dict()
    if path.suffix == ".pth":
        torch.save(state, path)
    else:
        save_file(state, path)
    return {k: v for k, v in state.items() if not k.startswith("fc.")}


# TRAIN_ARGS without its image size: what a start does to the size is part of what is tested.
FAST = ("--batch-size", "8", "--workers", "0", "--precision", "fp32")


def train(photos, tmp_path, *extra, env=None):
    args = ("train", photos, "--epochs", "1", *FAST, "--out", tmp_path / "run", *extra)
    return run_byol(*args, cwd=tmp_path, env_extra=env)


def test_without_imagenet_weights_the_default_start_is_random_and_says_where_it_looked(photos, tmp_path):
    result = train(photos, tmp_path, "--image-size", "32")
    assert result.returncode == 0, result.stderr
    plan = json.loads((tmp_path / "run" / "plan.json").read_text())
    assert plan["init"] is None
    assert plan["reasons"]["init"].startswith("random: no ImageNet weights in ")
    assert "hub/checkpoints/resnet18-f37072fd.pth" in plan["reasons"]["init"]
    assert read_metadata(tmp_path / "run" / "encoder.safetensors")["init"] == "random"
    assert json.loads((tmp_path / "run" / "report.json").read_text())["reference"] == "random init"


def test_imagenet_weights_in_torchs_cache_are_the_default_start(photos, tmp_path):
    cache_imagenet_weights(tmp_path / "torch")
    result = train(photos, tmp_path, env={"TORCH_HOME": str(tmp_path / "torch")})
    assert result.returncode == 0, result.stderr
    assert "ImageNet weights" in result.stderr and "batch norm" in result.stderr
    plan = json.loads((tmp_path / "run" / "plan.json").read_text())
    assert plan["init"] == "imagenet" and plan["image_size"] == 64  # 32-px images, upsampled for the weights
    metadata = read_metadata(tmp_path / "run" / "encoder.safetensors")
    assert metadata["init"] == "imagenet" and metadata["image_size"] == 64
    report = json.loads((tmp_path / "run" / "report.json").read_text())
    assert report["reference"] == "start" and set(report["neighbours"]) == {"encoder", "start"}
    # Label-free measures do not order an encoder and its start as labels do: the report claims nothing.
    assert "do not say whether the encoder is better than the weights it started from" in report["how_to_read"]
    page = (tmp_path / "run" / "report.html").read_text()
    assert report["how_to_read"] in page and "Training helped" not in page
    assert "nothing has checked this encoder against the weights it started from" in result.stderr
    assert "byol evaluate --labels" in result.stderr and "--labels LABELS.csv" in result.stderr


@pytest.mark.parametrize("suffix", [".safetensors", ".pth"])
def test_a_plain_torchvision_state_dict_is_a_start_with_its_name_and_digest_recorded(photos, tmp_path, suffix):
    weights = tmp_path / f"someone's resnet{suffix}"
    expected = plain_state_dict(weights)
    result = train(photos, tmp_path, "--init", weights, "--backbone", "resnet18", "--image-size", "32")
    assert result.returncode == 0, result.stderr
    metadata = read_metadata(tmp_path / "run" / "encoder.safetensors")
    name, digest = metadata["init"].split(" sha256:")
    import hashlib

    assert name == weights.name and digest == hashlib.sha256(weights.read_bytes()).hexdigest()
    assert metadata["init_path"] == str(weights.resolve())

    from byolcli.core.start import start_weights

    loaded = start_weights(str(weights), "resnet18")
    assert all(torch.equal(loaded[k], v) for k, v in expected.items())


def test_model_takes_a_state_dict_saved_by_torch_as_it_takes_one_in_safetensors(photos, tmp_path):
    # What evaluate prints when an encoder fell below a .pth start has to run.
    vectors = []
    for suffix in (".safetensors", ".pth"):
        weights = tmp_path / f"start{suffix}"
        plain_state_dict(weights)
        out = tmp_path / f"v{suffix}.npy"
        result = run_byol("embed", photos, "--model", weights, "--arch", "resnet18", "--image-size", "32", "--out", out)
        assert result.returncode == 0, result.stderr
        vectors.append(np.load(out))
    assert vectors[0].shape == (16, 512) and np.array_equal(vectors[0], vectors[1])


def test_bad_starts_are_one_line_each(photos, tmp_path):
    text = tmp_path / "notes.safetensors"
    text.write_text("not a model")
    plain = tmp_path / "r18.safetensors"
    plain_state_dict(plain)
    image = tmp_path / "photo.png"
    Image.new("RGB", (8, 8)).save(image)
    cases = [
        (("--init", text), "notes.safetensors: not a safetensors model file"),
        (("--init", image), "photo.png: not a safetensors model file"),
        (("--init", tmp_path / "absent.pth"), "absent.pth: no such model file"),
        (("--init", plain), "a plain state dict; add --backbone"),
        (("--init", plain, "--backbone", "resnet34"), "weights do not match a resnet34"),
        (("--init", plain, "--backbone", "resnet18", "--stem", "small"), "has the standard stem; --stem small"),
        (("--init", "imagenet", "--stem", "small"), "--init imagenet has the standard stem"),
        (("--init", "imagenet"), "--init imagenet: no ImageNet weights in"),
    ]
    for flags, message in cases:
        result = train(photos, tmp_path, *flags)
        assert result.returncode == 2, (flags, result.stderr)
        # One line, the last; only what was detected (the device) may precede it.
        assert message in result.stderr.strip().splitlines()[-1], (flags, result.stderr)
        assert "Traceback" not in result.stderr and result.stderr.count(message) == 1, (flags, result.stderr)
    assert not list((tmp_path / "run").glob("*.json"))  # refused before a plan was written


def labelled_colours(folder, per_class=12):
    """Flat red and flat blue images, which any untrained network tells apart and a zeroed one cannot."""
    folder.mkdir(parents=True, exist_ok=True)
    rows = []
    for i in range(per_class):
        for name, colour in (("red", (200 + i, 20, 30)), ("blue", (20, 30, 200 + i))):
            Image.new("RGB", (32, 32), colour).save(folder / f"{name}{i}.png")
            rows.append(f"{name}{i}.png,{name}")
    csv_path = folder / "labels.csv"
    csv_path.write_text("path,label\n" + "\n".join(rows) + "\n")
    return csv_path


def encoder_started_from(path, start, zeroed):
    """An encoder file whose metadata says it started from `start`; its weights are the start's, or zeros."""
    from byolcli.core.backbones import make_backbone
    from byolcli.core.encoder import save_encoder
    from byolcli.core.pixels import MEAN, STD
    from byolcli.core.start import start_name

    model = make_backbone("resnet18")
    model.load_state_dict(plain_state_dict(start))
    if zeroed:
        for p in model.parameters():
            p.data.zero_()
    save_encoder(
        model,
        path,
        architecture="resnet18",
        image_size=32,
        mean=MEAN,
        std=STD,
        train_images=24,
        epochs=1,
        steps=1,
        init=start_name(str(start)),
        init_path=str(start),
    )
    return path


def test_evaluate_compares_an_encoder_with_its_start_and_says_when_the_start_is_better(tmp_path):
    labels = labelled_colours(tmp_path / "colours")
    start = tmp_path / "start.safetensors"
    for zeroed in (False, True):
        encoder = encoder_started_from(tmp_path / f"enc{zeroed}.safetensors", start, zeroed)
        result = run_byol("evaluate", "--labels", labels, "--model", encoder, "--json", tmp_path / "r.json")
        assert result.returncode == 0, result.stderr
        report = json.loads((tmp_path / "r.json").read_text())
        assert list(report["results"]) == ["encoder", "start", "random init"]
        assert "Δ start" in result.stdout and "Δ random" in result.stdout
        ours, theirs = report["results"]["encoder"], report["results"]["start"]
        if zeroed:  # every image looks the same to it: chance, against the start's clean split
            assert ours["knn"]["top1"] < theirs["knn"]["top1"] and ours["linear"]["top1"] < theirs["linear"]["top1"]
            assert "scores below the weights it started from" in result.stdout
            assert f"byol embed FOLDER --model {start} --arch resnet18 --image-size 32" in result.stdout
        else:  # the same weights score the same
            assert ours["knn"] == theirs["knn"] and "use_start" not in report
            assert "scores below" not in result.stdout

    start.unlink()
    gone = run_byol("evaluate", "--labels", labels, "--model", encoder, "--json", tmp_path / "r.json")
    assert gone.returncode == 0 and "no column for the encoder's start" in gone.stderr
    assert list(json.loads((tmp_path / "r.json").read_text())["results"]) == ["encoder", "random init"]


def test_evaluate_scores_the_start_at_its_own_size_too_and_measures_against_the_better(tmp_path):
    labels = labelled_colours(tmp_path / "colours")
    start = tmp_path / "start.safetensors"
    encoder = encoder_started_from(tmp_path / "zeroed.safetensors", start, zeroed=True)
    result = run_byol(
        "evaluate", "--labels", labels, "--model", encoder, "--start-size", "48", "--json", tmp_path / "r.json"
    )
    assert result.returncode == 0, result.stderr
    report = json.loads((tmp_path / "r.json").read_text())
    assert list(report["results"]) == ["encoder", "start", "start at 48 px", "random init"]
    assert report["starts"] == {"start": 32, "start at 48 px": 48}
    assert report["sources"]["start at 48 px"].endswith("(48 px)")
    results = report["results"]
    best = report["best_start"]
    assert best in report["starts"]
    mean = {name: results[name]["knn"]["top1"] + results[name]["linear"]["top1"] for name in report["starts"]}
    assert mean[best] == max(mean.values())
    # The command that recommends the start names the size it scored best at.
    assert report["use_start"].endswith(f"--image-size {report['starts'][best]}")
    assert f"({best})" in result.stdout

    random_start = random_encoder_file(tmp_path / "random.safetensors")
    refused = run_byol("evaluate", "--labels", labels, "--model", random_start, "--start-size", "64")
    assert refused.returncode == 2
    last = refused.stderr.strip().splitlines()[-1]
    assert "--start-size 64: the encoder started from random weights, so there is no start" in last
