"""The CUDA and fp16 paths, checked on the CPU with fakes of torch.cuda's API."""

from types import SimpleNamespace

import pytest
import torch

from byolcli.embed import autocast_dtype
from byolcli.errors import TrainingFailed
from byolcli.plan import GiB, choose_precision, detect_hardware
from byolcli.train import OVERFLOWS_IN_A_ROW, Trainer
from conftest import shapes_folder, tiny_plan

# (name, compute capability, memory): what torch.cuda reports for each fake device.
GPUS = [("NVIDIA A100-SXM4-40GB", (8, 0), 40 * GiB), ("Tesla T4", (7, 5), 15 * GiB)]


@pytest.fixture
def fake_cuda(monkeypatch):
    """Two CUDA GPUs: an A100 as device 0 and a T4 as device 1, with torch's own answer to
    is_bf16_supported() on a T4 (yes: it counts emulation)."""
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: len(GPUS))
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 0)
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda index=None: GPUS[index or 0][1])
    monkeypatch.setattr(torch.cuda, "get_device_properties",
                        lambda index: SimpleNamespace(name=GPUS[index][0], total_memory=GPUS[index][2]))
    monkeypatch.setattr(torch.cuda, "mem_get_info", lambda index=None: (GPUS[index or 0][2] // 2, GPUS[index or 0][2]))
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda including_emulation=True: True)


def test_bf16_only_on_gpus_that_compute_it_and_asked_of_the_planned_gpu(fake_cuda):
    a100, t4 = detect_hardware("cuda:0"), detect_hardware("cuda:1")
    assert (a100.name, a100.bf16, t4.name, t4.bf16) == ("NVIDIA A100-SXM4-40GB", True, "Tesla T4", False)
    assert choose_precision(a100)[0] == "bf16" and choose_precision(t4)[0] == "fp16"
    assert autocast_dtype(torch.device("cuda:0"), None) == torch.bfloat16
    assert autocast_dtype(torch.device("cuda:1"), None) == torch.float16
    assert autocast_dtype(torch.device("cuda:1"), "fp32") is None


@pytest.fixture(scope="module")
def shapes(tmp_path_factory):
    return sorted(shapes_folder(tmp_path_factory.mktemp("shapes") / "photos", count=16).iterdir())


def overflowing(trainer: Trainer, steps) -> None:
    """Make the loss of the given micro-steps (counted from 1) overflow, as fp16 does."""
    real, calls = trainer.forward, []

    def forward(view1, view2):
        loss, projections = real(view1, view2)
        calls.append(1)
        return (loss * float("inf") if len(calls) in steps else loss), projections

    trainer.forward = forward


def test_an_fp16_overflow_is_a_skipped_step_not_the_end_of_the_run(shapes):
    trainer = Trainer(tiny_plan(len(shapes), precision="fp16", total_steps=6), shapes)
    scale = trainer.scaler.get_scale()
    overflowing(trainer, steps={3})
    records = []
    trainer.run(6, on_log=records.append, log_every=0)
    assert trainer.step == 6 and [r["overflowed_steps"] for r in records] == [0, 0, 1, 0, 0, 0]
    assert records[2]["loss"] is None and all(r["loss"] > 0 for i, r in enumerate(records) if i != 2)
    assert trainer.scaler.get_scale() < scale  # the scaler saw it and backed off


def test_fp16_overflows_that_never_stop_end_the_run(shapes):
    trainer = Trainer(tiny_plan(len(shapes), precision="fp16", total_steps=40), shapes)
    overflowing(trainer, steps=range(1, 100))
    with pytest.raises(TrainingFailed, match="last good checkpoint is kept"):
        trainer.run(40, log_every=0)
    assert trainer.step == OVERFLOWS_IN_A_ROW


def test_the_probe_treats_library_allocation_failures_as_out_of_memory_and_frees_before_retrying(monkeypatch):
    import weakref

    from byolcli import plan
    from byolcli.model import BYOL

    attempt = {}

    def failing_forward(self, view1, view2):
        activations = torch.empty(1 << 20)  # what a failed attempt leaves behind
        attempt["tensor"] = weakref.ref(activations)
        raise RuntimeError("CUDA error: CUBLAS_STATUS_ALLOC_FAILED when calling `cublasCreate(handle)`")

    freed_while_alive = []
    monkeypatch.setattr(BYOL, "forward", failing_forward)
    monkeypatch.setattr(plan, "release_cached_memory",
                        lambda device: freed_while_alive.append(attempt["tensor"]() is not None))
    cpu = plan.Hardware("cpu", "CPU", 8 * GiB, 8 * GiB, False, 2, "cpu")
    with pytest.raises(plan.OutOfMemory, match="CUBLAS_STATUS_ALLOC_FAILED"):
        plan.probe_step(cpu, "resnet18", 32, 4, "fp32", False)
    assert freed_while_alive == [False]  # the cache is released once the attempt's tensors are gone

    monkeypatch.setattr(BYOL, "forward", lambda self, a, b: (_ for _ in ()).throw(RuntimeError("shape mismatch")))
    with pytest.raises(RuntimeError, match="shape mismatch"):  # anything else is a bug, not a full GPU
        plan.probe_step(cpu, "resnet18", 32, 4, "fp32", False)


class CountingLoader:
    """A loader that counts the iterators made of it."""

    def __init__(self, loader) -> None:
        self.loader, self.iterators = loader, 0

    def __iter__(self):
        self.iterators += 1
        return iter(self.loader)


def test_training_in_several_calls_keeps_the_epochs_iterator_and_trains_the_same(shapes):
    def trainer():
        return Trainer(tiny_plan(len(shapes), total_steps=6, steps_per_epoch=2, workers=1), shapes)

    whole = trainer()
    whole.run(6)
    split = trainer()
    split.loader = CountingLoader(split.loader)
    for until in (1, 2, 3, 6):  # as the time-budget calibration calls it
        split.run(until)
    assert split.loader.iterators == 3  # one per epoch, not one per call
    for (name, a), b in zip(whole.model.state_dict().items(), split.model.state_dict().values()):
        assert torch.equal(a, b), name


def test_a_chosen_gpu_becomes_the_current_one_and_fp32_on_it_is_exact(fake_cuda, monkeypatch):
    from byolcli.plan import use_device

    current = []
    monkeypatch.setattr(torch.cuda, "set_device", current.append)
    flags = (torch.backends.cudnn, torch.backends.cuda.matmul)  # torch's own switches, put back after
    before = [switches.allow_tf32 for switches in flags]
    try:
        for switches in flags:
            switches.allow_tf32 = True
        use_device(torch.device("cuda:1"), "bf16")
        assert current == [torch.device("cuda:1")] and torch.backends.cudnn.allow_tf32
        use_device(torch.device("cuda:1"), "fp32")
        assert not torch.backends.cudnn.allow_tf32 and not torch.backends.cuda.matmul.allow_tf32
        use_device(torch.device("cpu"), "fp32")
        assert len(current) == 2
    finally:
        for switches, value in zip(flags, before):
            switches.allow_tf32 = value
