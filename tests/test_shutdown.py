"""A real `batchserve serve --model sim` process: SIGTERM drains, overload gives 429, a fatal
start exits non-zero.

`--model sim` makes a batch take a known time (`--sim-base-ms`) without using the CPU, so a
test can have requests queued and in flight when it sends the signal.
"""

from __future__ import annotations

import signal
import socket
import subprocess
import time
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path

import httpx
import orjson
from prometheus_client.parser import text_string_to_metric_families

from conftest import ServerProcess, running_server

PROMPT = "a quiet harbour"
BODY = {"prompt": PROMPT, "width": 64, "height": 64, "inference_steps": 1}


def gauge(server: ServerProcess, name: str) -> float:
    """Sum of all samples of `name` (over labels) on the server's /metrics."""
    text = httpx.get(server.url + "/metrics", timeout=5).text
    return sum(s.value for f in text_string_to_metric_families(text) for s in f.samples
               if s.name == name)


def wait_for(server: ServerProcess, what: str, predicate: Callable[[], bool],
             timeout_s: float = 15.0) -> None:
    deadline = time.monotonic() + timeout_s
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}:\n{server.logs()}")
        time.sleep(0.01)  # polling an external process, bounded by the deadline


def post(server: ServerProcess, seed: int) -> httpx.Response:
    return httpx.post(server.url + "/t2i", json={**BODY, "seed": seed}, timeout=60)


def fire(pool: ThreadPoolExecutor, server: ServerProcess, n: int) -> list[Future[httpx.Response]]:
    return [pool.submit(post, server, seed) for seed in range(n)]


def exit_code(server: ServerProcess, timeout_s: float = 30.0) -> int:
    try:
        return server.proc.wait(timeout_s)
    except subprocess.TimeoutExpired:
        raise AssertionError(f"server did not exit in {timeout_s} s:\n{server.logs()}") from None


def overflow(pool: ThreadPoolExecutor, server: ServerProcess, n: int) -> list[int]:
    """Fires `n` requests at once at a small queue: every answer is 200 or a 429 `queue_full`
    with Retry-After, never a 5xx; some of each. Returns the statuses."""
    responses = [f.result(timeout=60) for f in fire(pool, server, n)]
    statuses = [r.status_code for r in responses]
    assert set(statuses) <= {200, 429}, statuses
    assert statuses.count(200) >= 4 and statuses.count(429) >= 1
    for response in responses:
        if response.status_code == 429:
            assert error_code(response) == "queue_full"
            assert int(response.headers["retry-after"]) >= 1
    return statuses


def error_code(response: httpx.Response) -> str:
    assert response.headers["content-type"] == "application/json"
    return str(response.json()["error"]["code"])


def sigterm_refuses_new_work(server: ServerProcess) -> httpx.Response:
    """SIGTERM starts the drain: /readyz turns 503 and a new request is refused with 503
    `draining` (returned, for more checks)."""
    server.proc.send_signal(signal.SIGTERM)
    wait_for(server, "/readyz to turn 503", lambda: httpx.get(
        server.url + "/readyz", timeout=5).status_code == 503)
    refused = post(server, 99)
    assert refused.status_code == 503 and error_code(refused) == "draining"
    return refused


def test_sigterm_finishes_queued_and_in_flight_work_then_exits_0(tmp_path: Path) -> None:
    # 8 requests, batches of 2, 800 ms each: with 4 queued at the signal, the drain has at least
    # 1.6 s of work left, time enough to see it refuse new work.
    with running_server("--model", "sim", "--sim-base-ms", "800", "--max-batch-size", "2",
                        "--max-wait-ms", "0", tmp_path=tmp_path) as server, \
            ThreadPoolExecutor(8) as pool:
        accepted = fire(pool, server, 8)
        # All 8 admitted (started batches' items + queued) with at least 4 still queued.
        wait_for(server, "a batch in flight and work queued", lambda: gauge(
            server, "batchserve_queue_wait_seconds_count") + gauge(
            server, "batchserve_queue_depth") == 8 and gauge(
            server, "batchserve_queue_depth") >= 4)
        refused = sigterm_refuses_new_work(server)
        assert int(refused.headers["retry-after"]) >= 1
        assert server.proc.poll() is None  # still draining

        assert [f.result(timeout=30).status_code for f in accepted] == [200] * 8
        assert exit_code(server) == 0
    logs = server.log_path.read_text()
    assert "draining" in logs and "Traceback" not in logs
    lines = [orjson.loads(line) for line in logs.splitlines()]  # every line is one JSON object
    access = [line for line in lines if line["logger"] == "batchserve.access"]
    assert sorted(line["status"] for line in access) == [200] * 8 + [503]
    assert PROMPT not in logs  # no --log-prompts


