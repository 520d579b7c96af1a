import copy
import json
import math
import shutil
import signal

import pytest
import torch
import torchvision
from helpers import (
    TRAIN_ARGS,
    cache_imagenet_weights,
    noise_image,
    run_byol,
    shapes_folder,
    start_training,
    tiny_plan,
    wait_for_file,
)
from safetensors.torch import load_file

from byolcli.core.backbones import PerViewBatchNorm1d, PerViewBatchNorm2d
from byolcli.core.encoder import load_encoder, save_encoder
from byolcli.core.errors import TrainingFailed
from byolcli.core.views import TwoViewDataset
from byolcli.training.byol import BYOL, regression_loss
from byolcli.training.engine import Trainer


@pytest.fixture(scope="module")
def shapes(tmp_path_factory):
    folder = shapes_folder(tmp_path_factory.mktemp("shapes") / "photos", count=32)
    return sorted(folder.iterdir())


def test_loss_is_finite_and_falls(shapes):
    trainer = Trainer(tiny_plan(len(shapes), total_steps=40, lr=0.05), shapes)
    losses = []
    trainer.run(40, on_log=lambda r: losses.append(r["loss"]), log_every=0)
    assert len(losses) == 40 and all(math.isfinite(x) for x in losses)
    first, last = sum(losses[:8]) / 8, sum(losses[-8:]) / 8
    assert last < 0.8 * first, (first, last)


def test_augmentation_on_the_device_trains_through_the_same_loop(shapes):
    trainer = Trainer(tiny_plan(len(shapes), augment_on="device"), shapes)
    canvases, sizes = next(iter(trainer.loader))
    assert canvases.dtype == torch.uint8 and canvases.shape[1:] == (3, 48, 48)
    assert sizes.tolist()[0] == [32, 32]
    losses = []
    trainer.run(3, on_log=lambda r: losses.append(r["loss"]), log_every=0)
    assert len(losses) == 3 and all(math.isfinite(x) for x in losses)


def test_images_in_memory_are_decoded_once_and_batched_in_the_samplers_order(shapes, monkeypatch):
    from byolcli.core import views
    from byolcli.training import data

    decoded = []
    real_open = views.open_rgb
    monkeypatch.setattr(views, "open_rgb", lambda path, **kw: (decoded.append(path), real_open(path, **kw))[1])
    trainer = Trainer(tiny_plan(len(shapes), augment_on="device", in_memory=True, steps_per_epoch=4), shapes)
    canvases, sizes = next(iter(trainer.loader))
    first = [index for _, index in trainer.sampler][:8]
    whole = [data.CanvasDataset(shapes, 32)[0, i][0] for i in first]
    assert canvases.dtype == torch.uint8 and torch.equal(canvases, torch.stack(whole))
    assert sizes.tolist() == [[32, 32]] * 8
    decoded.clear()
    losses = []
    trainer.run(8, on_log=lambda r: losses.append(r["loss"]), log_every=0)  # two epochs
    assert decoded == [] and len(losses) == 8 and all(math.isfinite(x) for x in losses)


def test_init_starts_online_and_target_encoders_from_the_given_weights(shapes, tmp_path, monkeypatch):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))
    imagenet = cache_imagenet_weights(tmp_path / "torch")
    torch.manual_seed(7)
    other = torchvision.models.resnet18()
    other.fc = torch.nn.Identity()
    save_encoder(
        other,
        tmp_path / "e.safetensors",
        architecture="resnet18",
        image_size=32,
        mean=(0.5,) * 3,
        std=(0.25,) * 3,
        train_images=32,
        epochs=1,
        steps=1,
    )
    for init, expected in (("imagenet", imagenet), (str(tmp_path / "e.safetensors"), other.state_dict())):
        model = Trainer(tiny_plan(len(shapes), init=init), shapes).model
        for encoder in (model.online_encoder, model.target_encoder):
            state = encoder.state_dict()
            assert all(torch.equal(state[k], v) for k, v in expected.items()), init


