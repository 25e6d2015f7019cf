"""benchmarks/remote_throughput.py runs end to end: local and HTTP rows side by side, every sample delivered."""
from __future__ import annotations

import subprocess
import sys
from pathlib import Path

SCRIPT = Path(__file__).resolve().parents[2] / "benchmarks" / "remote_throughput.py"


def test_script_runs_and_prints_every_row():
    out = subprocess.run([sys.executable, str(SCRIPT), "--n", "24", "--rounds", "1", "--workers", "0",
                          "--batch-size", "8"], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    for row in ("local files", "http 127.0.0.1", "http + cache", "http / local: raw shard reads"):
        assert row in out.stdout
    assert "GET /" not in out.stdout + out.stderr  # the server stays quiet
