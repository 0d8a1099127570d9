"""`--flush-policy continuous` through the service and HTTP: headers, metrics, refusal for
engines without the step-wise interface, and a real server's drain and backpressure."""

from __future__ import annotations

import asyncio
import signal
import threading
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
from inprocess import in_process
from test_shutdown import exit_code, fire, gauge, overflow, sigterm_refuses_new_work, wait_for

from batchserve.engines import GenerationItem, run_round
from batchserve.service import Service
from batchserve.settings import Settings, SettingsError

from conftest import running_server
from fakes import FakeEngine, FakeStepEngine


def body(seed: int, steps: int, guidance: float = 7.5) -> dict[str, object]:
    return {"prompt": "p", "width": 64, "height": 64, "seed": seed, "inference_steps": steps,
            "guidance_scale": guidance}


def item(seed: int, steps: int) -> GenerationItem:
    return GenerationItem("p", "", seed, 64, 64, steps, 7.5)


async def eventually(predicate: object, rounds: int = 2000) -> None:
    for _ in range(rounds):
        if predicate():  # type: ignore[operator]
            return
        await asyncio.sleep(0.001)
    raise AssertionError("condition never became true")


async def test_items_with_other_steps_and_guidance_share_steps() -> None:
    gate = threading.Event()
    engine = FakeStepEngine(gate=gate)
    async with in_process(engine, flush_policy="continuous", max_wait_ms=10_000) as app:  # type: ignore[arg-type]
        first = asyncio.create_task(app.client.post("/t2i", json=body(1, 3, 7.5)))
        await eventually(engine.started.is_set)  # first's first step is running
        second = asyncio.create_task(app.client.post("/t2i", json=body(2, 1, 1.0)))
        await eventually(lambda: app.service.batcher.depth == 1)
        gate.set()
        a, b = await asyncio.gather(first, second)
        assert engine.steps == [[1], [1, 2], [1]]
        assert (a.status_code, b.status_code) == (200, 200)
        assert b.headers["x-batch-size"] == "2" and a.headers["x-batch-size"] == "1"
        assert float(b.headers["x-queue-ms"]) >= 0 and float(b.headers["x-inference-ms"]) >= 0
        assert engine.batches == []  # never the whole-batch path
        assert app.metric("batchserve_step_batch_size_count") == 3
        assert app.metric("batchserve_step_batch_size_sum") == 4
        assert app.metric("batchserve_active_items") == 0
        assert app.metric("batchserve_images_total") == 2
        info = (await app.client.get("/v1/info")).json()
        assert info["batching"]["key"] == ["width", "height"]


@pytest.mark.parametrize("policy", ["continuous", "deadline"])
async def test_warmup_runs_the_calls_the_policy_makes(policy: str) -> None:
    """Under `continuous` the warm-up shapes and sizes go through prepare / step / finish (so
    the step-path batches are tuned and compiled before ready); whole-batch policies keep the
    engine's own `generate` warm-up."""
    engine = FakeStepEngine()
    async with in_process(engine, flush_policy=policy, warmup="64x64x2",  # type: ignore[arg-type]
                          warmup_batch_sizes="1,3"):
        if policy == "continuous":
            assert not engine.warmed
            assert engine.steps == [[0], [0], [0, 1, 2], [0, 1, 2]]
        else:
            assert engine.warmed and engine.steps == []


def test_run_round_steps_back_to_back_until_an_item_is_done_or_told_to_stop() -> None:
    engine = FakeStepEngine()
    short, long = engine.prepare([item(1, 3), item(2, 8)])
    ran = run_round(engine, [], [short, long], until=lambda: False)
    assert ran.steps == 3 and engine.steps == [[1, 2]] * 3  # short's schedule ended
    assert ran.images is not None and len(ran.images) == 1 and long.remaining == 5
    answers = iter([False, True])
    ran = run_round(engine, [], [long], until=lambda: next(answers))
    assert (ran.steps, ran.images, long.remaining) == (2, None, 3)  # the loop wants a say
    assert run_round(engine, [], [long]).steps == 1  # no `until`: one step
    calls = 0

    def second_step_fails(items: object) -> None:
        nonlocal calls
        calls += 1
        if calls == 2:
            raise RuntimeError("boom")

    engine.fail = second_step_fails
    ran = run_round(engine, [], [long], until=lambda: False)
    assert ran.steps == 1 and isinstance(ran.step_error, RuntimeError)


