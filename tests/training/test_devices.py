"""The CUDA and fp16 paths, checked on the CPU with fakes of torch.cuda's API."""

import contextlib
import sys
from types import SimpleNamespace

import pytest
import torch
from helpers import shapes_folder, tiny_plan
from torch.utils._python_dispatch import TorchDispatchMode

from byolcli.core.errors import TrainingFailed
from byolcli.core.hardware import GiB, detect_hardware
from byolcli.core.inference import autocast_dtype
from byolcli.core.loading import device_precision
from byolcli.training.engine import Trainer

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


class InfiniteGradient(torch.autograd.Function):
    """The identity, whose gradient is infinite: an overflow in the backward pass behind a finite loss."""

    @staticmethod
    def forward(ctx, x):
        return x.clone()

    @staticmethod
    def backward(ctx, grad):
        return grad * float("inf")


def overflowing(trainer: Trainer, steps, where: str = "loss") -> None:
    """Make the given micro-steps (counted from 1) overflow, as fp16 does: in the loss, or only in
    the gradients. The scaler starts low enough that nothing else overflows."""
    real, calls = trainer.byol_step.forward, []
    trainer.byol_step.scaler = torch.amp.GradScaler("cpu", init_scale=2.0**8)

    def forward(view1, view2):
        loss, projections = real(view1, view2)
        calls.append(1)
        if len(calls) in steps:
            loss = loss * float("inf") if where == "loss" else InfiniteGradient.apply(loss)
        return loss, projections

    trainer.byol_step.forward = forward


def test_an_fp16_overflow_is_a_skipped_step_not_the_end_of_the_run(shapes):
    trainer = Trainer(tiny_plan(len(shapes), precision="fp16", total_steps=4), shapes)
    overflowing(trainer, steps={2})
    scale = trainer.byol_step.scaler.get_scale()
    records = []
    trainer.run(4, on_log=records.append, log_every=0)
    assert trainer.step == 4 and [r["overflowed_steps"] for r in records] == [0, 1, 0, 0]
    assert records[1]["loss"] is None and all(r["loss"] > 0 for i, r in enumerate(records) if i != 1)
    assert trainer.byol_step.scaler.get_scale() < scale  # the scaler saw it and backed off


def test_fp16_overflows_that_never_stop_end_the_run(shapes, monkeypatch):
    from byolcli.training import engine

    monkeypatch.setattr(engine, "OVERFLOWS_IN_A_ROW", 3)  # fp16 steps are slow on a CPU: the rule, not its number
    trainer = Trainer(tiny_plan(len(shapes), precision="fp16", total_steps=40), shapes)
    overflowing(trainer, steps=range(1, 100))
    with pytest.raises(TrainingFailed, match="last good checkpoint is kept"):
        trainer.run(40, log_every=0)
    assert trainer.step == 3


def test_fp16_overflows_in_the_gradients_alone_are_counted_and_end_the_run_when_they_never_stop(shapes, monkeypatch):
    from byolcli.training import engine

    trainer = Trainer(tiny_plan(len(shapes), precision="fp16", total_steps=4), shapes)
    overflowing(trainer, steps={2}, where="gradients")
    records = []
    trainer.run(4, on_log=records.append, log_every=0)
    assert [r["overflowed_steps"] for r in records] == [0, 1, 0, 0]
    assert all(r["loss"] > 0 for r in records)  # the loss stayed finite throughout

    monkeypatch.setattr(engine, "OVERFLOWS_IN_A_ROW", 3)
    trainer = Trainer(tiny_plan(len(shapes), precision="fp16", total_steps=40), shapes)
    overflowing(trainer, steps=range(1, 100), where="gradients")
    with pytest.raises(TrainingFailed, match="fp16 overflowed .* in the last 3 steps up to step 3"):
        trainer.run(40, log_every=0)