def test_export_holds_only_the_backbone_and_loads_into_stock_torchvision(shapes, tmp_path):
    trainer = Trainer(tiny_plan(len(shapes)), shapes)
    trainer.run(2)
    path = tmp_path / "encoder.safetensors"
    save_encoder(
        trainer.model.online_encoder,
        path,
        architecture="resnet18",
        image_size=32,
        mean=(0.5,) * 3,
        std=(0.25,) * 3,
        train_images=32,
        epochs=0.5,
        steps=2,
    )
    stock = torchvision.models.resnet18()
    stock.fc = torch.nn.Identity()
    tensors = load_file(path)
    assert set(tensors) == set(stock.state_dict())
    stock.load_state_dict(tensors)  # strict: the exact keys and shapes, nothing else
    stock.eval()
    loaded = load_encoder(path)
    assert not loaded.training and loaded.byol_metadata["image_size"] == 32
    trainer.model.online_encoder.eval()
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        expected = trainer.model.online_encoder(x)
        assert torch.allclose(stock(x), expected, atol=1e-5)
        assert torch.allclose(loaded(x), expected, atol=1e-5)


def test_target_follows_the_ema_formula():
    model = BYOL("resnet18")
    with torch.no_grad():
        for p in model.online_parameters():
            p.add_(torch.randn_like(p))
    before = [p.clone() for p in model.target_parameters()]
    online = [p.clone() for p in model.online_parameters()]
    model.update_target(0.9)
    for old, new, theta in zip(before, model.target_parameters(), online):
        assert torch.allclose(new, 0.9 * old + 0.1 * theta, atol=1e-6)


def plain_batchnorm(model: BYOL) -> BYOL:
    """The same model with ordinary batch norm: statistics over whatever batch it is given."""
    for module in model.modules():
        if isinstance(module, PerViewBatchNorm2d):
            module.__class__ = torch.nn.BatchNorm2d
        elif isinstance(module, PerViewBatchNorm1d):
            module.__class__ = torch.nn.BatchNorm1d
    return model


@pytest.mark.parametrize("memory_format", [torch.contiguous_format, torch.channels_last])
def test_one_pass_over_both_views_computes_what_two_passes_do(memory_format):
    torch.manual_seed(0)
    joint = BYOL("resnet18").to(memory_format=memory_format)
    separate = plain_batchnorm(copy.deepcopy(joint))  # plain batch norm: each view gets its own pass
    mixed = plain_batchnorm(copy.deepcopy(joint))
    assert joint.joint_pass and not separate.joint_pass
    view1, view2 = (torch.randn(8, 3, 32, 32).contiguous(memory_format=memory_format) for _ in range(2))

    results = []
    for model in (joint, separate):
        loss, z1 = model(view1, view2)
        loss.backward()
        results.append((loss, z1, [p.grad for p in model.online_parameters()], list(model.buffers())))
    (loss, z1, grads, buffers), (loss_ref, z1_ref, grads_ref, buffers_ref) = results
    with torch.no_grad():  # both views in one pass through plain batch norm: statistics mixed
        both = torch.cat([view1, view2])
        p1, p2 = mixed.predictor(mixed.online_projector(mixed.online_encoder(both))).chunk(2)
        t1, t2 = mixed.target_projector(mixed.target_encoder(both)).chunk(2)
        loss_mixed = regression_loss(p1, t2).mean() + regression_loss(p2, t1).mean()
    assert torch.allclose(loss, loss_ref, atol=1e-5) and torch.allclose(z1, z1_ref, atol=1e-5)
    assert all(torch.allclose(g, r, atol=1e-4, rtol=1e-3) for g, r in zip(grads, grads_ref))
    assert all(torch.allclose(b.float(), r.float(), atol=1e-5) for b, r in zip(buffers, buffers_ref))
    assert not torch.allclose(loss_mixed, loss_ref, atol=1e-3)  # so the comparison can tell them apart

    joint.eval(), separate.eval()  # evaluation: running statistics, as any batch norm
    with torch.no_grad():
        assert torch.allclose(joint.online_encoder(view1), separate.online_encoder(view1), atol=1e-5)


