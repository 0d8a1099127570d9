"""Async jobs, closed loop: each user submits one job (`POST /v1/jobs`), polls it with backoff
(0.25 s, doubling to at most 2 s) until it ends, fetches and checks the image, then submits the
next. The request is the one the other scenarios send (BENCH_WIDTH/HEIGHT/STEPS).

Each record's `end` is when the image arrived (what a client waits, polling included) and
`done` the job's `completed_at` (the server's clock, same host): when the image was ready.

    locust -f benchmarks/locustfiles/jobs.py --headless -u 16 -r 16 -t 60s \
        --host http://127.0.0.1:8000
"""

from __future__ import annotations

import time
from datetime import datetime
from typing import Any

import gevent
from locust import task

from benchmarks.locustfiles.common import (
    API_KEY,
    HEIGHT,
    RECORDS,
    STEPS,
    WIDTH,
    T2IUser,
    check,
    request_body,
)

FIRST_POLL_S = 0.25
MAX_POLL_S = 2.0
GIVE_UP_S = 900.0
TERMINAL = ("succeeded", "failed", "canceled")


def poll_delays() -> Any:
    """0.25, 0.5, 1, 2, 2, 2, ... seconds."""
    delay = FIRST_POLL_S
    while True:
        yield delay
        delay = min(delay * 2, MAX_POLL_S)


class JobsUser(T2IUser):
    @task
    def job(self) -> None:
        payload = request_body()
        headers = {"Authorization": f"Bearer {API_KEY}"} if API_KEY else {}
        started = time.time()
        record: dict[str, Any] = {"start": started, "end": started, "status": 0, "ok": False,
                                  "key": f"{WIDTH}x{HEIGHT}x{STEPS}", "batch_size": 0,
                                  "queue_ms": 0.0, "inference_ms": 0.0, "polls": 0}
        RECORDS.append(record)
        with self.client.post("/v1/jobs", json=payload, headers=headers, name="/v1/jobs",
                              catch_response=True) as resp:
            record["status"] = resp.status_code or 0
            if resp.status_code != 202:
                resp.failure(f"submit: HTTP {resp.status_code}")
                return
            job = resp.json()
        view = self._wait(job["id"], headers, record, started)
        if view is None:
            return
        result = view.get("result") or {}
        record.update(done=datetime.fromisoformat(view["completed_at"]).timestamp(),
                      batch_size=result.get("batch_size", 0),
                      queue_ms=result.get("queue_ms", 0.0),
                      inference_ms=result.get("inference_ms", 0.0))
        with self.client.get(f"/v1/jobs/{job['id']}/image", headers=headers,
                             name="/v1/jobs/{id}/image", catch_response=True) as resp:
            record["end"] = time.time()
            record["status"] = resp.status_code or 0
            problem = check(resp.status_code or 0, (resp.headers or {}).get("Content-Type", ""),
                            resp.content or b"")
            record["ok"] = problem is None
            if problem is None:
                resp.success()
            else:
                resp.failure(problem)

    def _wait(self, job_id: str, headers: dict[str, str], record: dict[str, Any],
              started: float) -> dict[str, Any] | None:
        """Polls until the job ends; its view if it succeeded, else None (a failure)."""
        for delay in poll_delays():
            gevent.sleep(delay)
            record["polls"] += 1
            with self.client.get(f"/v1/jobs/{job_id}", headers=headers, name="/v1/jobs/{id}",
                                 catch_response=True) as resp:
                if resp.status_code != 200:
                    resp.failure(f"poll: HTTP {resp.status_code}")
                    return None
                view: dict[str, Any] = resp.json()
                if view["status"] == "succeeded":
                    return view
                if view["status"] in TERMINAL:
                    resp.failure(f"job {view['status']}: {view.get('error')}")
                    return None
            if time.time() - started > GIVE_UP_S:
                return None
        return None
