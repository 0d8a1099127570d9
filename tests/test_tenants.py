"""Tenants: the file, key lookup, reload, rates, and fair shares inside the one queue."""

from __future__ import annotations

import asyncio
import hashlib
import re
import signal
import threading
import time
from collections import Counter
from collections.abc import Callable
from contextlib import AsyncExitStack
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import pytest
from inprocess import in_process

from batchserve.jobs.memory import MemoryQueue, MemoryResultStore
from batchserve.jobs.record import JobRecord, Status
from batchserve.jobs.redis import RedisQueue
from batchserve.sched.fair import FairShare
from batchserve.sched.request_queue import RequestQueue
from batchserve.tenants import RateLimiter, Tenant, Tenants, TenantsError, parse

from conftest import running_server
from fakes import FakeEngine
from services import redis_server

FILE = """
[tenants.alice]
key = "sk-alice-0001"
weight = 3
max_queued = 4
images_per_minute = 6

[tenants.bob]
key_sha256 = "{bob}"
"""
BOB_HASH = hashlib.sha256(b"sk-bob-00000002").hexdigest()


class Clock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def test_file_parses_with_defaults_and_hashed_keys() -> None:
    tenants = Tenants(parse(FILE.format(bob=BOB_HASH)))
    alice, bob = tenants.lookup("sk-alice-0001"), tenants.lookup("sk-bob-00000002")
    assert alice is not None and alice.name == "alice" and alice.weight == 3
    assert alice.max_queued == 4 and alice.images_per_minute == 6
    assert bob is not None and bob.name == "bob" and bob.weight == 1
    assert bob.max_queued is None and bob.max_priority is None
    assert tenants.lookup("sk-nobody-000") is None
    assert tenants.names == ["alice", "bob"]


@pytest.mark.parametrize(("text", "says"), [
    ("[tenants.a]\nweight = 2\n", "exactly one of key"),
    ("[tenants.a]\nkey = 'short'\n", "8+ characters"),
    ("[tenants.a]\nkey_sha256 = 'abc'\n", "64 hex"),
    ("[tenants.a]\nkey = 'sk-aaaaaaaa'\nweight = 0\n", "weight"),
    ("[tenants.a]\nkey = 'sk-aaaaaaaa'\ncolour = 1\n", "unknown field"),
    ("[tenants.a]\nkey = 'sk-aaaaaaaa'\n[tenants.b]\nkey = 'sk-aaaaaaaa'\n", "share a key"),
    ("[tenants.'a b']\nkey = 'sk-aaaaaaaa'\n", "names are"),
    ("tenants = [", "not valid TOML"),
    ("x = 1", "expected [tenants.NAME]"),
])
def test_bad_files_say_why(text: str, says: str) -> None:
    with pytest.raises(TenantsError, match=re.escape(says)):
        parse(text)


def test_single_api_key_is_the_tenant_default() -> None:
    tenants = Tenants.from_settings(None, "sk-single-key")
    assert tenants is not None
    found = tenants.lookup("sk-single-key")
    assert found is not None and found.name == "default"
    assert Tenants.from_settings(None, None) is None


def test_reload_swaps_and_a_bad_file_keeps_the_old(tmp_path: Path,
                                                   caplog: pytest.LogCaptureFixture) -> None:
    path = tmp_path / "keys.toml"
    path.write_text(FILE.format(bob=BOB_HASH))
    tenants = Tenants.from_settings(str(path), None)
    assert tenants is not None
    path.write_text("[tenants.carol]\nkey = 'sk-carol-0003'\n")
    assert tenants.reload()
    assert tenants.names == ["carol"] and tenants.lookup("sk-alice-0001") is None
    path.write_text("[tenants.carol]\nkey = 'x'\n")
    assert not tenants.reload()
    assert tenants.names == ["carol"]
    assert "keeping the previous one" in caplog.text and "8+ characters" in caplog.text


def test_rate_refuses_then_refills_with_the_clock() -> None:
    clock = Clock()
    rates = RateLimiter(clock)
    alice = Tenant("alice", b"\0" * 32, images_per_minute=6)
    assert [rates.try_take(alice, 2) for _ in range(3)] == [0, 0, 0]
    wait = rates.try_take(alice, 2)
    assert wait == pytest.approx(20.0)  # 2 images at 6/min
    clock.now += 10
    assert rates.try_take(alice, 1) == 0
    assert rates.try_take(Tenant("bob", b"\1" * 32), 1000) == 0  # unlimited


@dataclass
class It:
    tenant: str
    seq: int
    priority: int = 0