def test_target_differs_from_online_after_training(shapes):
    trainer = Trainer(tiny_plan(len(shapes)), shapes)
    started = [t.clone() for t in trainer.model.target_parameters()]  # the online network's too: a copy
    trainer.run(3)
    pairs = list(zip(trainer.model.target_parameters(), trainer.model.online_parameters(), started))
    # Every tensor of the target trails its online twin, and has followed it where it moved (a bias
    # just before batch norm gets a gradient of rounding size only, and moves too little to follow).
    assert all(not torch.equal(target, online) for target, online, _ in pairs)
    followed = [
        not torch.equal(target, start) for target, online, start in pairs if (online - start).abs().max() > 1e-4
    ]
    assert len(followed) > len(pairs) / 2 and all(followed)


def test_augmentation_parameters_are_drawn_per_image(tmp_path):
    noise_image((48, 48), seed=3).save(tmp_path / "same.png")
    dataset = TwoViewDataset([tmp_path / "same.png"] * 8, size=32)
    loader = torch.utils.data.DataLoader(dataset, batch_size=8, sampler=[(0, i) for i in range(8)])
    view1, view2 = next(iter(loader))
    for views in (view1, view2):
        flat = views.flatten(1)
        distinct = {tuple(row[:64].tolist()) for row in flat}
        assert len(distinct) == 8  # the same picture, eight different crops and colours
    assert not torch.equal(view1, view2)


@pytest.mark.parametrize("workers", [0, 1])
def test_resume_restores_the_exact_state_and_continues_identically(shapes, tmp_path, workers):
    plan = tiny_plan(len(shapes), total_steps=8, steps_per_epoch=3, workers=workers)
    first = Trainer(plan, shapes)
    first.run(4)  # stops mid-epoch
    first.save(tmp_path / "checkpoint.pt")
    saved = {k: v.clone() for k, v in first.model.state_dict().items()}
    momenta = lambda t: [s["momentum"].clone() for s in t.byol_step.optimizer.state.values()]  # noqa: E731
    saved_momenta = momenta(first)
    first.run(7)
    uninterrupted = [p.detach().clone() for p in first.model.parameters()]

    resumed = Trainer(plan, shapes)
    resumed.load_state_dict(torch.load(tmp_path / "checkpoint.pt", weights_only=True))
    assert resumed.step == 4
    assert all(torch.equal(saved[k], v) for k, v in resumed.model.state_dict().items())
    assert all(torch.equal(a, b) for a, b in zip(saved_momenta, momenta(resumed)))
    resumed.run(7)
    for a, b in zip(uninterrupted, resumed.model.parameters()):
        assert torch.allclose(a, b, atol=1e-5)


def test_non_finite_loss_stops_and_keeps_the_last_good_checkpoint(shapes, tmp_path):
    trainer = Trainer(tiny_plan(len(shapes)), shapes)
    path = tmp_path / "checkpoint.pt"
    trainer.run(2, on_checkpoint=lambda step: trainer.save(path), checkpoint_every=0, log_every=0)
    with torch.no_grad():
        next(trainer.model.online_encoder.parameters()).fill_(float("nan"))
    with pytest.raises(TrainingFailed, match="last good checkpoint is kept"):
        trainer.run(5, on_checkpoint=lambda step: trainer.save(path), checkpoint_every=0, log_every=0)
    kept = torch.load(path, weights_only=True)
    assert kept["step"] == 2
    assert all(torch.isfinite(t).all() for t in kept["model"].values() if t.is_floating_point())


# --- the command ------------------------------------------------------------------


