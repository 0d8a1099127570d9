"""Locust against a real server, in subprocesses (Locust monkey-patches with gevent, so it never
runs inside pytest): a short smoke in the default run, the full soak with `-m slow`.

`python -m benchmarks.soak` does the work and the checks: no failures other than deliberate
429s, every request sent answered, the server's counters agree with the client's, exit 0
after SIGTERM.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

ROOT = Path(__file__).resolve().parents[1]


def run_soak(tmp_path: Path, *args: str, timeout_s: float) -> dict[str, Any]:
    out = tmp_path / "soak.json"
    cmd = [sys.executable, "-m", "benchmarks.soak", "--out", str(out),
           "--workdir", str(tmp_path / "logs"), *args]
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=timeout_s,
                          check=False)
    print(proc.stdout)  # the report, shown by pytest -s / on failure
    assert proc.returncode == 0, proc.stdout + proc.stderr
    report: dict[str, Any] = json.loads(out.read_text())
    return report


def check_saturated(report: dict[str, Any]) -> None:
    assert report["ok"] and report["problems"] == []
    assert report["failures"] == 0 and report["failure_kinds"] == {}
    assert report["answered"] == report["sent"] > 0
    assert report["ok_200"] + report["rejected_429"] == report["sent"]
    assert report["rejected_429"] > 0  # it really ran at saturation: backpressure engaged
    assert report["server_exit_code"] == 0
    assert report["rss_mib"]["end"] > 0


def test_soak_smoke(tmp_path: Path) -> None:
    """~8 s at saturation: 48 users against 8 in flight + 32 queued."""
    report = run_soak(tmp_path, "--duration-s", "8", "--users", "48", timeout_s=240)
    check_saturated(report)


@pytest.mark.slow
def test_soak_full(tmp_path: Path, request: pytest.FixtureRequest) -> None:
    """Minutes at saturation (BATCHSERVE_SOAK_S, default 180); memory must stay flat."""
    if "slow" not in (request.config.getoption("markexpr") or "") and not os.environ.get(
        "BATCHSERVE_SOAK"
    ):
        pytest.skip("the full soak runs with `-m slow` or BATCHSERVE_SOAK=1")
    duration = os.environ.get("BATCHSERVE_SOAK_S", "180")
    report = run_soak(tmp_path, "--duration-s", duration, "--users", "64",
                      "--max-rss-growth-mib", "50", timeout_s=float(duration) + 600)
    check_saturated(report)