def test_the_probe_treats_library_allocation_failures_as_out_of_memory_and_frees_before_retrying(monkeypatch):
    import weakref

    from byolcli.core.hardware import Hardware
    from byolcli.training import probe
    from byolcli.training.byol import BYOL

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
    from byolcli.core.hardware import use_device

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
    from byolcli.core import hardware

    monkeypatch.setattr(hardware.os, "sched_getaffinity", lambda pid: {0, 1, 2, 3, 4, 5}, raising=False)
    monkeypatch.setattr(hardware, "CGROUP", tmp_path)
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    assert hardware.usable_cores() == 6  # no quota file: the affinity
    (tmp_path / "cpu").mkdir()
    (tmp_path / "cpu" / "cpu.cfs_quota_us").write_text("-1\n")  # cgroup v1, no quota
    (tmp_path / "cpu" / "cpu.cfs_period_us").write_text("100000\n")
    assert hardware.usable_cores() == 6
    (tmp_path / "cpu" / "cpu.cfs_quota_us").write_text("150000\n")  # v1: 1.5 cores
    assert hardware.usable_cores() == 2
    (tmp_path / "cpu.max").write_text("max 100000\n")  # v2 says what it says, v1 files or not
    assert hardware.usable_cores() == 6
    (tmp_path / "cpu.max").write_text("250000 100000\n")  # a quota of 2.5 cores
    assert hardware.usable_cores() == 3
    monkeypatch.setenv("OMP_NUM_THREADS", "2")  # the share a scheduler or the user gave this process
    assert hardware.usable_cores() == 2
    monkeypatch.setenv("OMP_NUM_THREADS", "")
    assert hardware.usable_cores() == 3