def test_byol_train_writes_plan_metrics_and_encoder_and_refuses_to_overwrite(tmp_path):
    folder = shapes_folder(tmp_path / "photos", count=16)
    result = run_byol("train", folder, "--epochs", "2", *TRAIN_ARGS, cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    run = tmp_path / "byol-runs" / "photos"
    plan = json.loads((run / "plan.json").read_text())
    assert plan["total_steps"] == 4 and plan["images"] == 16
    lines = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    assert lines[-1]["step"] == 4 and {"loss", "images_per_s", "data_wait", "effective_rank"} <= set(lines[-1])
    assert load_encoder(run / "encoder.safetensors").byol_metadata["train_images"] == 16
    assert sorted(p.name for p in folder.iterdir()) == [f"{i:03d}.png" for i in range(16)]  # input untouched
    # 2 epochs cannot beat random weights: said after the plan, before the first step
    warning = result.stderr.index("warning: this plan trains 2 epochs")
    assert result.stderr.index("training plan") < warning < result.stderr.index("step 4/4")
    assert "ImageNet weights" in result.stderr[warning:]

    again = run_byol("train", folder, "--epochs", "2", *TRAIN_ARGS, cwd=tmp_path)
    assert again.returncode == 2 and "already holds a finished run" in again.stderr


def test_bad_train_flags_are_one_line_errors(tmp_path):
    folder = shapes_folder(tmp_path / "photos", count=16)
    for args, message in (
        (("--backbone", "vgg"), "--backbone vgg"),
        (("--time", "soon"), "--time 'soon'"),
        (("--out", folder / "runs"), "inside the input folder"),
    ):
        result = run_byol("train", folder, *args, cwd=tmp_path)
        assert result.returncode == 2 and "Traceback" not in result.stderr, result.stderr
        assert len(result.stderr.strip().splitlines()) == 1 and message in result.stderr


def test_init_flag_refuses_what_is_not_an_encoder_or_does_not_match(tmp_path):
    folder = shapes_folder(tmp_path / "photos", count=16)
    (tmp_path / "notes.txt").write_text("not a model")
    for args, message in (
        (("--init", tmp_path / "notes.txt"), "not a safetensors model file"),
        (("--init", tmp_path / "gone.safetensors"), "no such model file"),
    ):
        result = run_byol("train", folder, *args, cwd=tmp_path)
        assert result.returncode == 2 and len(result.stderr.strip().splitlines()) == 1, result.stderr
        assert message in result.stderr
    assert not (tmp_path / "byol-runs").exists()


@pytest.mark.parametrize("how", ["kill -9", "ctrl-c"])
def test_interrupted_run_resumes_with_the_same_command(tmp_path, how):
    folder = shapes_folder(tmp_path / "photos", count=16)
    run = tmp_path / "byol-runs" / "photos"
    process = start_training(folder, tmp_path, epochs=20)
    wait_for_file(process, run / "checkpoint.pt")
    process.send_signal(signal.SIGKILL if how == "kill -9" else signal.SIGINT)
    process.communicate(timeout=120)
    if how == "ctrl-c":
        assert process.returncode == 130
    interrupted_at = torch.load(run / "checkpoint.pt", weights_only=True)["step"]
    assert 0 < interrupted_at < 40
    assert not (run / "encoder.safetensors").exists()
    if how == "kill -9":  # a run folder that lost its image list cannot resume, and says so
        damaged = tmp_path / "damaged"
        shutil.copytree(run, damaged)
        (damaged / "images.txt").unlink()
        result = run_byol("train", folder, "--epochs", "20", *TRAIN_ARGS, "--out", damaged, cwd=tmp_path)
        assert result.returncode == 2 and len(result.stderr.strip().splitlines()) == 1, result.stderr
        assert "images.txt: missing" in result.stderr and "--restart" in result.stderr

    changed = ("--lr", "0.9") if how == "ctrl-c" else ()  # the same command, or one flag changed
    result = run_byol("train", folder, "--epochs", "20", *TRAIN_ARGS, *changed, cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    assert f"resuming the run in byol-runs/photos from step {interrupted_at}" in result.stderr
    if changed:
        assert "--lr differ from it and are ignored" in result.stderr
    else:
        assert "ignored" not in result.stderr
    assert torch.load(run / "checkpoint.pt", weights_only=True)["step"] == 40
    steps = [json.loads(x)["step"] for x in (run / "metrics.jsonl").read_text().splitlines()]
    assert steps == sorted(steps) and steps[-1] == 40
    assert load_encoder(run / "encoder.safetensors").byol_metadata["steps"] == "40"
