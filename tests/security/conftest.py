"""Fixtures of the security tests: files that run code when opened the unsafe way, and a tiny run to hide them in."""
from __future__ import annotations

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "training"))  # training_helpers: the tiny config


@pytest.fixture
def marker(tmp_path) -> Path:
    """The file a payload creates when it runs: its absence is what the tests check."""
    return tmp_path / "PAYLOAD-RAN"
