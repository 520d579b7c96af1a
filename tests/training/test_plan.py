"""The planner: what it chooses for each machine and set of images, and why."""

import pytest
from helpers import tiny_plan

from byolcli.core.errors import UserError
from byolcli.core.hardware import GiB, Hardware
from byolcli.training.plan import Overrides, make_plan
from byolcli.training.probe import OutOfMemory


def gpu(memory_gib, bf16=True, cores=16, kind="cuda"):
    device = "cuda:0" if kind == "cuda" else kind
    return Hardware(kind, f"fake {kind}", memory_gib * GiB, memory_gib * GiB, bf16, cores, device)


def fits_below(limit, calls):
    def probe(setting):
        calls.append(setting.batch)
        if setting.batch > limit:
            raise OutOfMemory(f"batch {setting.batch}")
        return 0.5

    return probe


def test_fake_out_of_memory_makes_the_planner_back_off():
    calls = []
    plan = make_plan([256] * 100_000, 0, gpu(80), Overrides(backbone="resnet18"), fits_below(96, calls))
    assert calls == [512, 256, 128, 64]  # seeded at the cap by the memory estimate, then halved
    assert plan.batch_size == 64
    assert plan.effective_batch == 256  # accumulated back up to the paper's minimum
    assert plan.lr == pytest.approx(plan.base_lr)  # base × 256/256


def test_probe_searches_upward_when_the_estimate_is_cautious():
    calls = []
    plan = make_plan([256] * 200_000, 0, gpu(80), Overrides(), fits_below(10**6, calls))
    assert calls == sorted(calls) and calls[-1] == 512 and plan.batch_size == 512


def test_plans_for_different_machines_are_sensible():
    big = make_plan([480] * 200_000, 0, gpu(80), Overrides(), fits_below(10**6, []))
    assert (big.backbone, big.image_size, big.precision, big.batch_size) == ("resnet50", 224, "bf16", 512)
    assert big.channels_last and big.accumulation == 1 and 1 <= big.workers <= 15
    assert big.augment_on == "device"  # 224 px: two views per image outrun CPU workers

    old = make_plan([32] * 5_000, 3, gpu(8, bf16=False), Overrides(), fits_below(10**6, []))
    assert (old.backbone, old.image_size, old.precision, old.skipped) == ("resnet18", 32, "fp16", 3)
    assert old.augment_on == "cpu"
    assert old.batch_size <= 5_000 // 8

    mps = make_plan([600] * 10_000, 0, gpu(16, bf16=False, cores=8, kind="mps"), Overrides(), fits_below(10**6, []))
    assert mps.image_size == 128 and mps.precision == "fp32"

    laptop = Hardware("cpu", "CPU", 8 * GiB, 8 * GiB, False, 2, "cpu")
    small = make_plan([32] * 5_000, 0, laptop, Overrides(time_budget=300), fits_below(10**6, []))
    assert (small.image_size, small.batch_size, small.precision, small.workers) == (32, 64, "fp32", 0)
    assert small.augment_on == "cpu"
    assert small.total_steps == 600  # 300 s / 0.5 s per step
    assert 1 / (1 - small.tau_base) <= small.total_steps / 10  # the target can move in a short run
    assert small.lr == pytest.approx(small.base_lr * 64 / 256)
    photos = make_plan([400] * 3_000, 0, laptop, Overrides(), fits_below(10**6, []))
    assert photos.image_size == 64 and photos.epochs == 100
    server = Hardware("cpu", "CPU", 64 * GiB, 64 * GiB, False, 16, "cpu")
    assert make_plan([32] * 5_000, 0, server, Overrides(), fits_below(10**6, [])).workers == 4


def test_sets_that_fit_in_memory_are_decoded_once_and_augmented_in_batches():
    laptop = Hardware("cpu", "CPU", 8 * GiB, 8 * GiB, False, 2, "cpu", ram=8 * GiB)
    small = make_plan([32] * 5_000, 0, laptop, Overrides(), fits_below(10**6, []))
    assert small.in_memory and small.augment_on == "device" and "decoded once" in small.reasons["in_memory"]
    large = make_plan([400] * 2_000_000, 0, laptop, Overrides(), fits_below(10**6, []))
    assert not large.in_memory and large.augment_on == "cpu" and "a quarter of the RAM" in large.reasons["in_memory"]
    pinned = make_plan([32] * 5_000, 0, laptop, Overrides(augment_on="cpu"), fits_below(10**6, []))
    assert not pinned.in_memory and pinned.augment_on == "cpu"
    gpu_box = make_plan([480] * 200_000, 0, gpu(80), Overrides(), fits_below(10**6, []))  # RAM unknown
    assert not gpu_box.in_memory and gpu_box.augment_on == "device"


