"""Shared fixtures: the project root on sys.path and Determined's local storage in tmp."""

import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))


@pytest.fixture
def local_storage(tmp_path, monkeypatch):
    """Point Determined's local checkpoint storage at a temporary folder and return it."""
    monkeypatch.setenv("XDG_DATA_HOME", str(tmp_path / "xdg"))
    return tmp_path / "xdg" / "determined"
