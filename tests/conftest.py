"""Fixtures every test gets."""

import pytest


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
