"""Shared fixtures: the lecture file comes from WIDEDEEP_DATA (set by .ci/run); no downloads."""

import os
from pathlib import Path

import pytest


@pytest.fixture(autouse=True)
def _no_download(monkeypatch, tmp_path_factory):
    """Tests never reach the network, and never touch the user's real cache."""
    import widedeep.data

    def refuse(url, dest):
        raise OSError("network disabled in tests")

    monkeypatch.setattr(widedeep.data, "_download", refuse)
    monkeypatch.setenv("WIDEDEEP_CACHE", str(tmp_path_factory.mktemp("cache")))


@pytest.fixture
def diabetes_dir() -> Path:
    folder = os.environ.get("WIDEDEEP_DATA")
    if not folder or not (Path(folder) / "diabetes.csv.gz").exists():
        pytest.skip("the lecture file is not available: set WIDEDEEP_DATA to its folder")
    return Path(folder)
