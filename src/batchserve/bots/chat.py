"""What both bots do with a prompt, whatever the chat service: the chat's options, the limits
per chat and per user, one job's life shown in one status message, the image, cancel and the
drain on SIGTERM. A bot supplies a `Reply` (how to show a status and an image in its chat).

Guarantees:
- a prompt is either refused at once with a sentence (`ChatJobs.start` returns it; nothing is
  sent to the server) or gets exactly one outcome in its chat: the image, or a sentence saying
  why not (the server's refusal, its failure, a cancel, the bot stopping);
- refused and failed-to-submit prompts do not count against the daily cap;
- on `drain`, jobs on the way may finish until the timeout (or a hurry signal); those that do
  not are cancelled on the server and their chats told.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import math
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Any, Protocol

from .client import JobsClient, JobView, ServerError
from .settings import BotSettings

log = logging.getLogger("batchserve.bots")

MODES = ("fast", "quality")
SENDING = "Sending your prompt to the image server..."
STOPPING = "The bot is restarting. Please send your prompt again in a minute."


class Reply(Protocol):
    """How a bot answers one prompt in its chat. Errors of the chat service propagate."""

    async def status(self, text: str, *, job_id: str | None = None) -> None:
        """Shows `text` as the prompt's status: sent the first time, edited after. `job_id` is
        given while the job can still be cancelled (a bot may offer a button for it)."""

    async def image(self, data: bytes, caption: str, job_id: str) -> None:
        """Sends the finished image with its caption."""


@dataclass(slots=True)
class Options:
    """One chat's choices for its next images."""

    size: str | None = None
    """"WxH"; None: the server's default."""
    mode: str = "fast"
    seed: int | None = None
    """A fixed seed; None: the server draws one per image."""
    negative: str = ""
    last_seed: int | None = None
    """The seed of this chat's last image (offered as "keep this seed")."""


@dataclass(frozen=True, slots=True)
class Sizes:
    default: str
    presets: tuple[str, ...]


SIZES_BEFORE_INFO = Sizes("512x512", ("512x512",))