def test_memory_is_the_containers_limit_not_the_machines(monkeypatch, tmp_path):
    from byolcli.core import hardware

    machine = 2048 * GiB
    monkeypatch.setattr(
        hardware.os, "sysconf", lambda name: {"SC_PAGE_SIZE": 4096, "SC_PHYS_PAGES": machine // 4096}[name]
    )
    monkeypatch.setattr(hardware, "CGROUP", tmp_path)
    assert hardware.system_memory() == machine  # no container limit
    (tmp_path / "memory").mkdir()
    (tmp_path / "memory" / "memory.limit_in_bytes").write_text(f"{2**63 - 4096}\n")  # cgroup v1, unlimited
    assert hardware.system_memory() == machine
    (tmp_path / "memory" / "memory.limit_in_bytes").write_text(f"{100 * GiB}\n")
    assert hardware.system_memory() == 100 * GiB
    (tmp_path / "memory.max").write_text(f"{200 * GiB}\n")  # cgroup v2
    assert hardware.system_memory() == detect_hardware("cpu").ram == 200 * GiB
    (tmp_path / "memory.max").write_text("max\n")
    assert hardware.system_memory() == machine


class OnMPS(torch.Tensor):
    """A CPU tensor standing in for an MPS one: torch's MPS backend (up to at least 2.5) has no SVD,
    and MPS has no float64 at all."""

    @classmethod
    def __torch_function__(cls, func, types, args=(), kwargs=None):
        if func is torch.linalg.svdvals:
            raise NotImplementedError("The operator 'aten::_linalg_svd.U' is not currently implemented for MPS")
        if func is torch.Tensor.double:
            raise TypeError("Cannot convert a MPS Tensor to float64 dtype as the MPS framework doesn't support float64")
        if func is torch.Tensor.cpu:
            return args[0].as_subclass(torch.Tensor).clone()
        return super().__torch_function__(func, types, args, kwargs or {})


def test_the_collapse_monitor_runs_where_the_device_has_no_svd():
    from byolcli.training.engine import projection_health

    projections = torch.randn(64, 256)
    assert projection_health(projections.as_subclass(OnMPS)) == pytest.approx(projection_health(projections))


def test_fp32_never_enters_autocast(shapes, monkeypatch):
    """torch 2.4 raises on torch.autocast("mps", enabled=False): fp32 must not call it at all."""
    from byolcli.core import inference
    from byolcli.core.hardware import Hardware
    from byolcli.training.probe import StepSetting, probe_step

    entered = []

    def recording_autocast(device_type, dtype=None, enabled=True, **kwargs):
        entered.append((device_type, dtype, enabled))
        return contextlib.nullcontext()

    monkeypatch.setattr(torch, "autocast", recording_autocast)
    trainer = Trainer(tiny_plan(len(shapes), total_steps=1), shapes)
    trainer.run(1)
    cpu = Hardware("cpu", "CPU", 8 * GiB, 8 * GiB, False, 2, "cpu")
    probe_step(cpu, StepSetting("resnet18", 32, 4, "fp32", False), steps=1)
    encoder = trainer.model.online_encoder
    encoder.byol_metadata = {"image_size": 32, "mean": (0.5,) * 3, "std": (0.25,) * 3}
    rows = list(inference.iter_embeddings(shapes[:2], encoder.eval(), torch.device("cpu"), workers=0, precision="fp32"))
    assert rows[0][1].shape == (2, 512) and entered == []
    list(inference.iter_embeddings(shapes[:1], encoder, torch.device("cpu"), workers=0, precision="bf16"))
    assert entered == [("cpu", torch.bfloat16, True)]  # where a precision asks for autocast, it is entered


def test_the_probe_counts_what_the_allocator_reserved_and_what_mps_holds(monkeypatch):
    from byolcli.core.hardware import memory_held

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
    from byolcli.core import small_maps
    from byolcli.core.pixels import constant
    from byolcli.training.augment import byol_views
    from byolcli.training.byol import BYOL
    from byolcli.training.optim import LARS, lars_groups

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

    from byolcli.training.data import prefetched

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
    from byolcli.training.data import EpochSampler, MemoryBatches
    from byolcli.training.engine import fits_on_gpu

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
    from byolcli.core.hardware import Hardware
    from byolcli.training import augment, plan
    from byolcli.training.probe import StepSetting, probe_step
    from byolcli.training.rules import decoded_bytes

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

    from byolcli.core.encoder import load_encoder
    from byolcli.core.terminal import Reporter
    from byolcli.training import train as t
    from byolcli.training.plan import Overrides

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
    from byolcli.training.byol import BYOL
    from byolcli.training.distributed import SyncedBatchNorm, synchronise_batchnorm

    model = BYOL("resnet18")
    reference = {k: v.clone() for k, v in model.state_dict().items()}
    synchronise_batchnorm(model)
    norms = [m for m in model.modules() if isinstance(m, torch.nn.modules.batchnorm._BatchNorm)]
    assert norms and all(type(m) is SyncedBatchNorm for m in norms)
    assert model.joint_pass  # on every device: there is no separate GPU version that needs a pass per view
    assert all(torch.equal(reference[k], v) for k, v in model.state_dict().items())
    assert not any(p.requires_grad for p in model.target_parameters())


def test_copies_to_a_device_wait_unless_they_go_from_page_locked_memory_to_cuda(shapes):
    """MPS does not wait for a non-blocking copy from ordinary memory: its source may be freed first."""
    from torch.overrides import TorchFunctionMode

    from byolcli.core import inference
    from byolcli.core.hardware import to_device

    class Copy:
        def __init__(self, pinned: bool) -> None:
            self.pinned, self.non_blocking = pinned, None

        def is_pinned(self) -> bool:
            return self.pinned

        def to(self, device, non_blocking=False):
            self.non_blocking = non_blocking
            return self

    expected = {("mps", False): False, ("mps", True): False, ("cuda", False): False, ("cuda", True): True}
    for (device, pinned), waits_not in expected.items():
        assert to_device(Copy(pinned), torch.device(device)).non_blocking is waits_not

    class UnwaitedCopies(TorchFunctionMode):
        def __init__(self) -> None:
            super().__init__()
            self.unpinned = []

        def __torch_function__(self, func, types, args=(), kwargs=None):
            kwargs = kwargs or {}
            # byolcli's copies, told by the calling module's name (torchvision makes CPU-to-CPU ones)
            caller = sys._getframe(1).f_globals.get("__name__", "")
            if func is torch.Tensor.to and kwargs.get("non_blocking") and not args[0].is_pinned():
                if caller.startswith("byolcli."):
                    self.unpinned.append(args[0].shape)
            return func(*args, **kwargs)

    trainer = Trainer(tiny_plan(len(shapes), total_steps=1), shapes)
    encoder = trainer.model.online_encoder.eval()
    encoder.byol_metadata = {"image_size": 32, "mean": (0.5,) * 3, "std": (0.25,) * 3}
    with UnwaitedCopies() as copies:
        trainer.run(1)
        list(inference.iter_embeddings(shapes[:4], encoder, torch.device("cpu"), workers=0))
    assert copies.unpinned == []


def test_embedding_fits_its_loader_processes_to_dev_shm(shapes, monkeypatch):
    from byolcli.core import hardware, inference

    made = []
    monkeypatch.setattr(inference, "DataLoader", lambda *a, **k: made.append(k["num_workers"]) or [])
    monkeypatch.setattr(hardware, "usable_cores", lambda: 8)  # 4 loader processes on a CPU by default
    encoder = BYOLEncoder()
    for free in (GiB, 2 * 2**20, 8 * 2**20, 0):  # 0: unknown, as where /dev/shm cannot be read
        monkeypatch.setattr(hardware, "free_shared_memory", lambda free=free: free)
        list(inference.iter_embeddings(shapes[:2], encoder, torch.device("cpu"), batch_size=256))
    # Each process holds 4 batches of 256 images of 32 px (3 MiB): 4 fit in 1 GiB, none in 2 MiB.
    assert made == [4, 0, 2, 4]


def BYOLEncoder():
    from byolcli.training.byol import BYOL

    encoder = BYOL("resnet18").online_encoder.eval()
    encoder.byol_metadata = {"image_size": 32, "mean": (0.5,) * 3, "std": (0.25,) * 3}
    return encoder


def test_synchronised_batch_norm_keeps_only_what_its_backward_needs_and_computes_as_per_view_batch_norm(monkeypatch):
    from torch.autograd.graph import saved_tensors_hooks

    from byolcli.core.backbones import PerViewBatchNorm2d
    from byolcli.training.distributed import SyncedBatchNorm

    torch.manual_seed(0)
    single = PerViewBatchNorm2d(8)
    single.weight.data.uniform_(0.5, 1.5), single.bias.data.normal_()
    synced = SyncedBatchNorm(8)
    synced.load_state_dict(single.state_dict())
    x = torch.randn(6, 8, 5, 5) * 3 + 1
    outputs, grads = [], []
    for norm in (single, synced):  # one process: the sums have nowhere to go
        xi = x.clone().requires_grad_()
        out = norm(xi)
        (out * torch.linspace(-1, 1, out.numel()).view_as(out)).sum().backward()
        outputs.append(out.detach())
        grads.append([xi.grad, norm.weight.grad, norm.bias.grad])
    assert torch.allclose(*outputs, atol=1e-5)
    assert all(torch.allclose(a, b, atol=1e-5) for a, b in zip(*grads))
    assert torch.allclose(single.running_var, synced.running_var) and synced.num_batches_tracked == 2

    # With two processes (faked: the other contributes nothing), under bf16 autocast as on a GPU.
    import torch.distributed as dist

    monkeypatch.setattr(dist, "is_initialized", lambda: True)
    monkeypatch.setattr(dist, "get_world_size", lambda group=None: 2)
    monkeypatch.setattr(dist, "all_reduce", lambda tensor, *args, **kwargs: None)
    activations = torch.randn(16, 64, 8, 8).bfloat16().requires_grad_()
    saved = []
    with saved_tensors_hooks(lambda t: saved.append(t.numel() * t.element_size()) or t, lambda t: t):
        with torch.autocast("cpu", dtype=torch.bfloat16):
            SyncedBatchNorm(64)(activations)
    assert sum(saved) < 1.1 * activations.numel() * activations.element_size()  # the input, and per-channel numbers


def test_the_probe_runs_synchronised_batch_norm_where_training_will(monkeypatch):
    from byolcli.core.hardware import Hardware
    from byolcli.training import distributed, plan
    from byolcli.training.probe import OutOfMemory, StepSetting, probe_step

    calls = []
    real = distributed._SyncedNorm.apply
    monkeypatch.setattr(distributed._SyncedNorm, "apply", lambda *args: calls.append(1) or real(*args))
    cpu = Hardware("cpu", "CPU", 8 * GiB, 8 * GiB, False, 2, "cpu")
    probe_step(cpu, StepSetting("resnet18", 32, 4, "fp32", False, sync_batchnorm=True), steps=1)
    assert calls  # the synchronised module, in the probe's one process

    probed = []

    def probe(setting: StepSetting) -> float:  # a GPU that fits 64 images
        probed.append(setting)
        if setting.batch > 64:
            raise OutOfMemory(f"batch {setting.batch}")
        return 0.5

    gpu = Hardware("cuda", "fake GPU", 80 * GiB, 80 * GiB, True, 16, "cuda:0", 64 * GiB)
    for world_size in (1, 2):
        probed.clear()
        chosen = plan.make_plan([40] * 50_000, 0, gpu, plan.Overrides(), probe, world_size=world_size)
        assert chosen.batch_size == 64 and chosen.sync_batchnorm == (world_size > 1)
        assert all(s.sync_batchnorm == (world_size > 1 and s.batch < 128) for s in probed)
    assert {s.batch for s in probed if s.sync_batchnorm} == {64} and any(s.batch > 64 for s in probed)


def test_only_allocation_failures_count_as_out_of_memory():
    from byolcli.core.hardware import is_out_of_memory

    assert is_out_of_memory(torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB"))
    assert is_out_of_memory(RuntimeError("cuDNN error: CUDNN_STATUS_INTERNAL_ERROR"))  # its kernels did not fit
    assert not is_out_of_memory(RuntimeError("cuDNN error: CUDNN_STATUS_EXECUTION_FAILED"))
    assert not is_out_of_memory(RuntimeError("CUDA error: an illegal memory access was encountered"))


def test_the_effective_rank_runs_where_the_device_has_no_float64():
    from byolcli.evaluation.label_free import effective_rank

    matrix = torch.randn(64, 16)
    assert effective_rank(matrix.as_subclass(OnMPS)) == pytest.approx(effective_rank(matrix))


def test_resuming_a_bf16_run_on_a_gpu_that_only_emulates_it_says_so(fake_cuda, tmp_path):
    import json

    from byolcli.training import train
    from byolcli.training.plan import Overrides

    warned = []
    reporter = SimpleNamespace(info=lambda text: None, warn=warned.append)
    (tmp_path / "images.txt").write_text("a.png\n")
    for device, precision in (("cuda:0", "bf16"), ("cuda:1", "fp16"), ("cuda:1", "bf16")):  # A100, T4, T4
        plan = tiny_plan(16, device=device, precision=precision)
        state = {"plan": json.loads(json.dumps(plan.to_dict())), "step": 1}
        train._resume(state, tmp_path, tmp_path, Overrides(), reporter, train.World())
    assert len(warned) == 1 and "bf16, which Tesla T4 only emulates" in warned[0]


def out_of_memory_at(monkeypatch, failing) -> list:
    """Make training run out of memory at every step where `failing(batch size, step)`; returns
    the (batch size, step) of every step begun."""
    from byolcli.training import train

    real_views, seen = train.Trainer._views, []

    def views(self, batch):
        seen.append((self.plan.batch_size, self.step))
        if failing(self.plan.batch_size, self.step):
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")
        return real_views(self, batch)

    monkeypatch.setattr(train.Trainer, "_views", views)
    return seen


def test_halving_stops_where_batch_norm_needs_two_images_and_at_an_odd_batch(tmp_path, monkeypatch):
    from byolcli.core.terminal import Reporter
    from byolcli.training import train
    from byolcli.training.plan import Overrides

    folder = shapes_folder(tmp_path / "photos", count=16)
    seen = out_of_memory_at(monkeypatch, lambda batch, step: True)
    for batch, last, why in ((2, 2, "batch norm needs at least 2 images"), (10, 5, "an odd batch cannot be halved")):
        choices = Overrides(image_size=32, batch_size=batch, epochs=1, workers=0, precision="fp32")
        request = train.TrainRequest(folder, choices=choices, out=tmp_path / f"run{batch}", restart=True)
        with pytest.raises(TrainingFailed, match=f"out of memory at a batch of {last} per device, and {why}"):
            train.train_folder(request, Reporter(quiet=True))
    assert [batch for batch, _ in seen] == [2, 10, 5]


def test_halving_under_a_time_budget_replans_the_rest_of_the_run_from_the_new_speed(tmp_path, monkeypatch):
    from byolcli.core.terminal import Reporter
    from byolcli.training import train
    from byolcli.training.plan import Overrides

    monkeypatch.setattr(train, "CALIBRATION", (1, 2))
    replans = []
    real_refit = train.refit_to_budget

    def refit(plan, steps_done, seconds_left, step_seconds):
        replans.append((steps_done, seconds_left, plan.batch_size))
        real_refit(plan, steps_done, 10 * step_seconds, step_seconds)  # 10 more steps, whatever this CPU's speed
        plan.step_seconds = 100.0  # as if each step took 100 s: the 3 before the halving spent 300 of the budget

    monkeypatch.setattr(train, "refit_to_budget", refit)
    out_of_memory_at(monkeypatch, lambda batch, step: batch == 8 and step == 3)
    folder = shapes_folder(tmp_path / "photos", count=16)
    choices = Overrides(image_size=32, batch_size=8, time_budget=3600, workers=0, precision="fp32")
    request = train.TrainRequest(folder, choices=choices, out=tmp_path / "run", checkpoint_every=0.0)
    train.train_folder(request, Reporter(quiet=True))
    # Calibrated from step 0, then again from the checkpoint at step 3, with the time already spent counted.
    assert [(steps, batch) for steps, _, batch in replans] == [(2, 8), (5, 4)]
    assert 290 < replans[0][1] - replans[1][1] < 320  # 300 s spent, and the calibrations' own seconds