def test_order_alternates_by_weight_and_priority_comes_first() -> None:
    weights = {"a": 3.0, "b": 1.0}
    fair = FairShare(lambda t: weights.get(t, 1.0))
    items = [It("a", i) for i in range(12)] + [It("b", 100 + i) for i in range(4)]
    order = fair.order(items, lambda p: p.priority)
    assert [p.tenant for p in order[:8]] == ["a", "b", "a", "a", "a", "b", "a", "a"]
    assert Counter(p.tenant for p in order[:8]) == {"a": 6, "b": 2}
    # Within a tenant: arrival order.
    assert [p.seq for p in order if p.tenant == "a"] == list(range(12))
    urgent = It("b", 999, priority=5)
    assert fair.order([*items, urgent], lambda p: p.priority)[0] is urgent


def test_alone_a_tenant_gets_everything_and_no_credit_is_saved_up() -> None:
    fair = FairShare()
    alone = [It("a", i) for i in range(5)]
    assert fair.order(alone, lambda p: 0) == alone
    fair.charge(alone * 20)  # a served 100 while b was away
    fair.activate("b", {"a"})
    order = fair.order([It("a", 1000 + i) for i in range(4)] + [It("b", i) for i in range(4)],
                       lambda p: 0)
    assert Counter(p.tenant for p in order[:4]) == {"a": 2, "b": 2}


async def _saturate(weights: dict[str, float], rounds: int, batch: int) -> Counter[str]:
    clock = Clock()
    queue: RequestQueue[int, int] = RequestQueue(max_queue=10_000, clock=clock,
                                                 fair=FairShare(lambda t: weights[t]))
    served: Counter[str] = Counter()
    seq = 0
    for _ in range(rounds):
        for tenant in weights:  # every tenant keeps at least a batch queued
            while queue.queued_by(tenant) < 2 * batch:
                queue.submit(seq, key="k", tenant=tenant)
                seq += 1
        taken = queue.take("k", batch, clock())
        served.update(p.tenant for p in taken)
        for p in taken:
            p.future.cancel()
        queue.release(taken)
        clock.now += 1
    return served


async def test_saturating_tenants_3_to_1_get_3_to_1_in_the_queue() -> None:
    served = await _saturate({"a": 3.0, "b": 1.0}, rounds=50, batch=4)
    assert served["a"] + served["b"] == 200
    assert served["a"] / served["b"] == pytest.approx(3.0, rel=0.1)
    alone = await _saturate({"a": 3.0}, rounds=10, batch=4)
    assert alone["a"] == 40


async def test_best_key_prefers_the_tenant_whose_turn_it_is() -> None:
    clock = Clock()
    queue: RequestQueue[int, int] = RequestQueue(clock=clock)
    for i in range(20):
        queue.submit(i, key="flood", tenant="a")
    clock.now += 1
    queue.submit(99, key="other", tenant="b")
    taken = queue.take("flood", 4, clock())
    assert queue.best(clock()) == "other"  # FIFO alone would pick "flood" (older)
    for p in [*taken, *(p for g in queue.groups.values() for p in g.items)]:
        p.future.cancel()
    await asyncio.sleep(0)


async def test_one_tenant_at_one_priority_is_served_in_arrival_order_like_the_full_order(
) -> None:
    """The queue's shortcut (one tenant, everyone at the top priority: arrival order) orders as
    the fair order does, a requeued older item first; a second priority or tenant takes the
    full path."""
    clock = Clock()
    queue: RequestQueue[int, int] = RequestQueue(clock=clock, aging_s=1.0)
    for i in range(6):
        queue.submit(i, key="k")
        clock.now += 0.7  # ages differ: aging would lift the old ones, up to the cap only
    taken = queue.take("k", 2, clock())
    queue.requeue(taken)  # back at the end of the list, older than the rest
    full = queue.fair.order(list(queue.groups["k"].items), queue._rank(clock()))
    assert [p.payload for p in queue.ordered("k", clock())] == [p.payload for p in full]
    assert [p.payload for p in queue.ordered("k", clock())] == list(range(6))
    queue.submit(9, key="k", priority=1)  # above the rest until they age to it (aging_s 1)
    order = [p.payload for p in queue.ordered("k", clock())]
    assert order == [0, 1, 2, 3, 4, 9, 5]  # only the one under 1 s old stays below it
    for p in [p for g in queue.groups.values() for p in g.items]:
        p.future.cancel()
    await asyncio.sleep(0)


# -- through the doors -----------------------------------------------------------------------

KEYS = """
[tenants.alice]
key = "sk-alice-0001"
weight = 3
max_queued = 2
max_priority = 1

[tenants.bob]
key = "sk-bob-00000002"
images_per_minute = 2
"""
T2I = {"prompt": "a red fox", "width": 64, "height": 64, "inference_steps": 1, "seed": 1}