def sizes_from_info(info: dict[str, Any]) -> Sizes:
    """The sizes a server offers: its `sizes` (`{"default", "presets"}`) when it says, else a
    list derived from `limits.max_pixels` (square, 3:2 and 2:3 at the largest side up to 512,
    then 768 and 1024 squares, each within the limit)."""
    given = info.get("sizes")
    if isinstance(given, dict) and given.get("presets"):
        presets = tuple(str(p) for p in given["presets"])
        default = str(given.get("default") or presets[0])
        return Sizes(default, presets if default in presets else (default, *presets))
    max_pixels = int((info.get("limits") or {}).get("max_pixels") or 512 * 512)
    side = max(64, min(512, math.isqrt(max_pixels) // 64 * 64))
    wide = side * 3 // 2 // 8 * 8
    shapes = [(side, side), (wide, side), (side, wide), (768, 768), (1024, 1024)]
    presets = tuple(dict.fromkeys(
        f"{w}x{h}" for w, h in shapes if w * h <= max_pixels and max(w, h) <= 2048
    ))
    return Sizes(f"{side}x{side}", presets or (f"{side}x{side}",))


class ServerInfo:
    """What the bots read from `/v1/info`: at start and every `refresh_s`, never per message.
    Until the server first answers, `SIZES_BEFORE_INFO`."""

    def __init__(self, client: JobsClient, refresh_s: float) -> None:
        self.client = client
        self.refresh_s = refresh_s
        self.sizes = SIZES_BEFORE_INFO
        self.max_steps: int | None = None

    async def refresh(self) -> bool:
        try:
            info = await self.client.info()
        except ServerError as exc:
            log.warning("could not read the server's /v1/info: %s", exc.sentence)
            return False
        self.sizes = sizes_from_info(info)
        self.max_steps = (info.get("limits") or {}).get("max_steps")
        self.client.forget_capabilities()  # the server may have been upgraded meanwhile
        return True

    async def keep_fresh(self) -> None:
        while True:
            await asyncio.sleep(self.refresh_s)
            await self.refresh()


class Quota:
    """Images on the way per chat, and images asked for per user per UTC day."""

    def __init__(self, max_per_chat: int, daily: int, *,
                 clock: Callable[[], float] = time.time) -> None:
        self.max_per_chat = max_per_chat
        self.daily = daily
        self._clock = clock
        self._running: dict[str, int] = {}
        self._today: dict[str, int] = {}
        self._day = self._date()

    def take(self, chat: str, user: str) -> str | None:
        """Reserves one image for `chat` and `user`; the refusal sentence when over a limit."""
        self._roll()
        running = self._running.get(chat, 0)
        if running >= self.max_per_chat:
            if self.max_per_chat == 1:
                return ("You already have an image on the way. Wait for it or send /cancel, "
                        "then send your next prompt.")
            return (f"You already have {running} images on the way (the most at once). Wait "
                    "for one or send /cancel, then send your next prompt.")
        if self.daily and self._today.get(user, 0) >= self.daily:
            return (f"You have reached today's limit of {self.daily} images. It resets at "
                    f"midnight UTC, in {self._until_midnight()}.")
        self._running[chat] = running + 1
        self._today[user] = self._today.get(user, 0) + 1
        return None

    def release(self, chat: str, user: str, *, refund: bool) -> None:
        """The image reserved by `take` ended; `refund` when the server never accepted it."""
        left = self._running.get(chat, 0) - 1
        if left > 0:
            self._running[chat] = left
        else:
            self._running.pop(chat, None)
        if refund and self._today.get(user, 0) > 0:
            self._today[user] -= 1

    def _date(self) -> str:
        return datetime.fromtimestamp(self._clock(), UTC).date().isoformat()

    def _roll(self) -> None:
        if (today := self._date()) != self._day:
            self._day, self._today = today, {}

    def _until_midnight(self) -> str:
        now = datetime.fromtimestamp(self._clock(), UTC)
        midnight = (now + timedelta(days=1)).replace(hour=0, minute=0, second=0, microsecond=0)
        minutes = max(1, math.ceil((midnight - now).total_seconds() / 60))
        return f"{minutes // 60} h {minutes % 60} min" if minutes >= 60 else f"{minutes} min"


@dataclass(eq=False, slots=True)
class _Run:
    chat: str
    user: str
    reply: Reply
    options: Options
    body: dict[str, Any]
    task: asyncio.Task[None] | None = None
    job_id: str | None = None
    why_cancelled: str = STOPPING
    shown: str = ""
    shown_status: str = ""
    shown_at: float = field(default=-math.inf)
    released: bool = False  # its quota place is given back (`ChatJobs._release`)


class ChatJobs:
    """The prompts of every chat of one bot (the module docstring says what it guarantees)."""

    def __init__(self, client: JobsClient, settings: BotSettings, info: ServerInfo, *,
                 clock: Callable[[], float] = time.monotonic,
                 wall_clock: Callable[[], float] = time.time) -> None:
        self.client = client
        self.settings = settings
        self.info = info
        self.quota = Quota(settings.max_jobs_per_chat, settings.daily_limit, clock=wall_clock)
        self._clock = clock
        self._runs: set[_Run] = set()
        self.stopping = False

    def request(self, prompt: str, options: Options) -> dict[str, Any]:
        """The `POST /v1/jobs` body for `prompt` with the chat's options (the server validates
        it: one validator for every door)."""
        sizes = self.info.sizes
        size = options.size if options.size in sizes.presets else sizes.default
        width, height = (int(n) for n in size.split("x"))
        steps = self.settings.quality_steps if options.mode == "quality" else \
            self.settings.fast_steps
        if self.info.max_steps:
            steps = min(steps, self.info.max_steps)
        body: dict[str, Any] = {"prompt": prompt, "width": width, "height": height,
                                "inference_steps": steps, "format": "png"}
        if options.negative:
            body["negative_prompt"] = options.negative
        if options.seed is not None:
            body["seed"] = options.seed
        return body

    def start(self, chat: str, user: str, prompt: str, options: Options,
              reply: Reply) -> str | None:
        """Starts making an image for `prompt`; a refusal sentence instead when the bot is
        stopping or a limit says no (then nothing is sent to the server)."""
        if self.stopping:
            return STOPPING
        if (refusal := self.quota.take(chat, user)) is not None:
            return refusal
        run = _Run(chat, user, reply, options, self.request(prompt, options))
        run.task = asyncio.create_task(self._run(run), name=f"bot-job-{chat}")
        self._runs.add(run)
        return None

    def on_the_way(self, chat: str) -> int:
        return sum(1 for run in self._runs if run.chat == chat)

    async def cancel(self, chat: str) -> int:
        """Cancels the chat's images on the way; how many."""
        runs = [run for run in self._runs if run.chat == chat]
        for run in runs:
            run.why_cancelled = "Cancelled."
            if run.job_id is None and run.task is not None:
                run.task.cancel()  # not accepted yet: its task cancels the job if one appears
                continue
            with contextlib.suppress(ServerError):
                await self.client.cancel(run.job_id or "")  # the follow loop then shows it
        return len(runs)

    async def drain(self, timeout_s: float, hurry: asyncio.Event | None = None) -> tuple[int, int]:
        """Stops taking prompts; lets the images on the way finish for `timeout_s` (or until
        `hurry` is set), then cancels the rest. Returns (finished, cancelled)."""
        self.stopping = True
        tasks = {run.task for run in self._runs if run.task is not None}
        if tasks:
            # Waiting on `asyncio.wait(tasks)` (not on the tasks) so that giving up on the
            # wait leaves the tasks running until they are cancelled below, each telling its
            # chat.
            waiters: list[asyncio.Future[Any]] = [asyncio.ensure_future(asyncio.wait(tasks))]
            if hurry is not None:
                waiters.append(asyncio.ensure_future(hurry.wait()))
            await asyncio.wait(waiters, timeout=timeout_s, return_when=asyncio.FIRST_COMPLETED)
            for waiter in waiters:
                waiter.cancel()
        left = [run for run in self._runs if run.task is not None and not run.task.done()]
        for run in left:
            run.why_cancelled = STOPPING
            assert run.task is not None
            run.task.cancel()
        await asyncio.gather(*(run.task for run in left if run.task), return_exceptions=True)
        return len(tasks) - len(left), len(left)

    async def _run(self, run: _Run) -> None:
        accepted = False
        try:
            await run.reply.status(SENDING)

            async def busy(wait_s: float) -> None:
                await run.reply.status(
                    f"The image server is busy. Trying again in {math.ceil(wait_s)} s...")

            job = await self.client.submit(run.body, on_wait=busy)
            accepted, run.job_id = True, job.id
            await self._show(run, job)
            async with asyncio.timeout(self.settings.job_timeout_s):
                async for view in self.client.follow(job.id):
                    job = view
                    await self._show(run, view)
            if job.status == "succeeded":
                # The image is no longer on the way once it is made: the chat may send its next
                # prompt as soon as the photo shows, which is before the upload call returns.
                self._release(run, refund=False)
                await self._deliver(run, job)
        except ServerError as exc:
            await self._say(run, exc.sentence)
        except TimeoutError:
            await self._cancel_job(run)
            minutes = math.ceil(self.settings.job_timeout_s / 60)
            await self._say(run, f"This image took longer than {minutes} min and was "
                                 "cancelled. Please try again.")
        except asyncio.CancelledError:
            await self._cancel_job(run)
            await self._say(run, run.why_cancelled)
            raise
        except Exception:
            log.exception("a prompt failed in the bot (chat service or bug)")
            await self._cancel_job(run)
            await self._say(run, "Something went wrong in the bot. Please try again.")
        finally:
            self._release(run, refund=not accepted)
            self._runs.discard(run)  # after the upload: a drain waits for it

    def _release(self, run: _Run, *, refund: bool) -> None:
        """Gives `run`'s place in the quota back, once."""
        if not run.released:
            run.released = True
            self.quota.release(run.chat, run.user, refund=refund)

    async def _deliver(self, run: _Run, job: JobView) -> None:
        data = await self.client.image(job.id)
        run.options.last_seed = job.seed
        await run.reply.image(data, caption(job, run.body, run.options.mode), job.id)

    async def _show(self, run: _Run, view: JobView) -> None:
        """Edits the status when its text changed: a change of state at once, progress within
        a state at most every `edit_interval_s` (chat services rate-limit edits)."""
        text = describe(view)
        if text == run.shown:
            return
        now = self._clock()
        same_state = view.status == run.shown_status and not view.terminal
        if same_state and now - run.shown_at < self.settings.edit_interval_s:
            return
        cancellable = None if view.terminal else view.id
        await run.reply.status(text, job_id=cancellable)
        run.shown, run.shown_status, run.shown_at = text, view.status, now

    async def _cancel_job(self, run: _Run) -> None:
        if run.job_id is None:
            return
        with contextlib.suppress(ServerError, TimeoutError):
            async with asyncio.timeout(5):
                await self.client.cancel(run.job_id)

    async def _say(self, run: _Run, text: str) -> None:
        """A final status; the chat service failing here is logged, never raised."""
        try:
            async with asyncio.timeout(10):
                await run.reply.status(text)
        except Exception:
            log.warning("could not tell a chat how its prompt ended", exc_info=True)


def describe(view: JobView) -> str:
    """A job's state as the status message says it."""
    if view.lost:
        return "Lost contact with the image server. Still trying..."
    if view.status == "queued":
        if view.position is None:
            return "Queued."
        if view.position == 0:
            return "Queued: next in line."
        return f"Queued: {view.position} ahead of you."
    if view.status == "running":
        if view.fraction is not None:
            return f"Generating... {round(100 * view.fraction)}%"
        return "Generating..."
    if view.status == "succeeded":
        return f"Done in {view.seconds:.1f} s." if view.seconds is not None else "Done."
    if view.status == "canceled":
        return "Cancelled."
    return view.error or "The image server could not make this image. Please try again."


def caption(view: JobView, body: dict[str, Any], mode: str) -> str:
    width, height = view.width or body["width"], view.height or body["height"]
    return f"seed {view.seed} · {width}x{height} · {mode}"