def test_drain_timeout_answers_leftovers_503_instead_of_dropping_them(tmp_path: Path) -> None:
    with running_server("--model", "sim", "--sim-base-ms", "1000", "--max-batch-size", "1",
                        "--max-wait-ms", "0", "--drain-timeout-s", "1.5",
                        tmp_path=tmp_path) as server, ThreadPoolExecutor(4) as pool:
        accepted = fire(pool, server, 4)
        wait_for(server, "one in flight, three queued", lambda: gauge(
            server, "batchserve_queue_depth") == 3)
        server.proc.send_signal(signal.SIGTERM)
        # 4 s of work, 1.5 s of grace: the first finishes, the rest are answered 503
        responses = [f.result(timeout=30) for f in accepted]  # raises on a dropped connection
        statuses = sorted(r.status_code for r in responses)
        assert statuses.count(200) >= 1 and statuses.count(503) >= 2
        assert set(statuses) <= {200, 503}
        for response in responses:
            if response.status_code == 503:
                assert error_code(response) == "draining"
        assert exit_code(server) == 0
    assert "drain grace period ended" in server.log_path.read_text()


def test_second_sigterm_ends_the_drain_with_503s_and_still_exits_0(tmp_path: Path) -> None:
    with running_server("--model", "sim", "--sim-base-ms", "20000", "--max-batch-size", "1",
                        "--max-wait-ms", "0", tmp_path=tmp_path) as server, \
            ThreadPoolExecutor(3) as pool:
        accepted = fire(pool, server, 3)
        wait_for(server, "one in flight, two queued", lambda: gauge(
            server, "batchserve_queue_depth") == 2)
        server.proc.send_signal(signal.SIGTERM)
        wait_for(server, "/readyz to turn 503", lambda: httpx.get(
            server.url + "/readyz", timeout=5).status_code == 503)
        server.proc.send_signal(signal.SIGTERM)
        # 60 s of work and 60 s of grace, cut short: all three answered 503 long before
        responses = [f.result(timeout=15) for f in accepted]
        assert [(r.status_code, error_code(r)) for r in responses] == [(503, "draining")] * 3
        assert exit_code(server, timeout_s=15) == 0
    assert "Traceback" not in server.log_path.read_text()


def test_queue_overflow_gives_429_with_retry_after_and_never_5xx(tmp_path: Path) -> None:
    with running_server("--model", "sim", "--sim-base-ms", "200", "--max-batch-size", "2",
                        "--max-wait-ms", "0", "--max-queue", "3", "--refusal-hold-s", "0",
                        tmp_path=tmp_path) as server, ThreadPoolExecutor(24) as pool:
        statuses = overflow(pool, server, 24)
        rejected = gauge(server, "batchserve_requests_rejected_total")
        assert rejected == statuses.count(429)
        assert post(server, 100).status_code == 200  # recovered once the burst passed
        server.proc.send_signal(signal.SIGTERM)
        assert exit_code(server) == 0


def test_model_that_cannot_load_exits_non_zero(tmp_path: Path) -> None:
    """The fatal path (also taken when the batch loop dies): unready, then exit 1 so an
    orchestrator restarts the process."""
    server = ServerProcess("--model", str(tmp_path / "nonexistent" / "dir"),
                           log=tmp_path / "server.log")
    try:
        code = exit_code(server, timeout_s=120)
    finally:
        server.terminate()
    assert code != 0
    logs = server.log_path.read_text()
    assert "model failed to load" in logs and "fatal" in logs


def test_sigterm_during_an_abandoned_tiny_batch_exits_0_not_sigabrt(tmp_path: Path) -> None:
    """The batch of a client that left keeps running on the engine thread until its next
    step, while the drain (nobody waits for it) is already over; the engine thread is joined
    before the interpreter exits: exit 0, not SIGABRT (134) from torch code still running."""
    # 1024x1024: a step long enough (seconds on a CPU) that the exit comes in the middle of it
    with running_server("--model", "tiny", "--max-wait-ms", "0", "--max-pixels", "1048576",
                        tmp_path=tmp_path) as server:
        body = orjson.dumps({"prompt": PROMPT, "width": 1024, "height": 1024,
                             "inference_steps": 50})
        client = socket.create_connection(("127.0.0.1", server.port))
        client.sendall(b"POST /t2i HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                       b"Content-Length: %d\r\n\r\n%s" % (len(body), body))

        def in_engine() -> bool:
            live = httpx.get(server.url + "/v1/info", timeout=5).json()["live"]
            return bool(live["running_batch_size"])

        wait_for(server, "the batch in the engine", in_engine, timeout_s=60)
        client.close()  # the client leaves
        server.proc.send_signal(signal.SIGTERM)
        assert exit_code(server, timeout_s=120) == 0
    logs = server.log_path.read_text()
    assert "draining" in logs and "terminate called" not in logs