def bearer(key: str) -> dict[str, str]:
    return {"authorization": f"Bearer {key}"}


async def test_doors_apply_each_tenants_limits_and_count_by_tenant(tmp_path: Path) -> None:
    path = tmp_path / "keys.toml"
    path.write_text(KEYS)
    engine = FakeEngine(gate=threading.Event())
    async with in_process(engine, api_keys=str(path), max_batch_size=1, max_wait_ms=0) as app:
        assert (await app.client.post("/t2i", json=T2I)).status_code == 401
        assert (await app.client.post("/t2i", json=T2I, headers=bearer("sk-nobody-1"))
                ).status_code == 401
        too_high = await app.client.post("/t2i", json={**T2I, "priority": 2},
                                          headers=bearer("sk-alice-0001"))
        assert too_high.status_code == 422 and too_high.json()["error"]["field"] == "priority"
        held = [asyncio.create_task(app.client.post("/t2i", json={**T2I, "seed": i},
                                                    headers=bearer("sk-alice-0001")))
                for i in range(2)]
        await _eventually(lambda: app.service.batcher.queue.queued_by("alice") == 2)
        full = await app.client.post("/t2i", json=T2I, headers=bearer("sk-alice-0001"))
        assert full.status_code == 429 and full.json()["error"]["code"] == "tenant_queue_full"
        assert int(full.headers["retry-after"]) >= 1
        # Bob is not alice: admitted while alice is at her cap, until his own rate is spent.
        bobs = [asyncio.create_task(app.client.post("/t2i", json=T2I,
                                                    headers=bearer("sk-bob-00000002")))
                for _ in range(2)]
        await _eventually(lambda: app.service.batcher.queue.queued_by("bob") == 2)
        limited = await app.client.post("/t2i", json=T2I, headers=bearer("sk-bob-00000002"))
        assert limited.status_code == 429 and limited.json()["error"]["code"] == "rate_limited"
        assert 1 <= int(limited.headers["retry-after"]) <= 30
        assert engine.gate is not None
        engine.gate.set()
        assert [r.status_code for r in await asyncio.gather(*held, *bobs)] == [200] * 4
        assert app.metric("batchserve_tenant_images_admitted_total", tenant="alice") == 2
        assert app.metric("batchserve_tenant_refused_total", tenant="bob",
                          code="rate_limited") == 1
        metrics = (await app.client.get("/metrics")).text
        assert set(re.findall(r'tenant="([^"]*)"', metrics)) == {"alice", "bob"}


async def test_sighup_reload_takes_new_keys_and_keeps_a_good_file(tmp_path: Path) -> None:
    path = tmp_path / "keys.toml"
    path.write_text(KEYS)
    async with in_process(FakeEngine(), api_keys=str(path), max_batch_size=1,
                          max_wait_ms=0) as app:
        path.write_text("[tenants.carol]\nkey = 'sk-carol-0003'\n")
        assert app.service.reload_tenants()
        assert (await app.client.post("/t2i", json=T2I, headers=bearer("sk-carol-0003"))
                ).status_code == 200
        assert (await app.client.post("/t2i", json=T2I, headers=bearer("sk-alice-0001"))
                ).status_code == 401
        path.write_text("not toml [")
        assert not app.service.reload_tenants()
        assert (await app.client.post("/t2i", json=T2I, headers=bearer("sk-carol-0003"))
                ).status_code == 200


async def _eventually(predicate: Callable[[], bool], timeout_s: float = 5.0) -> None:
    deadline = time.monotonic() + timeout_s
    while not predicate():
        assert time.monotonic() < deadline, "condition not met in time"
        await asyncio.sleep(0.002)


def test_sighup_to_a_real_server_reloads_and_a_bad_file_is_kept_out(tmp_path: Path) -> None:
    path = tmp_path / "keys.toml"
    path.write_text(KEYS)
    with running_server("--model", "sim", "--api-keys", str(path), tmp_path=tmp_path) as server:
        def status(key: str) -> int:
            return httpx.post(f"{server.url}/t2i", json=T2I, headers=bearer(key),
                              timeout=30).status_code

        assert status("sk-alice-0001") == 200
        path.write_text("[tenants.carol]\nkey = 'sk-carol-0003'\n")
        server.proc.send_signal(signal.SIGHUP)
        _wait_for(lambda: status("sk-carol-0003") == 200)
        assert status("sk-alice-0001") == 401
        path.write_text("[tenants.dave]\nkey = 'short'\n")
        server.proc.send_signal(signal.SIGHUP)
        _wait_for(lambda: b"not reloaded" in server.log_path.read_bytes())
        assert status("sk-carol-0003") == 200 and server.proc.poll() is None


