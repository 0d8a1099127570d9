"""The web-queue-worker split for real: one `--role api` and two `--role worker` processes
(`--model sim`, batches that take a while) on one redis-server and one SeaweedFS S3 endpoint.

- 40 jobs spread over both workers and all succeed; every image reads back through the api;
  a worker killed with -9 mid-batch loses nothing: its jobs are claimed by the other worker after
  the visibility timeout and each job still ends exactly once (one webhook per job);
- a restarted api process still serves every job and image;
- jobs queued while Redis restarts (AOF) still run;
- with Redis down, POST /v1/jobs answers 503 + Retry-After and a worker's /readyz turns 503.
"""

from __future__ import annotations

import asyncio
import base64
import collections
import contextlib
import hmac
import http.server
import io
import json
import signal
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import boto3
import httpx
import pytest
from PIL import Image

from batchserve.jobs.record import JobRecord
from batchserve.jobs.redis import RedisQueue
from batchserve.jobs.service import input_name

from conftest import ServerProcess, free_port, running_server
from imagedata import b64, encode, gradient, mask
from services import RedisServer, SeaweedS3, redis_server, seaweed_s3

SECRET = "scaleout-webhook-secret"
# Batches of up to 4 that take 0.6 s + 0.1 s per image: a kill lands mid-batch.
SIM = ("--model", "sim", "--sim-base-ms", "600", "--sim-per-image-ms", "100",
       "--max-batch-size", "4", "--max-wait-ms", "50", "--warmup", "")
REQUEST = {"prompt": "a lighthouse", "width": 64, "height": 64, "inference_steps": 2}


@dataclass
class Backends:
    redis: RedisServer
    s3: SeaweedS3
    tmp: Path
    hook_port: int  # the webhook receiver's: allowed as 127.0.0.1:PORT

    def args(self, visibility_s: float = 2.0) -> tuple[str, ...]:
        return ("--queue", self.redis.url, "--results", "s3://results/jobs",
                "--s3-endpoint-url", self.s3.endpoint_url,
                "--job-visibility-timeout-s", str(visibility_s),
                "--webhook-allow-hosts", f"127.0.0.1:{self.hook_port}", "--webhook-allow-private",
                "--webhook-secret", SECRET)


@pytest.fixture(scope="module")
def backends(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Backends]:
    tmp = tmp_path_factory.mktemp("scaleout")
    with redis_server(tmp) as redis, seaweed_s3(tmp) as s3:
        yield Backends(redis, s3, tmp, free_port())


def start(backends: Backends, role: str, name: str, *extra: str) -> ServerProcess:
    server = ServerProcess(*SIM, "--role", role, *backends.args(), *extra,
                           env=backends.s3.env, log=backends.tmp / f"{name}.log")
    return server


@contextlib.contextmanager
def processes(*servers: ServerProcess) -> Iterator[None]:
    try:
        for server in servers:
            server.wait_ready(60)
        yield
    finally:
        for server in servers:
            server.terminate(20)


def submit(api: str, n: int, **extra: Any) -> list[str]:
    ids = []
    with httpx.Client(base_url=api, timeout=10) as client:
        for i in range(n):
            resp = client.post("/v1/jobs", json={**REQUEST, "seed": i, **extra})
            assert resp.status_code == 202, resp.text
            ids.append(resp.json()["id"])
    return ids


def wait_all(api: str, ids: list[str], timeout_s: float = 60) -> dict[str, dict[str, Any]]:
    """Polls until every job is terminal (within a deadline); returns the final views."""
    deadline = time.monotonic() + timeout_s
    done: dict[str, dict[str, Any]] = {}
    with httpx.Client(base_url=api, timeout=10) as client:
        while len(done) < len(ids):
            assert time.monotonic() < deadline, f"{len(ids) - len(done)} jobs unfinished"
            for job_id in ids:
                if job_id not in done:
                    view = client.get(f"/v1/jobs/{job_id}").json()
                    if view["status"] in ("succeeded", "failed", "canceled"):
                        done[job_id] = view
            time.sleep(0.2)  # polling real processes within the deadline
    return done


