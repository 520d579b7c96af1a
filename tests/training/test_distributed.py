"""Data-parallel training on 2 CPU processes with the gloo backend, as torchrun runs it."""

import json
import os
import signal
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from helpers import REPO, run_byol, shapes_folder, tiny_plan, wait_for_file, wait_until
from safetensors.torch import load_file

from byolcli.core.errors import UserError
from byolcli.training.data import EpochSampler
from byolcli.training.engine import Trainer
from byolcli.training.plan import fit_to_world

STEPS = 5
# Random weights said outright: the launched processes would otherwise look for ImageNet's.
CLI_ARGS = ("--image-size", "32", "--batch-size", "4", "--workers", "0", "--precision", "fp32", "--init", "random")


def torchrun(*args, cwd, timeout=300):
    return subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node=2", *map(str, args)],
        cwd=cwd,
        capture_output=True,
        text=True,
        timeout=timeout,
    )


@pytest.fixture(scope="module")
def photos(tmp_path_factory):
    return shapes_folder(tmp_path_factory.mktemp("dist") / "photos", count=32)


@pytest.fixture(scope="module")
def two_ranks(photos):
    """Both ranks' record of STEPS steps at 4 images per rank (global batch 8), batch norm synchronised."""
    out = photos.parent / "ranks"
    out.mkdir()
    plan = tiny_plan(32, batch_size=4, world_size=2, sync_batchnorm=True, total_steps=20)
    (out / "plan.json").write_text(json.dumps(plan.to_dict()))
    result = torchrun(Path(__file__).parent / "distributed_worker.py", out / "plan.json", photos, out, STEPS, cwd=out)
    assert result.returncode == 0, result.stderr[-3000:]
    return [torch.load(out / f"rank{r}.pt", weights_only=True) for r in (0, 1)]


def test_ranks_see_disjoint_shards_that_make_up_each_global_batch(two_ranks):
    first, second = ([tuple(key) for key in rank["seen"]] for rank in two_ranks)
    assert len(first) == len(second) == STEPS * 4
    assert not set(first) & set(second)
    for step in range(STEPS):
        batch = set(first[step * 4 : (step + 1) * 4]) | set(second[step * 4 : (step + 1) * 4])
        epoch, offset = divmod(step, 4)
        sampler = EpochSampler(32, seed=0)  # one process's order
        sampler.set_position(epoch)
        order = list(iter(sampler))
        assert batch == set(order[offset * 8 : (offset + 1) * 8])


def test_weights_stay_identical_across_ranks(two_ranks):
    first, second = (rank["state"] for rank in two_ranks)
    assert first.keys() == second.keys()
    for name in first:
        assert torch.equal(first[name], second[name]), name
    assert two_ranks[0]["losses"] == two_ranks[1]["losses"]  # the loss is averaged over ranks


def test_two_processes_match_one_process_with_the_same_global_batch(two_ranks, photos):
    single = Trainer(tiny_plan(32, batch_size=8, total_steps=20), sorted(photos.iterdir()))
    losses = []
    single.run(STEPS, on_log=lambda record: losses.append(record["loss"]), log_every=0)
    distributed = two_ranks[0]["losses"]
    assert len(distributed) == len(losses) == STEPS
    # Same images, same augmentations, batch norm over the same 8 images: the same
    # numbers up to summation order (unsynchronised batch norm is off by > 0.01).
    assert max(abs(a - b) for a, b in zip(distributed, losses)) < 2e-3, (distributed, losses)