def test_bf16_capable_cpus_get_the_precision_that_measured_faster():
    amx = Hardware("cpu", "CPU", 8 * GiB, 8 * GiB, True, 2, "cpu")
    seconds = {"fp32": 0.4, "bf16": 0.5}
    plan = make_plan([32] * 5_000, 0, amx, Overrides(), lambda setting: seconds[setting.precision])
    assert plan.precision == "fp32" and plan.channels_last and "fp32 160, bf16 128" in plan.reasons["precision"]
    seconds = {"fp32": 0.6, "bf16": 0.3}
    plan = make_plan([400] * 5_000, 0, amx, Overrides(), lambda setting: seconds[setting.precision])
    assert plan.precision == "bf16" and plan.channels_last
    seconds = {"fp32": 0.5, "bf16": 0.46}  # within timing noise: keep fp32
    assert make_plan([400] * 5_000, 0, amx, Overrides(), lambda setting: seconds[setting.precision]).precision == "fp32"


def test_a_run_too_short_to_beat_an_untrained_network_is_called_out_with_what_would_do():
    from byolcli.training.plan import USEFUL_EPOCHS, short_run_warning

    # 10 epochs of 100 steps at 0.6 s: reaching USEFUL_EPOCHS (40) takes 40 minutes.
    short = tiny_plan(800, steps_per_epoch=100, total_steps=1000, epochs=10.0, step_seconds=0.6)
    warning = short_run_warning(short)
    assert warning and "10 epochs" in warning and "--time 40m00s" in warning
    assert "a GPU" in warning and "ImageNet weights" in warning
    assert "a GPU" not in short_run_warning(tiny_plan(800, epochs=10.0, device="cuda:0"))
    assert short_run_warning(tiny_plan(800, epochs=float(USEFUL_EPOCHS))) is None
    assert short_run_warning(tiny_plan(800, epochs=10.0, init="imagenet")) is None


def test_too_few_images_is_a_clear_error_and_small_sets_get_a_usable_batch():
    laptop = Hardware("cpu", "CPU", 8 * GiB, 8 * GiB, False, 2, "cpu")
    with pytest.raises(UserError, match="only 5 usable images; training needs at least 16"):
        make_plan([64] * 5, 0, laptop, Overrides(), fits_below(10**6, []))
    assert make_plan([64] * 20, 0, laptop, Overrides(), fits_below(10**6, [])).batch_size == 8


def test_flags_override_the_plan():
    calls = []
    plan = make_plan(
        [256] * 10_000,
        0,
        gpu(24),
        Overrides(backbone="resnet34", image_size=96, batch_size=48, epochs=7, lr=0.3, precision="fp32", workers=3),
        fits_below(10**6, calls),
    )
    assert (plan.backbone, plan.image_size, plan.batch_size, plan.precision, plan.workers) == (
        "resnet34",
        96,
        48,
        "fp32",
        3,
    )
    assert plan.total_steps == 7 * plan.steps_per_epoch and plan.lr == pytest.approx(0.3 * 48 / 256)
    assert calls == [48] and plan.reasons["batch_size"] == "set by flag"


def test_loader_processes_fit_in_a_small_dev_shm():
    def gpu(shm):
        return Hardware("cuda", "fake GPU", 80 * GiB, 80 * GiB, True, 32, "cuda:0", 64 * GiB, shm)

    images = [256] * 1_000_000  # too many to keep in memory: loader processes decode them
    roomy = make_plan(images, 0, gpu(256 * GiB), Overrides(augment_on="cpu"), lambda *a: 0.5)
    docker = make_plan(images, 0, gpu(64 * 2**20), Overrides(augment_on="cpu"), lambda *a: 0.5)
    assert roomy.workers == 12 and not roomy.in_memory
    assert docker.workers < 12 and "/dev/shm has 64 MiB free" in docker.reasons["workers"]
    held = 4 * docker.batch_size * 2 * 3 * 224 * 224 * 4  # prefetched batches of two fp32 views
    assert docker.workers * held <= 64 * 2**20


