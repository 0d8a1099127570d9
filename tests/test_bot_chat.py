"""The bots' conversation core in process: the sizes offered from /v1/info, the limits per
chat and per user with an injected clock, the status texts, edits throttled within a state, and
the drain (the image that can finish does; the rest is cancelled on the server and its chat
told). A fake jobs API moves the jobs; nothing waits for time."""

from __future__ import annotations

import asyncio
from datetime import UTC, datetime

import pytest

from batchserve.bots.chat import (
    SENDING,
    STOPPING,
    ChatJobs,
    Options,
    Quota,
    ServerInfo,
    describe,
    sizes_from_info,
)
from batchserve.bots.client import JobsClient, JobView
from batchserve.bots.settings import BotSettings

from standins.jobs_api import FakeJobsAPI


class Clock:
    def __init__(self, now: float) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


class Recorder:
    """A `Reply` that keeps what a chat would show."""

    def __init__(self) -> None:
        self.statuses: list[str] = []
        self.images: list[tuple[bytes, str, str]] = []
        self.changed = asyncio.Event()

    async def status(self, text: str, *, job_id: str | None = None) -> None:
        self.statuses.append(text)
        self.changed.set()

    async def image(self, data: bytes, caption: str, job_id: str) -> None:
        self.images.append((data, caption, job_id))
        self.changed.set()

    async def until(self, text: str) -> None:
        while not any(s.startswith(text) for s in self.statuses):
            self.changed.clear()
            await self.changed.wait()


@pytest.mark.parametrize(("info", "default", "presets"), [
    ({"sizes": {"default": "768x768", "presets": ["512x512", "768x768"]}},
     "768x768", ("512x512", "768x768")),
    ({"limits": {"max_pixels": 1048576}}, "512x512",
     ("512x512", "768x512", "512x768", "768x768", "1024x1024")),
    ({"limits": {"max_pixels": 8192}}, "64x64", ("64x64", "96x64", "64x96")),
    ({"limits": {"max_pixels": 4096}}, "64x64", ("64x64",)),
])
def test_sizes_come_from_the_server_or_its_pixel_limit(
        info: dict[str, object], default: str, presets: tuple[str, ...]) -> None:
    sizes = sizes_from_info(info)
    assert (sizes.default, sizes.presets) == (default, presets)


def test_one_image_per_chat_and_a_daily_cap_that_resets_at_midnight_utc() -> None:
    clock = Clock(datetime(2026, 3, 1, 22, 30, tzinfo=UTC).timestamp())
    quota = Quota(1, 2, clock=clock)
    assert quota.take("chat", "ada") is None
    assert "already have an image on the way" in (quota.take("chat", "ada") or "")
    assert quota.take("other chat", "ada") is None  # another chat, the same person
    quota.release("chat", "ada", refund=True)  # never accepted by the server: not counted
    quota.release("other chat", "ada", refund=False)
    assert quota.take("chat", "ada") is None
    quota.release("chat", "ada", refund=False)
    refusal = quota.take("chat", "ada")
    assert refusal == ("You have reached today's limit of 2 images. It resets at midnight "
                       "UTC, in 1 h 30 min.")
    clock.now += 2 * 3600  # past midnight UTC
    assert quota.take("chat", "ada") is None


def test_status_texts() -> None:
    assert describe(JobView("j", "queued", position=0)) == "Queued: next in line."
    assert describe(JobView("j", "queued", position=4)) == "Queued: 4 ahead of you."
    assert describe(JobView("j", "running", fraction=0.456)) == "Generating... 46%"
    assert describe(JobView("j", "succeeded", seconds=2.25)) == "Done in 2.2 s."
    assert describe(JobView("j", "canceled")) == "Cancelled."
    assert describe(JobView("j", "running", lost=True)).startswith("Lost contact")


async def jobs_for(api: FakeJobsAPI, **settings: object) -> tuple[ChatJobs, Clock]:
    client = JobsClient("http://batchserve.test", transport=api.transport(), sleep=api.sleep)
    info = ServerInfo(client, 60)
    await info.refresh()
    clock = Clock(100.0)
    bot = BotSettings(fast_steps=2, quality_steps=40, **settings)  # type: ignore[arg-type]
    return ChatJobs(client, bot, info, clock=clock), clock


async def test_the_request_follows_the_chat_options_within_the_server_limits() -> None:
    jobs, _ = await jobs_for(FakeJobsAPI())
    options = Options(size="96x64", mode="quality", seed=42, negative="blur")
    assert jobs.request("a cat", options) == {
        "prompt": "a cat", "width": 96, "height": 64, "inference_steps": 40, "format": "png",
        "negative_prompt": "blur", "seed": 42}
    jobs.info.max_steps = 30
    assert jobs.request("a cat", Options(size="2048x2048", mode="quality"))[
        "inference_steps"] == 30  # and an unoffered size falls back to the default:
    assert jobs.request("a cat", Options(size="2048x2048"))["width"] == 64


