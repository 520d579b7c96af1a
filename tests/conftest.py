"""Fixtures every test gets, and the threads each test process computes with."""

import os

import pytest

# Several test processes (pytest -n) share the cores: each computes on its share of them, and so do
# the processes its tests start, instead of every process running one thread per core.
if workers := int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "0")):
    threads = max(1, len(os.sched_getaffinity(0)) // workers) if hasattr(os, "sched_getaffinity") else 1
    os.environ["OMP_NUM_THREADS"] = str(threads)
    import torch

    torch.set_num_threads(threads)


@pytest.fixture(autouse=True)
def _isolated_cache(tmp_path_factory, monkeypatch):
    """Each test gets its own scan cache, never the user's."""
    monkeypatch.setenv("BYOL_CACHE_DIR", str(tmp_path_factory.mktemp("cache")))


@pytest.fixture(autouse=True)
def _offline_torch_cache(tmp_path_factory, monkeypatch):
    """Each test gets its own empty torch cache and no downloads: ImageNet weights are there only
    where a test puts them, so `--init auto` starts from random weights unless a test says otherwise."""
    import torch.hub

    def offline(url, *args, **kwargs):
        raise OSError(f"offline in tests: {url}")

    monkeypatch.setenv("TORCH_HOME", str(tmp_path_factory.mktemp("torch")))
    monkeypatch.setattr(torch.hub, "load_state_dict_from_url", offline)