def _wait_for(predicate: Callable[[], bool], timeout_s: float = 20.0) -> None:
    deadline = time.monotonic() + timeout_s
    while not predicate():
        assert time.monotonic() < deadline, "condition not met in time"
        time.sleep(0.05)


async def test_a_late_tenant_is_served_next_not_behind_a_flood(tmp_path: Path) -> None:
    path = tmp_path / "keys.toml"
    path.write_text(KEYS.replace("max_queued = 2", "max_queued = 20"))
    engine = FakeEngine(gate=threading.Event())
    async with in_process(engine, api_keys=str(path), max_batch_size=1, max_wait_ms=0) as app:
        flood = [asyncio.create_task(app.client.post(
            "/t2i", json={**T2I, "prompt": f"alice {i}"}, headers=bearer("sk-alice-0001")))
            for i in range(6)]
        await _eventually(lambda: app.service.batcher.queue.queued_by("alice") == 6)
        await _eventually(lambda: len(engine.batches) == 1)  # alice 0 runs, 5 wait
        bob = asyncio.create_task(app.client.post(
            "/t2i", json={**T2I, "prompt": "bob"}, headers=bearer("sk-bob-00000002")))
        await _eventually(lambda: app.service.batcher.queue.queued_by("bob") == 1)
        assert engine.gate is not None
        engine.gate.set()
        await asyncio.gather(*flood, bob)
    order = [batch[0].prompt for batch in engine.batches]
    # FIFO would run bob last (7th). He enters level with alice's turn (no credit for the time
    # he had nothing queued) and wins the tie after one more of hers, the older: 3rd.
    assert order == ["alice 0", "alice 1", "bob", "alice 2", "alice 3", "alice 4", "alice 5"]


# -- jobs still in the job queue count ---------------------------------------------------------


async def test_memory_queue_counts_a_tenants_jobs_while_they_are_queued() -> None:
    queue = MemoryQueue(ttl_s=600, visibility_timeout_s=60)
    records = [JobRecord(id=f"job{i}", status=Status.QUEUED, created_at=0.0, request={},
                         format="png", tenant=tenant)
               for i, tenant in enumerate(["alice", "alice", "bob"])]
    for record in records:
        await queue.create(record)
    assert (await queue.waiting_by("alice"), await queue.waiting_by("bob")) == (2, 1)
    await queue.transition("job0", Status.RUNNING, started_at=1.0)  # a worker took it
    await queue.transition("job1", Status.CANCELED, completed_at=1.0)
    assert (await queue.waiting_by("alice"), await queue.waiting_by("bob")) == (0, 1)
    await queue.transition("job0", Status.QUEUED, started_at=None)  # handed back
    assert await queue.waiting_by("alice") == 1


@pytest.fixture(scope="module")
def redis_url(tmp_path_factory: pytest.TempPathFactory) -> Any:
    with redis_server(tmp_path_factory.mktemp("redis-tenants")) as server:
        yield server.url


async def test_jobs_no_worker_has_taken_count_toward_max_queued_on_every_api_process(
    tmp_path: Path, redis_url: str
) -> None:
    """Two `--role api` processes share a Redis queue and no worker runs: alice's jobs stay
    queued, and her `max_queued` (2) holds across both processes until one is canceled."""
    path = tmp_path / "keys.toml"
    path.write_text(KEYS)
    store = MemoryResultStore(ttl_s=600)
    shared = {"queue": redis_url, "results": "file:///nonexistent", "api_keys": str(path)}

    def backends() -> dict[str, Any]:
        return {"queue": RedisQueue(redis_url, ttl_s=600, visibility_timeout_s=60,
                                    prefix="tenants-test"), "store": store}

    async with AsyncExitStack() as stack:
        one, two = [await stack.enter_async_context(in_process(role="api", backends=backends(),
                                                                **shared)) for _ in range(2)]
        alice, bob = bearer("sk-alice-0001"), bearer("sk-bob-00000002")
        first = await one.client.post("/v1/jobs", json=T2I, headers=alice)
        assert first.status_code == 202
        assert (await two.client.post("/v1/jobs", json=T2I, headers=alice)).status_code == 202
        for app in (one, two):
            full = await app.client.post("/v1/jobs", json=T2I, headers=alice)
            assert full.status_code == 429, full.text
            assert full.json()["error"]["code"] == "tenant_queue_full"
            assert "2 images queued" in full.json()["error"]["message"]
        assert (await one.client.post("/v1/jobs", json=T2I, headers=bob)).status_code == 202
        canceled = await two.client.delete(f"/v1/jobs/{first.json()['id']}", headers=alice)
        assert canceled.status_code == 200 and canceled.json()["status"] == "canceled"
        assert (await two.client.post("/v1/jobs", json=T2I, headers=alice)).status_code == 202