async def test_progress_edits_are_throttled_but_a_change_of_state_always_shows() -> None:
    api = FakeJobsAPI()
    jobs, clock = await jobs_for(api, edit_interval_s=5.0)
    reply = Recorder()
    assert jobs.start("chat", "ada", "a cat", Options(), reply) is None
    await reply.until("Queued.")  # its position, read next, is progress within "queued"
    job_id = next(iter(api.jobs))
    api.run(job_id)
    await reply.until("Generating")
    api.progress(job_id, 1, 4)
    await api.next_read()  # read, but 5 s have not passed since "Generating...": not shown
    clock.now += 5
    api.progress(job_id, 3, 4)
    await reply.until("Generating... 75%")
    api.finish(job_id)
    await reply.until("Done")
    await asyncio.gather(*asyncio.all_tasks() - {asyncio.current_task()})
    assert reply.statuses == [SENDING, "Queued.", "Generating...", "Generating... 75%",
                              "Done in 2.5 s."]
    assert [caption for _, caption, _ in reply.images] == ["seed 7 · 64x64 · fast"]


async def test_a_refused_prompt_is_said_and_not_counted() -> None:
    api = FakeJobsAPI()
    from standins.jobs_api import error
    api.script("POST /v1/jobs", error(422, "validation_error", "prompt must not be empty"))
    jobs, _ = await jobs_for(api, daily_limit=1)
    reply = Recorder()
    jobs.start("chat", "ada", " ", Options(), reply)
    await reply.until("The image server did not accept")
    await asyncio.gather(*asyncio.all_tasks() - {asyncio.current_task()})
    assert jobs.quota.take("chat", "ada") is None  # the cap of 1 was not used up


async def test_drain_lets_what_can_finish_finish_and_cancels_the_rest() -> None:
    api = FakeJobsAPI()
    jobs, _ = await jobs_for(api)
    quick, slow = Recorder(), Recorder()
    jobs.start("a", "ada", "quick", Options(), quick)
    jobs.start("b", "bob", "slow", Options(), slow)
    await quick.until("Queued")
    await slow.until("Queued")
    quick_id, slow_id = list(api.jobs)
    hurry = asyncio.Event()
    drain = asyncio.create_task(jobs.drain(600, hurry))
    await asyncio.sleep(0)  # let the drain begin: it stops new prompts at once
    assert jobs.start("c", "cat", "late", Options(), Recorder()) == STOPPING
    api.finish(quick_id)
    await quick.until("Done")
    assert not drain.done()
    hurry.set()  # a second signal
    assert await drain == (1, 1)
    assert quick.images and not slow.images
    assert slow.statuses[-1] == STOPPING
    assert api.jobs[slow_id]["status"] == "canceled"
    assert [r.url.path for r in api.calls("DELETE", "/v1/jobs/")] == [f"/v1/jobs/{slow_id}"]


async def test_cancel_by_the_user_cancels_on_the_server() -> None:
    api = FakeJobsAPI()
    jobs, _ = await jobs_for(api)
    reply = Recorder()
    jobs.start("chat", "ada", "a cat", Options(), reply)
    await reply.until("Queued")
    assert await jobs.cancel("chat") == 1
    await reply.until("Cancelled.")
    await asyncio.gather(*asyncio.all_tasks() - {asyncio.current_task()})
    assert api.jobs[next(iter(api.jobs))]["status"] == "canceled"
    assert jobs.on_the_way("chat") == 0 and await jobs.cancel("chat") == 0


async def test_a_drain_timeout_of_zero_cancels_at_once() -> None:
    api = FakeJobsAPI()
    jobs, _ = await jobs_for(api)
    reply = Recorder()
    jobs.start("chat", "ada", "a cat", Options(), reply)
    await reply.until("Queued")
    assert await jobs.drain(0) == (0, 1)
    assert reply.statuses[-1] == STOPPING
    assert api.jobs[next(iter(api.jobs))]["status"] == "canceled"


class SlowUpload(Recorder):
    """A chat whose photo shows (recorded) before the upload call returns (held)."""

    def __init__(self) -> None:
        super().__init__()
        self.uploaded = asyncio.Event()

    async def image(self, data: bytes, caption: str, job_id: str) -> None:
        await super().image(data, caption, job_id)
        await self.uploaded.wait()


async def test_the_next_prompt_is_taken_as_soon_as_the_image_shows() -> None:
    """One image at a time per chat: the place frees when the image is made, not when the
    chat service answers the upload (a person who sees the photo may type at once)."""
    api = FakeJobsAPI()
    jobs, _ = await jobs_for(api)
    reply = SlowUpload()
    jobs.start("chat", "ada", "a cat", Options(), reply)
    await reply.until("Queued")
    api.finish(next(iter(api.jobs)))
    while not reply.images:
        reply.changed.clear()
        await reply.changed.wait()
    (uploading,) = [run.task for run in jobs._runs]
    assert jobs.start("chat", "ada", "a dog", Options(), Recorder()) is None
    # the upload under way is still one a drain waits for: it finishes, the dog is cancelled
    drain = asyncio.create_task(jobs.drain(600, hurry := asyncio.Event()))
    await asyncio.sleep(0)
    reply.uploaded.set()
    assert uploading is not None
    await uploading
    hurry.set()
    assert await drain == (1, 1)
