"""The CUDA and fp16 paths, checked on the CPU with fakes of torch.cuda's API."""

import contextlib
from types import SimpleNamespace

import pytest
import torch
from helpers import shapes_folder, tiny_plan
from torch.utils._python_dispatch import TorchDispatchMode

from byolcli.engine import Trainer
from byolcli.errors import TrainingFailed
from byolcli.hardware import GiB, detect_hardware
from byolcli.inference import autocast_dtype
from byolcli.rules import device_precision

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
    monkeypatch.setattr(
        torch.cuda,
        "get_device_properties",
        lambda index: SimpleNamespace(name=GPUS[index][0], total_memory=GPUS[index][2]),
    )
    monkeypatch.setattr(torch.cuda, "mem_get_info", lambda index=None: (GPUS[index or 0][2] // 2, GPUS[index or 0][2]))
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda including_emulation=True: True)


def test_bf16_only_on_gpus_that_compute_it_and_asked_of_the_planned_gpu(fake_cuda):
    a100, t4 = detect_hardware("cuda:0"), detect_hardware("cuda:1")
    assert (a100.name, a100.bf16, t4.name, t4.bf16) == ("NVIDIA A100-SXM4-40GB", True, "Tesla T4", False)
    assert device_precision(a100)[0] == "bf16" and device_precision(t4)[0] == "fp16"
    assert autocast_dtype(torch.device("cuda:0"), None) == torch.bfloat16
    assert autocast_dtype(torch.device("cuda:1"), None) == torch.float16
    assert autocast_dtype(torch.device("cuda:1"), "fp32") is None


@pytest.fixture(scope="module")
def shapes(tmp_path_factory):
    return sorted(shapes_folder(tmp_path_factory.mktemp("shapes") / "photos", count=16).iterdir())


def overflowing(trainer: Trainer, steps) -> None:
    """Make the loss of the given micro-steps (counted from 1) overflow, as fp16 does."""
    real, calls = trainer.byol_step.forward, []

    def forward(view1, view2):
        loss, projections = real(view1, view2)
        calls.append(1)
        return (loss * float("inf") if len(calls) in steps else loss), projections

    trainer.byol_step.forward = forward


def test_an_fp16_overflow_is_a_skipped_step_not_the_end_of_the_run(shapes):
    trainer = Trainer(tiny_plan(len(shapes), precision="fp16", total_steps=4), shapes)
    scale = trainer.byol_step.scaler.get_scale()
    overflowing(trainer, steps={2})
    records = []
    trainer.run(4, on_log=records.append, log_every=0)
    assert trainer.step == 4 and [r["overflowed_steps"] for r in records] == [0, 1, 0, 0]
    assert records[1]["loss"] is None and all(r["loss"] > 0 for i, r in enumerate(records) if i != 1)
    assert trainer.byol_step.scaler.get_scale() < scale  # the scaler saw it and backed off


def test_fp16_overflows_that_never_stop_end_the_run(shapes, monkeypatch):
    from byolcli import engine

    monkeypatch.setattr(engine, "OVERFLOWS_IN_A_ROW", 3)  # fp16 steps are slow on a CPU: the rule, not its number
    trainer = Trainer(tiny_plan(len(shapes), precision="fp16", total_steps=40), shapes)
    overflowing(trainer, steps=range(1, 100))
    with pytest.raises(TrainingFailed, match="last good checkpoint is kept"):
        trainer.run(40, log_every=0)
    assert trainer.step == 3


def test_the_probe_treats_library_allocation_failures_as_out_of_memory_and_frees_before_retrying(monkeypatch):
    import weakref

    from byolcli import probe
    from byolcli.hardware import Hardware
    from byolcli.model import BYOL

    attempt = {}

    def failing_forward(self, view1, view2):
        activations = torch.empty(1 << 20)  # what a failed attempt leaves behind
        attempt["tensor"] = weakref.ref(activations)
        raise RuntimeError("CUDA error: CUBLAS_STATUS_ALLOC_FAILED when calling `cublasCreate(handle)`")

    freed_while_alive = []
    monkeypatch.setattr(BYOL, "forward", failing_forward)
    monkeypatch.setattr(
        probe, "release_cached_memory", lambda device: freed_while_alive.append(attempt["tensor"]() is not None)
    )
    cpu = Hardware("cpu", "CPU", 8 * GiB, 8 * GiB, False, 2, "cpu")
    with pytest.raises(probe.OutOfMemory, match="CUBLAS_STATUS_ALLOC_FAILED"):
        probe.probe_step(cpu, probe.StepSetting("resnet18", 32, 4, "fp32", False))
    assert freed_while_alive == [False]  # the cache is released once the attempt's tensors are gone

    monkeypatch.setattr(BYOL, "forward", lambda self, a, b: (_ for _ in ()).throw(RuntimeError("shape mismatch")))
    with pytest.raises(RuntimeError, match="shape mismatch"):  # anything else is a bug, not a full GPU
        probe.probe_step(cpu, probe.StepSetting("resnet18", 32, 4, "fp32", False))


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
    from byolcli.hardware import use_device

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


def test_cores_are_the_ones_this_process_may_use(monkeypatch, tmp_path):
    from byolcli import hardware

    monkeypatch.setattr(hardware.os, "sched_getaffinity", lambda pid: {0, 1, 2, 3, 4, 5}, raising=False)
    monkeypatch.setattr(hardware, "CGROUP_CPU_MAX", tmp_path / "cpu.max")
    assert hardware.usable_cores() == 6  # no quota file: the affinity
    (tmp_path / "cpu.max").write_text("max 100000\n")
    assert hardware.usable_cores() == 6
    (tmp_path / "cpu.max").write_text("250000 100000\n")  # a quota of 2.5 cores
    assert hardware.usable_cores() == 3


class OnMPS(torch.Tensor):
    """A CPU tensor standing in for an MPS one: torch's MPS backend (up to at least 2.5) has no SVD."""

    @classmethod
    def __torch_function__(cls, func, types, args=(), kwargs=None):
        if func is torch.linalg.svdvals:
            raise NotImplementedError("The operator 'aten::_linalg_svd.U' is not currently implemented for MPS")
        if func is torch.Tensor.cpu:
            return args[0].as_subclass(torch.Tensor).clone()
        return super().__torch_function__(func, types, args, kwargs or {})


def test_the_collapse_monitor_runs_where_the_device_has_no_svd():
    from byolcli.engine import projection_health

    projections = torch.randn(64, 256)
    assert projection_health(projections.as_subclass(OnMPS)) == pytest.approx(projection_health(projections))


def test_fp32_never_enters_autocast(shapes, monkeypatch):
    """torch 2.4 raises on torch.autocast("mps", enabled=False): fp32 must not call it at all."""
    from byolcli import inference
    from byolcli.hardware import Hardware
    from byolcli.probe import StepSetting, probe_step

    def refusing_autocast(device_type, dtype=None, enabled=True, **kwargs):
        raise RuntimeError(f"User specified an unsupported autocast device_type '{device_type}'")

    monkeypatch.setattr(torch, "autocast", refusing_autocast)
    trainer = Trainer(tiny_plan(len(shapes), total_steps=1), shapes)
    trainer.run(1)
    cpu = Hardware("cpu", "CPU", 8 * GiB, 8 * GiB, False, 2, "cpu")
    assert probe_step(cpu, StepSetting("resnet18", 32, 4, "fp32", False), steps=1) > 0
    encoder = trainer.model.online_encoder
    encoder.byol_metadata = {"image_size": 32, "mean": (0.5,) * 3, "std": (0.25,) * 3}
    rows = list(inference.iter_embeddings(shapes[:2], encoder.eval(), torch.device("cpu"), workers=0, precision="fp32"))
    assert rows[0][1].shape == (2, 512)


def test_the_probe_counts_what_the_allocator_reserved_and_what_mps_holds(monkeypatch):
    from byolcli.hardware import memory_held

    monkeypatch.setattr(torch.cuda, "max_memory_reserved", lambda device=None: 30 * GiB)
    monkeypatch.setattr(torch.cuda, "max_memory_allocated", lambda device=None: 20 * GiB)
    monkeypatch.setattr(torch.mps, "driver_allocated_memory", lambda: 12 * GiB)
    assert memory_held(torch.device("cuda:0")) == 30 * GiB
    assert memory_held(torch.device("mps")) == 12 * GiB
    assert memory_held(torch.device("cpu")) == 0


class NoHostSync(TorchDispatchMode):
    """Fails on what makes the host wait for a GPU: reading a value back, ops whose output size
    depends on the data, and tensors made from Python numbers (copied to the device each time)."""

    SYNCING = (
        "aten._local_scalar_dense",
        "aten.nonzero",
        "aten.masked_select",
        "aten.unique",
        "aten.is_nonzero",
        "aten.equal",
        "aten.lift_fresh",
        "aten.repeat_interleave.Tensor",
        "aten.index.Tensor",
    )

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        name = str(func)
        if name.startswith(self.SYNCING) and not (name.startswith("aten.index.Tensor") and not _bool_index(args)):
            raise AssertionError(f"{name} would make the host wait for the GPU")
        return func(*args, **(kwargs or {}))


def _bool_index(args) -> bool:
    return any(t is not None and t.dtype == torch.bool for t in args[1])


def test_a_gpu_training_step_never_waits_on_the_host(monkeypatch):
    from byolcli import small_maps
    from byolcli.augment import byol_views
    from byolcli.data import constant
    from byolcli.model import BYOL
    from byolcli.optim import LARS, lars_groups

    monkeypatch.setattr(small_maps, "dense_layout", lambda *args: None)  # a GPU runs torch's own convolutions
    canvases = torch.randint(0, 256, (8, 3, 144, 144), dtype=torch.uint8)
    sizes = torch.tensor([[96, 128]] * 8)
    model = BYOL("resnet18")
    optimizer = LARS(lars_groups(model.online_encoder, model.online_projector, model.predictor), lr=0.1)
    for warm_up in (True, False):  # the first step makes the constants it keeps
        with NoHostSync() if not warm_up else contextlib.nullcontext():
            view1, view2 = byol_views(canvases, sizes, 96, select=False)  # blur included at 96 px
            loss, _ = model(view1, view2)
            loss.backward()
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            model.update_target(0.99)
    assert constant((1.0, 2.0, 3.0), view1, (1, 3, 1, 1)) is constant((1.0, 2.0, 3.0), view1, (1, 3, 1, 1))


def test_prefetching_keeps_order_runs_ahead_passes_errors_on_and_stops_with_its_consumer():
    import threading

    from byolcli.data import prefetched

    made = []
    ahead = threading.Event()

    def items():
        for i in range(5):
            made.append(i)
            if i == 2:
                ahead.set()  # produced while the consumer still holds item 0
            yield i

    stream = prefetched(items(), depth=2)
    assert next(stream) == 0
    assert ahead.wait(10) and made[:3] == [0, 1, 2]
    assert list(stream) == [1, 2, 3, 4]

    def failing():
        yield 1
        raise OSError("disk gone")

    stream = prefetched(failing())
    assert next(stream) == 1
    with pytest.raises(OSError, match="disk gone"):
        next(stream)

    endless = prefetched(iter(int, 1), depth=1)  # never ends by itself
    assert next(endless) == 0
    endless.close()  # returns only once the producer thread has ended


def test_images_kept_in_cpu_memory_for_a_gpu_come_in_page_locked_batches(shapes, monkeypatch):
    from byolcli.data import EpochSampler, MemoryBatches
    from byolcli.engine import fits_on_gpu

    pinned = []
    monkeypatch.setattr(torch.Tensor, "pin_memory", lambda self: pinned.append(self.shape) or self.clone())
    canvases, sizes = torch.arange(16 * 3 * 4 * 4, dtype=torch.uint8).view(16, 3, 4, 4), torch.ones(16, 2)
    sampler = EpochSampler(16, seed=0)
    plain = list(MemoryBatches(canvases, sizes, sampler, 4))
    page_locked = list(MemoryBatches(canvases, sizes, sampler, 4, pin=True))
    assert len(pinned) == 8 and all(torch.equal(a, b) for pair in zip(plain, page_locked) for a, b in zip(*pair))
    monkeypatch.setattr(torch.cuda, "mem_get_info", lambda device=None: (2 * GiB, 80 * GiB))  # others hold most
    assert fits_on_gpu(torch.device("cuda:0"), GiB // 10) and not fits_on_gpu(torch.device("cuda:0"), GiB)


def test_the_probe_runs_the_step_training_runs(monkeypatch):
    from byolcli import augment, plan
    from byolcli.hardware import Hardware
    from byolcli.probe import StepSetting, probe_step
    from byolcli.rules import decoded_bytes

    made, probed = [], []
    real_views = augment.byol_views
    monkeypatch.setattr(augment, "byol_views", lambda *a, **k: made.append(a[0].shape) or real_views(*a, **k))
    cpu = Hardware("cpu", "CPU", 8 * GiB, 8 * GiB, False, 2, "cpu")
    probe_step(cpu, StepSetting("resnet18", 32, 4, "fp32", False, augment_on="device"), steps=1)
    assert made == [(4, 3, 48, 48)] * 2  # warm-up and timed step, both making their views from canvases

    def probe(setting):
        probed.append(setting)
        return 0.5

    gpu = Hardware("cuda", "fake GPU", 80 * GiB, 80 * GiB, True, 16, "cuda:0", 64 * GiB)
    chosen = plan.make_plan([40] * 50_000, 0, gpu, plan.Overrides(), probe)
    assert chosen.in_memory and chosen.augment_on == "device"
    resident = decoded_bytes(50_000, chosen.image_size)
    assert all(
        (s.augment_on, s.resident, s.gradient_buckets) == ("device", resident, False) for s in probed
    )  # views on the GPU, decoded images beside
    probed.clear()
    plan.make_plan([40] * 50_000, 0, gpu, plan.Overrides(), probe, world_size=2)
    assert probed and all(s.gradient_buckets for s in probed)  # and DistributedDataParallel's gradient buckets


def test_running_out_of_memory_mid_run_halves_the_batch_and_continues_from_the_checkpoint(tmp_path, monkeypatch):
    import json

    from byolcli import train as t
    from byolcli.encoder import load_encoder
    from byolcli.plan import Overrides
    from byolcli.report import Reporter

    folder = shapes_folder(tmp_path / "photos", count=16)
    real_views = t.Trainer._views
    seen = []

    def views(self, batch):
        seen.append((self.plan.batch_size, self.step))
        if self.plan.batch_size == 8 and self.step == 3:
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")
        return real_views(self, batch)

    monkeypatch.setattr(t.Trainer, "_views", views)
    warnings = []
    reporter = Reporter(quiet=True)
    reporter.warn = warnings.append
    choices = Overrides(image_size=32, batch_size=8, epochs=4, workers=0, precision="fp32")
    request = t.TrainRequest(folder, choices=choices, out=tmp_path / "run", checkpoint_every=0.0)
    encoder = t.train_folder(request, reporter)

    plan = json.loads((tmp_path / "run" / "plan.json").read_text())
    assert (plan["batch_size"], plan["accumulation"], plan["total_steps"]) == (4, 2, 8)
    assert any(
        "out of memory at a batch of 8: continuing with 4 × 2 accumulated (the same global batch of 8) "
        "from the checkpoint at step 3" in w
        for w in warnings
    )
    assert (4, 3) in seen and load_encoder(encoder).byol_metadata["steps"] == "8"
    steps = [json.loads(line)["step"] for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert steps == sorted(set(steps)) and steps[-1] == 8


def test_synchronised_batch_norm_is_one_implementation_that_keeps_both_views_in_one_pass():
    from byolcli.distributed import SyncedBatchNorm, synchronise_batchnorm
    from byolcli.model import BYOL

    model = BYOL("resnet18")
    reference = {k: v.clone() for k, v in model.state_dict().items()}
    synchronise_batchnorm(model)
    norms = [m for m in model.modules() if isinstance(m, torch.nn.modules.batchnorm._BatchNorm)]
    assert norms and all(type(m) is SyncedBatchNorm for m in norms)
    assert model.joint_pass  # on every device: there is no separate GPU version that needs a pass per view
    assert all(torch.equal(reference[k], v) for k, v in model.state_dict().items())
    assert not any(p.requires_grad for p in model.target_parameters())