async def test_a_lone_item_runs_its_steps_in_one_engine_call() -> None:
    """Nothing changes while it runs: no hop to the event loop between its steps."""
    engine = FakeStepEngine()
    async with in_process(engine, flush_policy="continuous") as app:  # type: ignore[arg-type]
        submitted = app.service.worker.submit
        calls = 0

        def counting(call: object) -> object:
            nonlocal calls
            calls += 1
            return submitted(call)  # type: ignore[arg-type]

        app.service.worker.submit = counting  # type: ignore[method-assign]
        resp = await app.client.post("/t2i", json=body(1, 12))
        assert resp.status_code == 200 and resp.headers["x-batch-size"] == "1"
        assert engine.steps == [[1]] * 12 and calls == 1
        assert app.metric("batchserve_step_batch_size_count") == 12


async def test_engine_without_step_interface_is_refused_at_start() -> None:
    settings = Settings(model="fake", warmup="", flush_policy="continuous")
    service = Service(settings, engine_factory=lambda _: FakeEngine())
    reasons: list[str] = []
    service.on_fatal = reasons.append
    await service.start()
    try:
        assert await service.wait_loaded() == Service.FAILED
        assert "--flush-policy=continuous" in reasons[0]
        assert "step-wise interface" in reasons[0] and "--model=fake" in reasons[0]
    finally:
        await service.stop()


def test_sim_per_batch_flags_are_refused_under_continuous() -> None:
    with pytest.raises(SettingsError, match="--sim-step-ms"):
        Settings(model="sim", flush_policy="continuous", sim_base_ms=100)
    Settings(model="sim", flush_policy="continuous", sim_step_ms=25, sim_step_per_image_ms=15)


def test_sigterm_drains_running_and_queued_items_then_exits_0(tmp_path: Path) -> None:
    # 6 requests of 1 step, 2 at a time, 300 ms a step: at least 2 still queued at the signal.
    with running_server("--model", "sim", "--flush-policy", "continuous", "--sim-step-ms", "300",
                        "--max-batch-size", "2", tmp_path=tmp_path) as server, \
            ThreadPoolExecutor(6) as pool:
        accepted = fire(pool, server, 6)
        wait_for(server, "two running, work queued", lambda: gauge(
            server, "batchserve_active_items") == 2 and gauge(
            server, "batchserve_queue_depth") >= 2)
        sigterm_refuses_new_work(server)
        assert [f.result(timeout=30).status_code for f in accepted] == [200] * 6
        assert exit_code(server) == 0
    assert "Traceback" not in server.log_path.read_text()


def test_queue_overflow_gives_429_under_continuous(tmp_path: Path) -> None:
    with running_server("--model", "sim", "--flush-policy", "continuous", "--sim-step-ms", "100",
                        "--max-batch-size", "2", "--max-queue", "3", "--refusal-hold-s", "0",
                        tmp_path=tmp_path) as server, ThreadPoolExecutor(16) as pool:
        overflow(pool, server, 16)
        server.proc.send_signal(signal.SIGTERM)
        assert exit_code(server) == 0


async def test_a_prompt_stays_masked_in_engine_logs_after_its_client_leaves() -> None:
    """Issue 18 item 10: on the step-wise path the engine thread may log a prompt after its
    client left (the request's own registration ends then): the step call keeps it known."""
    from batchserve.logs import KNOWN_PROMPTS
    from batchserve.schema import validate

    prompt = "a very secret lighthouse drawn at dusk by the sea"
    seen: list[str] = []

    class Logging(FakeStepEngine):
        def step(self, states: object) -> None:
            super().step(states)  # type: ignore[arg-type]
            seen.append(KNOWN_PROMPTS.redact(f"engine says: {prompt}"))

    gate = threading.Event()
    engine = Logging(gate=gate)
    async with in_process(engine, flush_policy="continuous") as app:  # type: ignore[arg-type]
        req = validate({"prompt": prompt, "width": 64, "height": 64, "inference_steps": 1},
                       app.service.limits)
        future = app.service.submit(req, "png")
        await eventually(engine.started.is_set)  # its step is running on the engine thread
        future.cancel()  # the client left
        gate.set()
        await eventually(lambda: bool(seen))
    assert prompt not in seen[0], seen