def test_torchrun_cli_writes_one_set_of_files_and_exports_rank_zeros_encoder(photos, tmp_path):
    result = torchrun(
        "-m", "byolcli", "train", photos, "--epochs", "2", "--out", tmp_path / "run", *CLI_ARGS, cwd=tmp_path
    )
    assert result.returncode == 0, result.stderr[-3000:]
    run = tmp_path / "run"
    assert sorted(p.name for p in run.iterdir()) == [
        ".lock",
        "checkpoint.pt",
        "encoder.safetensors",
        "images.txt",
        "metrics.jsonl",
        "plan.json",
        "report.html",
        "report.json",
    ]
    assert result.stderr.count("training plan") == 1 and result.stderr.count("encoder written") == 1
    plan = json.loads((run / "plan.json").read_text())
    assert (plan["world_size"], plan["batch_size"], plan["sync_batchnorm"]) == (2, 4, True)
    assert plan["steps_per_epoch"] == 4  # 32 images / global batch 8
    steps = [json.loads(line)["step"] for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert steps == sorted(set(steps)) and steps[-1] == 8  # one writer
    online = torch.load(run / "checkpoint.pt", weights_only=True)["model"]
    exported = load_file(run / "encoder.safetensors")
    assert exported.keys() == {k.removeprefix("online_encoder.") for k in online if k.startswith("online_encoder.")}
    for name, tensor in exported.items():
        assert torch.equal(tensor, online[f"online_encoder.{name}"]), name
    assert sorted(p.name for p in photos.iterdir()) == [f"{i:03d}.png" for i in range(32)]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_two_ranks(photos, run, epochs: int, checkpoint_every: str = "0.01") -> list[subprocess.Popen]:
    """The two ranks of a CLI run, started by hand, without torchrun's agent (which would
    act on a rank's death or a signal itself)."""
    env = dict(
        os.environ,
        MASTER_ADDR="127.0.0.1",
        MASTER_PORT=str(free_port()),
        WORLD_SIZE="2",
        LOCAL_WORLD_SIZE="2",
        BYOL_DIST_TIMEOUT="60",
    )
    command = [
        sys.executable,
        "-m",
        "byolcli",
        "-q",
        "train",
        str(photos),
        "--epochs",
        str(epochs),
        "--out",
        str(run),
        *CLI_ARGS,
        "--checkpoint-every",
        checkpoint_every,
    ]
    ranks = [
        subprocess.Popen(
            command,
            cwd=run.parent,
            env=dict(env, RANK=str(r), LOCAL_RANK=str(r)),
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for r in (0, 1)
    ]
    checkpoint = run / "checkpoint.pt"
    wait_for_file(ranks[0], checkpoint)  # step 0's, saved before training
    first = checkpoint.stat().st_ino  # each save is a new file, renamed over the last
    wait_until(ranks[0], lambda: checkpoint.stat().st_ino != first, "no checkpoint after step 0")
    return ranks


def test_a_dead_rank_ends_the_run_with_an_error_and_it_resumes_on_one_process(photos, tmp_path):
    run = tmp_path / "run"
    ranks = start_two_ranks(photos, run, epochs=8)  # the survivor must notice the death on its own
    ranks[1].send_signal(signal.SIGKILL)
    _, stderr = ranks[0].communicate(timeout=90)  # well within the collective timeout
    ranks[1].communicate()
    assert ranks[0].returncode == 1, stderr
    assert "training failed: rank 0 lost contact with the other processes" in stderr
    assert "Traceback" not in stderr and not (run / "encoder.safetensors").exists()
    saved = torch.load(run / "checkpoint.pt", weights_only=True)["step"]
    assert 0 < saved < 32

    resumed = run_byol("train", photos, "--epochs", "8", "--out", run, *CLI_ARGS, cwd=tmp_path)
    assert resumed.returncode == 0, resumed.stderr
    assert f"from step {saved} of 32" in resumed.stderr
    assert "continues on 1: 4 per device × 2 accumulated × 1 = the same global batch of 8" in resumed.stderr
    assert torch.load(run / "checkpoint.pt", weights_only=True)["step"] == 32
    assert (run / "encoder.safetensors").exists()


def test_sigterm_to_one_rank_stops_every_rank_at_the_same_step_with_a_checkpoint(photos, tmp_path):
    run = tmp_path / "run"
    ranks = start_two_ranks(photos, run, epochs=400, checkpoint_every="1s")  # the ranks meet every ~10 s of steps
    ranks[1].send_signal(signal.SIGTERM)
    outputs = [rank.communicate(timeout=90)[1] for rank in ranks]  # a rank left waiting would time out
    assert [rank.returncode for rank in ranks] == [143, 143], outputs
    assert not any("Traceback" in text or "lost contact" in text for text in outputs), outputs
    saved = torch.load(run / "checkpoint.pt", weights_only=True)["step"]
    assert 0 < saved < 1600 and json.loads((run / "metrics.jsonl").read_text().splitlines()[-1])["step"] == saved


def test_a_saved_plan_fits_any_number_of_processes_that_divides_its_global_batch():
    plan = tiny_plan(1024, batch_size=64, accumulation=1, world_size=3)  # global 192
    assert fit_to_world(plan, 3) is None
    message = fit_to_world(plan, 2)
    assert (plan.batch_size, plan.accumulation, plan.effective_batch) == (48, 2, 192) and "192" in message
    fit_to_world(plan, 1)
    assert (plan.batch_size, plan.accumulation, plan.effective_batch) == (48, 4, 192) and not plan.sync_batchnorm
    fit_to_world(plan, 4)
    assert (plan.batch_size, plan.accumulation, plan.sync_batchnorm) == (48, 1, True)
    with pytest.raises(UserError, match="cannot be split evenly over 5 processes"):
        fit_to_world(plan, 5)


def test_gpus_flag_is_refused_clearly_without_cuda_or_under_a_launcher(photos, tmp_path):
    if torch.cuda.is_available():
        pytest.skip("this machine has CUDA GPUs")
    result = run_byol("train", photos, "--gpus", "2", cwd=tmp_path)
    assert result.returncode == 2 and result.stderr.strip() == "error: --gpus 2: no CUDA GPU is available here"
    result = run_byol("train", photos, "--gpus", "all", cwd=tmp_path, env_extra={"WORLD_SIZE": "2", "RANK": "0"})
    assert result.returncode == 2 and "started by a launcher (torchrun) already" in result.stderr
    assert not Path(tmp_path / "byol-runs").exists()


def test_the_gpus_launcher_passes_on_rank_zeros_error_once(tmp_path):
    # `--gpus N` runs this launcher; here on CPU processes, since CI has no GPU.
    launch = (
        "import sys; from byolcli.training.distributed import launch_local; sys.exit(launch_local(2, sys.argv[1:]))"
    )
    result = subprocess.run(
        [sys.executable, "-c", launch, "train", str(tmp_path / "missing")],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 2
    assert result.stderr.strip() == f"error: {tmp_path / 'missing'}: no such folder"


# Run at the start of every process the test's launcher starts: rank 1 runs out of memory at step 2.
OUT_OF_MEMORY_ON_RANK_1 = """
import os
if os.environ.get("RANK") == "1":
    import torch
    from byolcli.training import engine
    real_views = engine.Trainer._views
    def views(self, batch):
        if self.plan.batch_size == 4 and self.step == 2:
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")
        return real_views(self, batch)
    engine.Trainer._views = views
"""


def test_a_rank_out_of_memory_makes_every_rank_continue_at_half_the_batch(photos, tmp_path):
    hook, run = tmp_path / "hook", tmp_path / "run"
    hook.mkdir()
    (hook / "sitecustomize.py").write_text(OUT_OF_MEMORY_ON_RANK_1)
    launch = (
        "import sys; from byolcli.training.distributed import launch_local; sys.exit(launch_local(2, sys.argv[1:]))"
    )
    result = subprocess.run(
        [sys.executable, "-c", launch, "train", photos, "--epochs", "1", "--out", run, *CLI_ARGS],
        cwd=tmp_path,
        env=dict(os.environ, PYTHONPATH=os.pathsep.join([str(hook), str(REPO)])),
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert "out of memory: rank 1: at a batch of 4 per device" in result.stderr
    assert "continuing with 2 × 2 accumulated (the same global batch of 8)" in result.stderr
    plan = json.loads((run / "plan.json").read_text())
    assert (plan["batch_size"], plan["accumulation"], plan["world_size"]) == (2, 2, 2)
    assert torch.load(run / "checkpoint.pt", weights_only=True)["step"] == plan["total_steps"] == 4
    assert (run / "encoder.safetensors").exists() and not (run / "out-of-memory.json").exists()


def test_losing_a_peer_that_ran_out_of_memory_ends_this_process_as_out_of_memory_too(tmp_path, monkeypatch):
    """Whichever process the launcher sees end first, the code it ends with says: start again, halved."""
    from byolcli.core.errors import OutOfMemoryAcrossRanks, PeerLost
    from byolcli.core.terminal import Reporter
    from byolcli.training import train

    def lost(*args):
        raise PeerLost("rank 0 lost contact with the other processes")

    monkeypatch.setattr(train, "_train_folder", lost)
    request = train.TrainRequest(tmp_path / "photos", out=tmp_path / "run")
    with pytest.raises(PeerLost):  # a peer that died of something else
        train.train_folder(request, Reporter(quiet=True))
    (tmp_path / "run").mkdir()
    (tmp_path / "run" / train.OUT_OF_MEMORY).write_text('{"batch_size": 4}')
    with pytest.raises(OutOfMemoryAcrossRanks):
        train.train_folder(request, Reporter(quiet=True))