def test_loader_processes_that_decode_a_set_into_memory_fit_in_a_small_dev_shm():
    def gpu(shm):
        return Hardware("cuda", "fake GPU", 80 * GiB, 80 * GiB, True, 32, "cuda:0", 64 * GiB, shm)

    images = [256] * 20_000  # decoded once, into memory, by loader processes
    roomy = make_plan(images, 0, gpu(256 * GiB), Overrides(), lambda *a: 0.5)
    docker = make_plan(images, 0, gpu(512 * 2**20), Overrides(), lambda *a: 0.5)
    assert roomy.in_memory and docker.in_memory and roomy.workers == 12
    held = 4 * 256 * 3 * 336 * 336  # each holds prefetched batches of 256 canvases, 1.5 × 224 px a side
    assert 0 < docker.workers < 12 and docker.workers * held <= 512 * 2**20
    assert "/dev/shm has 512 MiB free" in docker.reasons["workers"]


def imagenet_found(architecture):
    return None


def imagenet_missing(architecture):
    return f"no ImageNet weights in /cache/{architecture}.pth and none could be downloaded (offline)"


def test_auto_starts_from_imagenet_weights_where_found_and_adapts_them():
    laptop = Hardware("cpu", "CPU", 8 * GiB, 8 * GiB, False, 2, "cpu")
    over = Overrides(time_budget=600)
    found = make_plan([32] * 5_000, 0, laptop, over, fits_below(10**6, []), find_imagenet=imagenet_found)
    missing = make_plan([32] * 5_000, 0, laptop, over, fits_below(10**6, []), find_imagenet=imagenet_missing)

    assert found.init == "imagenet" and "ImageNet resnet18 weights" in found.reasons["init"]
    assert missing.init is None and missing.reasons["init"].startswith("random: no ImageNet weights in /cache/")
    assert "--init random" in missing.reasons["init"]
    # Weights trained on larger images see 32-px images upsampled; random weights train at the images' size.
    assert (found.image_size, missing.image_size) == (64, 32) and "upsampled" in found.reasons["image_size"]
    # A start is adapted gently: a lower rate and a slower target than a run from random weights.
    assert found.base_lr < missing.base_lr and found.tau_base > missing.tau_base
    assert found.total_steps == 600 / 0.5  # --time still sets the length
    default = make_plan([32] * 5_000, 0, laptop, Overrides(), fits_below(10**6, []), find_imagenet=imagenet_found)
    scratch = make_plan([32] * 5_000, 0, laptop, Overrides(), fits_below(10**6, []), find_imagenet=imagenet_missing)
    assert default.epochs < scratch.epochs  # without --time, a start needs fewer epochs


def test_random_and_imagenet_and_a_pinned_stem_decide_the_start_over_what_is_found():
    laptop = Hardware("cpu", "CPU", 8 * GiB, 8 * GiB, False, 2, "cpu")

    def plan(find, **pinned):
        return make_plan([32] * 500, 0, laptop, Overrides(**pinned), fits_below(10**6, []), find_imagenet=find)

    assert plan(imagenet_found, init="random").init is None
    assert plan(imagenet_found, stem="small").init is None
    assert "standard stem" in plan(imagenet_found, stem="small").reasons["init"]
    assert plan(imagenet_found, init="imagenet").init == "imagenet"
    with pytest.raises(UserError, match="--init imagenet: no ImageNet weights in /cache/resnet18.pth"):
        plan(imagenet_missing, init="imagenet")


def test_a_budget_replanned_from_the_measured_speed_rechooses_what_the_length_decides():
    from byolcli.training.plan import refit_to_budget

    plan = tiny_plan(800, batch_size=64, steps_per_epoch=12, epochs=100.0, time_budget=3600.0)
    plan.reasons["lr"] = "base 0.45 for a 100-epoch run, × global batch/256"
    refit_to_budget(plan, steps_done=40, seconds_left=3000.0, step_seconds=0.5)  # 6,040 steps of 12: 503 epochs
    assert plan.epochs == pytest.approx(503.333, abs=1e-3) and plan.base_lr == 0.3
    assert plan.lr == pytest.approx(0.3 * 64 / 256) and plan.tau_base == 0.99
    pinned = tiny_plan(800, batch_size=64, steps_per_epoch=12, time_budget=3600.0, base_lr=0.2, lr=0.05)
    pinned.reasons["lr"] = "set by flag"
    refit_to_budget(pinned, steps_done=40, seconds_left=3000.0, step_seconds=0.5)
    assert (pinned.base_lr, pinned.lr) == (0.2, 0.05)
