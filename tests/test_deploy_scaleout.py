"""A smoke run of `python -m benchmarks.scaleout --quick` (Locust in a subprocess, never in
pytest): 1 and 2 `--model sim` replicas behind a real nginx for a few seconds each, one
`--role api` and one `--role worker` on a real Redis, then a rolling restart of both replicas
under load. What it must show is not a speed (benchmarks measure that)
but behaviour: the load reaches every replica, and restarting every replica while clients send
requests costs the clients nothing.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

from conftest import require_tool

ROOT = Path(__file__).resolve().parents[1]


def test_quick_scaleout_spreads_load_and_restarts_without_failures(tmp_path: Path) -> None:
    require_tool("nginx")
    require_tool("redis-server")
    result = subprocess.run(
        [sys.executable, "-m", "benchmarks.scaleout", "--quick", "--workers", "1",
         "--out", str(tmp_path)],
        cwd=ROOT, capture_output=True, text=True, timeout=240, check=False)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    results = json.loads((tmp_path / "scaleout-quick.json").read_text())

    points = {p["replicas"]: p for p in results["points"]}
    assert sorted(points) == [1, 2]
    for n, point in points.items():
        assert point["failures"] == 0 and point["measured"] > 0
        assert len(point["spread"]) == n, point["spread"]  # every replica answered some
        assert point["efficiency"] is not None
    (workers,) = results["workers"]  # async jobs: an api and one worker on Redis
    assert workers["workers"] == 1 and workers["failures"] == 0 and workers["measured"] > 0
    restart = results["rolling_restart"]
    assert [r["exit_code"] for r in restart["restarts"]] == [0, 0]  # drained, then exited 0
    assert restart["requests"] > 0 and restart["failures"] == 0, restart
    assert set(restart["statuses"]) == {"200"}
    assert "| 2 | " in (tmp_path / "scaleout-quick.md").read_text()