def assert_readable(api: str, views: dict[str, dict[str, Any]], s3: str | None = None) -> None:
    """Every job succeeded and its PNG reads through `api` (or, given the S3 endpoint, through
    the api's 302 to a presigned URL there)."""
    with httpx.Client(base_url=api, timeout=10) as client:
        for job_id, view in views.items():
            assert view["status"] == "succeeded", view
            image = client.get(f"/v1/jobs/{job_id}/image")
            if s3 is not None:
                assert image.status_code == 302
                assert image.headers["location"].startswith(s3)
                image = httpx.get(image.headers["location"], timeout=10)  # no credentials
            assert image.status_code == 200
            assert image.headers["content-type"] == "image/png"
            assert image.content.startswith(b"\x89PNG")


def metric(url: str, name: str) -> float:
    text = httpx.get(url + "/metrics", timeout=5).text
    return sum(float(line.rsplit(" ", 1)[1]) for line in text.splitlines()
               if line.startswith(name) and not line.startswith("#"))


def wait_for(check: Callable[[], bool], timeout_s: float, what: str) -> None:
    deadline = time.monotonic() + timeout_s
    while not check():
        assert time.monotonic() < deadline, what
        time.sleep(0.1)  # polling real processes within the deadline


def stored_records(backends: Backends, ids: list[str]) -> list[JobRecord]:
    """The records as Redis holds them (the view leaves out `attempts`)."""
    async def read() -> list[JobRecord]:
        queue = RedisQueue(backends.redis.url, ttl_s=60, visibility_timeout_s=60)
        try:
            return [r for r in [await queue.get(i) for i in ids] if r is not None]
        finally:
            await queue.close()

    return asyncio.run(read())


class Receiver:
    """A loopback webhook receiver: counts signed deliveries per job."""

    def __init__(self, port: int) -> None:
        self.finals: collections.Counter[str] = collections.Counter()
        self.bad_signatures = 0
        receiver = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                body = self.rfile.read(int(self.headers["Content-Length"]))
                expected = "sha256=" + hmac.new(SECRET.encode(), body, "sha256").hexdigest()
                if self.headers["X-Batchserve-Signature"] != expected:
                    receiver.bad_signatures += 1
                receiver.finals[json.loads(body)["id"]] += 1
                self.send_response(204)
                self.end_headers()

            def log_message(self, *args: Any) -> None:
                pass

        self.server = http.server.ThreadingHTTPServer(("127.0.0.1", port), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}/hook"
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self.thread.start()

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


def test_workers_share_the_queue_survive_a_kill_and_an_api_restart(backends: Backends) -> None:
    receiver = Receiver(backends.hook_port)
    api = start(backends, "api", "api")
    first, second = start(backends, "worker", "worker-1"), start(backends, "worker", "worker-2")
    try:
        with processes(api, first, second):
            ids = submit(api.url, 40, webhook=receiver.url)
            # Killed after its first batch, with more work held: mid-batch.
            wait_for(lambda: metric(first.url, "batchserve_batches_total") >= 1, 30,
                     "worker 1 never finished a batch")
            first.proc.send_signal(signal.SIGKILL)
            views = wait_all(api.url, ids)
            assert_readable(api.url, views)
            assert metric(second.url, "batchserve_images_total") > 0  # both took work
            # Jobs the dead worker held ran on the other one, as a second delivery...
            assert any(r.attempts >= 2 for r in stored_records(backends, ids))
            # ...and every job ended exactly once: one final webhook each, properly signed.
            wait_for(lambda: sum(receiver.finals.values()) >= 40, 20, "webhooks missing")
            assert receiver.finals == collections.Counter({job_id: 1 for job_id in ids})
            assert receiver.bad_signatures == 0

        # A new api process (another port) serves every job; this one sends clients to S3.
        with running_server(*SIM, "--role", "api", *backends.args(), "--result-redirect",
                            tmp_path=backends.tmp, env=backends.s3.env, name="api-2") as api2:
            assert_readable(api2.url, wait_all(api2.url, ids, timeout_s=10),
                            s3=backends.s3.endpoint_url)
    finally:
        receiver.close()


def test_jobs_queued_across_a_redis_restart_still_run(backends: Backends) -> None:
    api = start(backends, "api", "api-3")
    with processes(api):
        ids = submit(api.url, 6)
        backends.redis.kill()  # kill -9: the AOF (fsync always) has every accepted job
        backends.redis.start()
        worker = start(backends, "worker", "worker-3")
        with processes(worker):
            assert_readable(api.url, wait_all(api.url, ids))


