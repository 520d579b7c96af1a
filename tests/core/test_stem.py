"""The small-image stem: its network, its files, and when the plan picks it."""

import pytest
import torch
import torchvision
from safetensors.torch import load_file

from byolcli.core.backbones import make_backbone, stem_of
from byolcli.core.encoder import load_encoder, read_metadata, save_encoder
from byolcli.core.errors import UserError
from byolcli.core.hardware import GiB, Hardware
from byolcli.training.byol import BYOL
from byolcli.training.plan import Overrides, make_plan

SMALL = dict(
    architecture="resnet18", image_size=32, mean=(0.5,) * 3, std=(0.25,) * 3, train_images=10, epochs=1, steps=1
)


def test_the_small_stem_keeps_torchvision_names_and_only_the_first_kernel_changes():
    small, standard = make_backbone("resnet18", stem="small"), make_backbone("resnet18")
    small_state, standard_state = small.state_dict(), standard.state_dict()
    assert small_state.keys() == standard_state.keys()
    differing = [k for k in small_state if small_state[k].shape != standard_state[k].shape]
    assert differing == ["conv1.weight"] and small_state["conv1.weight"].shape == (64, 3, 3, 3)
    assert stem_of(small_state) == "small" and stem_of(standard_state) == "standard"


def test_the_small_stem_keeps_32_px_maps_four_times_larger_per_side():
    seen = {}

    def remember(name):
        return lambda module, inputs, output: seen.__setitem__(name, output.shape[-1])

    for stem in ("standard", "small"):
        model = make_backbone("resnet18", stem=stem).eval()
        model.layer4.register_forward_hook(remember(stem))
        assert model(torch.randn(2, 3, 32, 32)).shape == (2, 512)
    assert (seen["standard"], seen["small"]) == (1, 4)


def test_its_export_loads_into_a_stock_torchvision_resnet_with_the_two_documented_lines(tmp_path):
    torch.manual_seed(0)
    encoder = make_backbone("resnet18", stem="small").eval()
    path = tmp_path / "encoder.safetensors"
    save_encoder(encoder, path, **SMALL)

    m = torchvision.models.resnet18()
    m.fc = torch.nn.Identity()
    m.conv1 = torch.nn.Conv2d(3, 64, 3, 1, 1, bias=False)
    m.maxpool = torch.nn.Identity()
    m.load_state_dict(load_file(path))

    images = torch.randn(3, 3, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(m.eval()(images), encoder(images))


def test_load_encoder_rebuilds_the_stem_from_the_metadata(tmp_path):
    torch.manual_seed(0)
    encoder = make_backbone("resnet18", stem="small").eval()
    path = tmp_path / "encoder.safetensors"
    save_encoder(encoder, path, **SMALL)
    assert read_metadata(path)["stem"] == "small"
    loaded = load_encoder(path)
    assert loaded.conv1.kernel_size == (3, 3) and isinstance(loaded.maxpool, torch.nn.Identity)
    images = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(loaded(images), encoder(images))


def test_byol_trains_the_stem_it_is_given():
    model = BYOL("resnet18", "small")
    assert model.online_encoder.conv1.kernel_size == (3, 3) and model.target_encoder.conv1.kernel_size == (3, 3)
    loss, _ = model(torch.randn(4, 3, 32, 32), torch.randn(4, 3, 32, 32))
    loss.backward()
    assert model.online_encoder.conv1.weight.grad is not None


def test_a_plain_state_dict_with_the_small_stem_is_recognised(tmp_path):
    from safetensors.torch import save_file

    from byolcli.core.model_choice import choose_model

    torch.manual_seed(0)
    encoder = make_backbone("resnet18", stem="small").eval()
    path = tmp_path / "plain.safetensors"
    save_file(encoder.state_dict(), path)
    choice = choose_model(path, "resnet18", 32)
    assert choice.metadata["stem"] == "small"
    images = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(choice.load()(images), encoder(images))


def device(kind, memory=80 * GiB):
    name = {"cuda": "cuda:0", "mps": "mps", "cpu": "cpu"}[kind]
    return Hardware(kind, f"fake {kind}", memory, memory, kind == "cuda", 16, name, 64 * GiB)


def planned(kind, size, memory=80 * GiB, **overrides):
    probed = []

    def probe(setting):
        probed.append(setting)
        return 0.5

    plan = make_plan([size] * 20_000, 0, device(kind, memory), Overrides(image_size=size, **overrides), probe)
    return plan, probed


@pytest.mark.parametrize("kind", ["cuda", "mps", "cpu"])
@pytest.mark.parametrize("size", [32, 64, 128])
def test_the_plan_keeps_the_strided_stem_until_the_small_one_is_measured_to_learn_more(kind, size):
    plan, probed = planned(kind, size)
    assert plan.stem == "standard"
    assert probed and all(setting.stem == "standard" for setting in probed)  # the step it timed is the one it trains
    if kind == "cpu":
        assert "costs 10 to 20 times more per step" in plan.reasons["stem"]
    elif size <= 64:
        assert "--stem small" in plan.reasons["stem"] and "measured" in plan.reasons["stem"]


def test_the_small_stem_is_probed_and_trained_when_asked_for():
    plan, probed = planned("cuda", 32, stem="small")
    assert plan.stem == "small" and plan.reasons["stem"] == "set by flag"
    assert all(setting.stem == "small" for setting in probed)


def test_the_flag_overrides_the_rule():
    assert planned("cpu", 32, stem="small")[0].stem == "small"
    assert planned("cuda", 32, stem="standard")[0].stem == "standard"


def test_the_memory_estimate_starts_the_batch_search_lower_for_the_heavier_stem():
    first = {stem: planned("cuda", 64, 8 * GiB, stem=stem)[1][0].batch for stem in ("standard", "small")}
    assert first["small"] < first["standard"]


def test_flags_that_contradict_the_starting_weights_are_refused(tmp_path):
    from byolcli.training.train_flags import validate

    with pytest.raises(UserError, match="--stem tiny"):
        validate(Overrides(stem="tiny"))
    with pytest.raises(UserError, match="standard stem"):
        validate(Overrides(init="imagenet", stem="small"))
    path = tmp_path / "encoder.safetensors"
    save_encoder(make_backbone("resnet18", stem="small"), path, **SMALL)
    assert validate(Overrides(init=str(path))).stem == "small"
    with pytest.raises(UserError, match="small stem"):
        validate(Overrides(init=str(path), stem="standard"))


def test_the_onnx_export_rebuilds_the_small_stem_in_a_stock_network():
    from byolcli.core.export import stock_backbone

    torch.manual_seed(0)
    encoder = make_backbone("resnet18", stem="small").eval()
    stock = stock_backbone(encoder, "resnet18")
    assert type(stock.conv1) is torch.nn.Conv2d and stock.conv1.kernel_size == (3, 3)
    images = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(stock(images), encoder(images))