def test_redis_down_refuses_jobs_and_unreadies_workers(backends: Backends) -> None:
    api, worker = start(backends, "api", "api-4"), start(backends, "worker", "worker-4")
    with processes(api, worker):
        backends.redis.stop()
        try:
            resp = httpx.post(api.url + "/v1/jobs", json=REQUEST, timeout=10)
            assert resp.status_code == 503, resp.text
            assert int(resp.headers["Retry-After"]) > 0
            assert resp.json()["error"]["code"]
            wait_for(lambda: httpx.get(worker.url + "/readyz").status_code == 503, 20,
                     "worker still ready with Redis down")
            assert "unreachable" in httpx.get(worker.url + "/readyz").text
            assert "unreachable" in worker.logs()  # and says so in its log
            assert httpx.get(api.url + "/readyz").status_code == 503
        finally:
            backends.redis.start()
        wait_for(lambda: httpx.get(worker.url + "/readyz").status_code == 200, 30,
                 "worker not ready again after Redis came back")
        ids = submit(api.url, 2)
        assert_readable(api.url, wait_all(api.url, ids))


def s3_client(backends: Backends) -> Any:
    return boto3.client("s3", endpoint_url=backends.s3.endpoint_url, region_name="us-east-1",
                        aws_access_key_id=backends.s3.env["AWS_ACCESS_KEY_ID"],
                        aws_secret_access_key=backends.s3.env["AWS_SECRET_ACCESS_KEY"])


def s3_object(backends: Backends, key: str) -> bytes | None:
    client = s3_client(backends)
    try:
        data: bytes = client.get_object(Bucket="results", Key=key)["Body"].read()
        return data
    except client.exceptions.NoSuchKey:
        return None
    finally:
        client.close()


def test_jobs_with_images_carry_their_pixels_through_redis_and_s3(backends: Backends) -> None:
    """An init image and mask sent to the api reach the worker's engine intact (sim hands its
    init image back), while the Redis record holds only their size; the pixels wait in S3 as
    `<job id>-input` until the job ends, then are deleted. The doors whose clients cannot poll
    (OpenAI edits, A1111 img2img) go through the same jobs on a --role api process."""
    picture, painted = gradient(96, 64), mask(96, 64, (8, 8, 40, 40))
    api = start(backends, "api", "api-images")
    with processes(api), httpx.Client(base_url=api.url, timeout=30) as client:
        sent = client.post("/v1/jobs", json={
            "prompt": "x", "init_image": b64(encode(picture)), "width": 64, "height": 64,
            "mask_image": b64(encode(painted)), "strength": 0.5, "inference_steps": 4})
        assert sent.status_code == 202, sent.text
        job_id = sent.json()["id"]
        (record,) = stored_records(backends, [job_id])
        assert len(record.dumps()) < 2000  # no base64 in Redis
        assert record.request["init_image"] == {"width": 64, "height": 64}
        waiting = s3_object(backends, f"jobs/{input_name(job_id)}")  # no worker yet: queued
        assert waiting is not None and len(waiting) == 64 * 64 * 4
        worker = start(backends, "worker", "worker-images")
        with processes(worker):
            (view,) = wait_all(api.url, [job_id]).values()
            assert view["status"] == "succeeded", view
            image = Image.open(io.BytesIO(client.get(f"/v1/jobs/{job_id}/image").content))
            expected = picture.resize((64, 64), Image.Resampling.LANCZOS)
            assert image.convert("RGB").tobytes() == expected.tobytes()
            assert s3_object(backends, f"jobs/{input_name(job_id)}") is None
            edit = client.post("/v1/images/edits", data={
                "prompt": "x", "size": "64x64", "num_inference_steps": "2"},
                files={"image": ("p.png", encode(picture), "image/png")})
            assert edit.status_code == 200, edit.text
            edited = Image.open(io.BytesIO(base64.b64decode(edit.json()["data"][0]["b64_json"])))
            assert edited.convert("RGB").tobytes() == expected.tobytes()
            a1111 = client.post("/sdapi/v1/img2img", json={
                "prompt": "x", "init_images": [b64(encode(picture))], "steps": 2,
                "width": 64, "height": 64})
            assert a1111.status_code == 200, a1111.text
            again = Image.open(io.BytesIO(base64.b64decode(a1111.json()["images"][0])))
            assert again.convert("RGB").tobytes() == expected.tobytes()
    leftovers = [k for k in _keys(backends) if k.endswith("-input")]
    assert leftovers == []


def _keys(backends: Backends) -> list[str]:
    client = s3_client(backends)
    try:
        listing = client.list_objects_v2(Bucket="results", Prefix="jobs/")
        return [entry["Key"] for entry in listing.get("Contents", [])]
    finally:
        client.close()
