"""One frozen settings object; its field metadata drives CLI flags, env vars and `--help`.

The machinery (`setting`, `load`, `coerce`, `rule`, `check_choices`, `public_view`, and
`cli.add_settings_arguments`) serves any frozen dataclass whose fields are made by `setting`:
the server's `Settings` here, the bots' in `bots.settings`.
"""

from __future__ import annotations

import contextlib
import dataclasses
import os
import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

from .samplers import ALL_SAMPLERS, DEFAULT_SAMPLER

ENV_PREFIX = "BATCHSERVE_"
_SHAPE = re.compile(r"^(\d+)x(\d+)(?:x(\d+))?$")


class SettingsError(ValueError):
    """An invalid setting; the message names the setting and the rule."""


T = TypeVar("T")


def setting(
    default: Any, help: str, *, choices: tuple[str, ...] | None = None, secret: bool = False
) -> Any:
    """One setting: its default, its `--help` text and its allowed values. A `secret` is kept
    out of `repr`, error messages and `public_view`, and may also be read from a file
    (`--NAME-file PATH` / `BATCHSERVE_NAME_FILE`), as container secrets are mounted."""
    return field(default=default, repr=not secret,
                 metadata={"help": help, "choices": choices, "secret": secret})


_opt = setting


@dataclass(frozen=True, slots=True)
class Settings:
    model: str = _opt(
        "tiny", "tiny, tiny-sdxl, tiny-flux, tiny-inpaint, sim, sd15, sdxl, a diffusers folder, a "
        "hub id or a .safetensors file"
    )
    model_family: str = _opt(
        "auto", "the model's architecture: auto (from model_index.json or the file's tensor "
        "names), sd1 (SD 1.x/2.x), sdxl, generic (any other diffusers text-to-image "
        "pipeline: FLUX.1, SD3, PixArt, Sana..., run whole)",
        choices=("auto", "sd1", "sdxl", "generic"),
    )
    model_config: str | None = _opt(
        None, "diffusers folder or hub id giving the config of a single-file checkpoint"
    )
    allow_pickle: bool = _opt(
        False, "load pickle files (.ckpt/.pt/.pth/.bin): they can run code; trusted sources only"
    )
    refiner: str | None = _opt(
        None, "SDXL refiner (a diffusers folder, a single file or tiny-sdxl-refiner), sharing "
        "the base's VAE and second text encoder; a request's refiner_switch hands it the last "
        "steps"
    )
    refiner_config: str | None = _opt(
        None, "diffusers folder or hub id giving the config of a single-file --refiner (as "
        "--model-config does for --model)"
    )
    vae: str | None = _opt(None, "VAE replacing the model's: a diffusers folder or a single file")
    lora: str | None = _opt(
        None, "LoRA files fused into the weights at load: PATH[:SCALE], comma separated"
    )
    lora_dir: str | None = _opt(
        None, "folder of LoRA files requests pick per request (field loras, A1111's "
        "<lora:NAME:SCALE>); name = file stem; rescanned as it changes"
    )
    max_loras_per_request: int = _opt(4, "most LoRAs one request may name (1..16)")
    lora_batching: str = _opt(
        "mixed", "mixed: requests with different LoRAs share a batch, each LoRA applied to its "
        "own rows; split: the LoRA set joins the batching key, as engines without per-row "
        "LoRA batch (for comparison)", choices=("mixed", "split"),
    )
    lora_rescan_s: float = _opt(
        5.0, "--lora-dir is listed again when its listing is older than this (a request naming "
        "an unseen file rescans at once)"
    )
    lora_cache_mb: int = _opt(
        1024, "device memory kept for per-request LoRA weights (LRU; least recently used "
        "adapters leave first)"
    )
    embeddings: str | None = _opt(
        None, "textual-inversion embeddings: a file or a folder of them; token = file name"
    )
    long_prompts: str = _opt(
        "chunk",
        "prompts over 77 tokens: chunk (75-token chunks, like the web UIs) or truncate (cut)",
        choices=("chunk", "truncate"),
    )
    clip_skip: int = _opt(
        1, "CLIP layers to skip, web-UI numbering: 1 = last layer, 2 = penultimate"
    )
    host: str = _opt("127.0.0.1", "bind address")
    port: int = _opt(8000, "bind port")
    device: str = _opt("auto", "cuda if present else cpu", choices=("auto", "cuda", "cpu"))
    dtype: str = _opt(
        "auto", "fp16 on cuda, fp32 on cpu", choices=("auto", "fp16", "bf16", "fp32")
    )
    scheduler: str = _opt(
        DEFAULT_SAMPLER, "default sampler; a request's sampler field picks another; one the "
        "model can use (flow-matching models: flow-euler, which this default gives way to)",
        choices=ALL_SAMPLERS,
    )
    attention: str = _opt(
        "auto", "attention backend", choices=("auto", "sdpa", "xformers", "default")
    )
    channels_last: bool = _opt(True, "channels-last UNet/VAE memory format (CUDA only)")
    channels_last_cpu: bool = _opt(
        False, "channels-last on CPU too (off by default: rarely faster on CPUs; tests use it)"
    )
    cudnn_benchmark: bool = _opt(True, "cudnn.benchmark autotuning (CUDA only)")
    compile: bool = _opt(
        False, "torch.compile the UNet (inductor; on CPU too when asked; slow start)"
    )
    warmup: str = _opt(
        "auto", "warm-up shapes WxH[xSTEPS], comma separated; '' for none; auto: the model "
        "family's default size and half of it, 2 steps each (SD 1.x: 256x256x2,512x512x2)"
    )
    warmup_batch_sizes: str = _opt(
        "auto", "batch sizes warmed up per warm-up shape, comma separated; auto: 1 and "
        "--max-batch-size on CUDA or with --compile (each size cudnn.benchmark and "
        "torch.compile tune for), 1 on CPU (keeps CPU start quick)"
    )
    max_batch_size: int = _opt(8, "flush a group when it holds this many requests")
    max_wait_ms: float = _opt(500.0, "flush a group when its oldest request waited this long")
    flush_policy: str = _opt(
        "deadline",
        "deadline: wait up to max-wait-ms to fill a batch; eager: run at once when idle; "
        "continuous: requests join and leave a running batch between denoising steps",
        choices=("deadline", "eager", "continuous"),
    )
    priority_aging_s: float = _opt(
        5.0, "a queued request gains +1 priority per this many seconds (no starvation)"
    )
    adaptive_batch: str = _opt(
        "on",
        "on: learn per shape the batch time, client patience and a batch cap; refuse at once "
        "what cannot finish in its budget (continuous: answer an item 504 as soon as its steps "
        "left cannot end before its timeout). off: batches always fill to max-batch-size",
        choices=("on", "off"),
    )
    max_queue: int = _opt(256, "queued requests admitted; beyond it 429")
    refusal_hold_s: float = _opt(
        10.0, "a request refused because the queue is full or overloaded is held up to this "
        "long for a place before its 429/503 (clients that retry at once then wait instead "
        "of spinning); 0: refuse at once"
    )
    refusal_hold_max: int = _opt(
        256, "most requests held at once by --refusal-hold-s; beyond it refused at once"
    )
    log_refusals_per_s: float = _opt(
        5.0, "request-log lines per second for refused requests (429/503); the others are "
        "counted in the next line's suppressed field (every accepted request keeps its line)"
    )
    preview_every: int = _opt(
        5, "progress previews (a linear latent-to-RGB projection, no VAE pass) every this many "
        "denoising steps, made only while someone follows the request (job events, A1111's "
        "/sdapi/v1/progress); 0: none"
    )
    request_timeout_s: float = _opt(
        300.0, "default timeout_s: max time from admission to image (queue + generation), "
        "and the most a request may ask for"
    )
    drain_timeout_s: float = _opt(60.0, "grace period on SIGTERM for queued/in-flight requests")
    max_pixels: int = _opt(1048576, "width*height limit")
    max_steps: int = _opt(150, "inference_steps limit")
    max_cost: int = _opt(
        0, "largest width*height*inference_steps one request may ask for (422 beyond); "
        "0: only --max-pixels and --max-steps limit it"
    )
    max_priority: int = _opt(
        10, "highest priority a request may ask for (422 beyond; -10..10)"
    )
    watchdog_factor: float = _opt(
        10.0, "a batch running this many times longer than predicted from measured batches "
        "fails its requests (503) and ends the process, for the orchestrator to restart; 0: off"
    )
    watchdog_min_s: float = _opt(120.0, "the watchdog never fires before a batch ran this long")
    max_body_bytes: int = _opt(65536, "request body limit (413 beyond) of requests without "
                               "an image")
    max_image_bytes: int = _opt(
        16 * 1024 * 1024, "body limit of requests that carry an image (init_image, mask_image, "
        "A1111 init_images, OpenAI edits); 413 beyond, and for a body over --max-body-bytes "
        "that carries none"
    )
    max_input_pixels: int = _opt(
        4096 * 4096, "largest init image or mask, width*height, read from its header before "
        "any pixel is decoded (422 beyond)"
    )
    api_key: str | None = _opt(None, "Bearer key required on /t2i when set", secret=True)
    api_keys: str | None = _opt(
        None, "TOML file of tenants (key or key_sha256, weight, max_queued, images_per_minute, "
        "max_priority per [tenants.NAME]); fair shares and limits per key; re-read on SIGHUP"
    )
    protect_metrics: bool = _opt(False, "require the API key on /metrics too")
    log_prompts: bool = _opt(False, "include prompts in request logs")
    log_level: str = _opt(
        "info", "log level", choices=("debug", "info", "warning", "error")
    )
    encode_workers: int = _opt(2, "threads encoding images off the event loop")
    png_compress_level: int = _opt(1, "PNG zlib level 0-9 (1: fast, images barely shrink more)")
    sim_base_ms: float = _opt(0.0, "--model sim only: a batch of n sleeps base + n*per_image ms")
    sim_per_image_ms: float = _opt(0.0, "--model sim only: per-image engine time in ms")
    sim_step_ms: float = _opt(
        0.0, "--model sim only: one denoising step of n images sleeps step + n*step_per_image ms"
    )
    sim_step_per_image_ms: float = _opt(0.0, "--model sim only: per-image time of one step in ms")
    role: str = _opt(
        "all",
        "all: accept HTTP and generate; api: accept and serve jobs, no model; "
        "worker: load the model and run jobs, serve only health, readiness, metrics and info",
        choices=("all", "api", "worker"),
    )
    queue: str = _opt(
        "memory", "job queue: memory (this process only; lost on restart) or "
        "redis://HOST:PORT/DB (shared by api and worker processes)"
    )
    results: str = _opt(
        "memory", "job result store: memory, file://DIR or s3://BUCKET/PREFIX"
    )
    s3_endpoint_url: str | None = _opt(
        None, "S3 endpoint for s3:// results (MinIO, SeaweedFS, Ceph); AWS when unset"
    )
    result_redirect: bool = _opt(
        False, "GET /v1/jobs/{id}/image answers 302 to a presigned URL when the store gives one"
    )
    job_ttl_s: float = _opt(86400.0, "jobs and their results expire this long after their "
                            "last change, then read as 404")
    job_visibility_timeout_s: float = _opt(
        120.0, "a job held this long by a worker that stopped answering goes to another worker"
    )
    max_jobs_waiting: int = _opt(
        1000, "jobs accepted and not yet taken by a worker (memory or Redis queue); beyond it "
        "POST /v1/jobs answers 429 jobs_queue_full"
    )
    job_max_attempts: int = _opt(3, "deliveries of one job before it fails with worker_lost")
    webhook_secret: str | None = _opt(
        None, "HMAC-SHA256 key signing webhook bodies", secret=True
    )
    webhook_allow_hosts: str = _opt(
        "", "where webhooks may be sent, comma separated: HOST (ports 80 and 443 only) or "
        "HOST:PORT; empty: webhooks refused"
    )
    webhook_allow_private: bool = _opt(
        False, "send webhooks to hosts that resolve to private, loopback or link-local "
        "addresses (refused by default: a webhook must not reach the internal network)"
    )

    def __post_init__(self) -> None:
        for check in _CHECKS:
            check(self)

    @property
    def max_wait_s(self) -> float:
        return self.max_wait_ms / 1000.0

    def warmup_shapes(self) -> list[tuple[int, int, int]]:
        if self.warmup.strip() == "auto":
            from .engines.families import served_sizes  # torch-free; families imports us

            return served_sizes(self.model, self.model_family, self.model_config).warmup()
        return parse_shapes(self.warmup)

    def warmup_batch_sizes_on(self, device: str) -> list[int]:
        """The batch sizes to warm up on `device` ("cuda" or "cpu"), ascending, no repeats."""
        if self.warmup_batch_sizes == "auto":
            # Compiled graphs go dynamic in the batch dimension after two sizes (dynamo's
            # automatic dynamic shapes), so compiling warms two sizes on CPU too.
            tuned = device == "cuda" or self.compile
            return sorted({1, self.max_batch_size}) if tuned else [1]
        return sorted({int(n) for n in self.warmup_batch_sizes.split(",") if n.strip()})

    def lora_specs(self) -> list[tuple[str, float]]:
        return parse_loras(self.lora or "")

    def public(self) -> dict[str, Any]:
        """Settings safe to show (no secrets)."""
        data = public_view(self)
        data["queue"] = _without_password(self.queue)
        return data

    def webhook_hosts(self) -> frozenset[str]:
        return frozenset(
            h.strip().lower() for h in self.webhook_allow_hosts.split(",") if h.strip()
        )

    @classmethod
    def from_sources(
        cls, overrides: Mapping[str, Any] | None = None, env: Mapping[str, str] | None = None
    ) -> Settings:
        """Defaults < environment (`BATCHSERVE_*`) < explicit overrides (CLI flags)."""
        return load(cls, overrides, env)


def load(
    cls: type[T], overrides: Mapping[str, Any] | None = None, env: Mapping[str, str] | None = None
) -> T:
    """An instance of the settings dataclass `cls` from defaults < environment (`BATCHSERVE_*`)
    < explicit overrides (CLI flags; None means not given). A secret may come from a file
    instead: `NAME_file` in the overrides, `BATCHSERVE_NAME_FILE` in the environment."""
    env = os.environ if env is None else env
    given = {k: v for k, v in (overrides or {}).items() if v is not None}
    fields = dataclasses.fields(cls)  # type: ignore[arg-type]
    known = {f.name for f in fields} | {f.name + "_file" for f in fields if is_secret(f)}
    if unknown := sorted(set(given) - known):
        raise SettingsError(f"unknown settings: {', '.join(unknown)}")
    values: dict[str, Any] = {}
    for f in fields:
        raw = env.get(env_name(f.name))
        if raw is not None:
            values[f.name] = coerce(f, raw)
        if is_secret(f):
            _secret_file(values, f, env.get(env_name(f.name) + "_FILE"), env_name(f.name),
                         env_name(f.name) + "_FILE", also=raw is not None)
    for f in fields:
        if f.name in given:
            values[f.name] = given[f.name]
        if is_secret(f):
            _secret_file(values, f, given.get(f.name + "_file"), flag_name(f.name),
                         flag_name(f.name) + "-file", also=f.name in given)
    return cls(**values)


def _secret_file(values: dict[str, Any], f: dataclasses.Field[Any], path: str | None,
                 name: str, file_name: str, *, also: bool) -> None:
    """Reads a secret's file into `values` (stripped: files end with a newline)."""
    if path is None:
        return
    if also:
        raise SettingsError(f"{name} and {file_name} are both set: give one")
    try:
        values[f.name] = Path(path).read_text(encoding="utf-8").strip()
    except (OSError, UnicodeDecodeError) as exc:
        reason = getattr(exc, "strerror", None) or "not UTF-8 text"
        raise SettingsError(f"{file_name}={path!r}: cannot read it ({reason})") from None


def is_secret(f: dataclasses.Field[Any]) -> bool:
    return bool(f.metadata.get("secret"))


def public_view(settings: Any) -> dict[str, Any]:
    """A settings dataclass as a dict safe to show: each secret as "set" or None."""
    data = dataclasses.asdict(settings)
    for f in dataclasses.fields(settings):
        if is_secret(f):
            data[f.name] = "set" if data[f.name] else None
    return data


def env_name(name: str) -> str:
    return ENV_PREFIX + name.upper()


def flag_name(name: str) -> str:
    return "--" + name.replace("_", "-")


def field_type(f: dataclasses.Field[Any]) -> type:
    text = str(f.type)
    for kind in (bool, int, float):
        if text.startswith(kind.__name__):
            return kind
    return str


def coerce(f: dataclasses.Field[Any], raw: str) -> Any:
    kind = field_type(f)
    try:
        if kind is bool:
            return _parse_bool(raw)
        return kind(raw)
    except ValueError:
        raise SettingsError(
            f"{env_name(f.name)}={raw!r}: expected {kind.__name__}"
        ) from None


def _parse_bool(raw: str) -> bool:
    text = raw.strip().lower()
    if text in ("1", "true", "yes", "on"):
        return True
    if text in ("0", "false", "no", "off"):
        return False
    raise ValueError(raw)


def parse_shapes(text: str) -> list[tuple[int, int, int]]:
    shapes = []
    for part in filter(None, (p.strip() for p in text.split(","))):
        match = _SHAPE.match(part)
        if not match:
            raise SettingsError(f"--warmup: {part!r} is not WxH or WxHxSTEPS")
        w, h, steps = match.groups()
        shapes.append((int(w), int(h), int(steps or 2)))
    return shapes


def parse_loras(text: str) -> list[tuple[str, float]]:
    """`PATH[:SCALE],...` (scale 1.0 when absent); a tail that is no number stays in the path."""
    specs = []
    for part in filter(None, (p.strip() for p in text.split(","))):
        path, scale = part, 1.0
        head, _, tail = part.rpartition(":")
        if head:
            with contextlib.suppress(ValueError):
                path, scale = head, float(tail)
        if not -10.0 <= scale <= 10.0:
            raise SettingsError(f"--lora: {part!r}: scale must be -10..10")
        specs.append((path, scale))
    return specs


def rule(name: str, ok: Callable[[Any], bool], text: str) -> Callable[[Any], None]:
    """A check of one field of a settings dataclass; a secret's value is never quoted."""

    def check(s: Any) -> None:
        value = getattr(s, name)
        if not ok(value):
            secret = any(is_secret(f) for f in dataclasses.fields(s) if f.name == name)
            shown = "<hidden>" if secret else repr(value)
            raise SettingsError(f"{flag_name(name)}={shown}: {text}")

    return check


_rule = rule


def _without_password(url: str) -> str:
    """`redis://:secret@host/0` as `redis://***@host/0`, for /v1/info and logs."""
    scheme, sep, rest = url.partition("://")
    if sep and "@" in rest:
        return f"{scheme}://***@{rest.rpartition('@')[2]}"
    return url


def _check_queue(s: Settings) -> None:
    if s.queue != "memory" and not re.match(r"^rediss?://[^/]+", s.queue):
        raise SettingsError(
            f"--queue={_without_password(s.queue)!r}: must be `memory` or redis://HOST:PORT/DB"
        )


def _check_results(s: Settings) -> None:
    scheme, sep, rest = s.results.partition("://")
    if s.results == "memory" or (sep and scheme == "file" and rest):
        return
    if sep and scheme == "s3" and rest.split("/", 1)[0]:
        return
    raise SettingsError(
        f"--results={s.results!r}: must be `memory`, file://DIR or s3://BUCKET/PREFIX"
    )


def _check_roles(s: Settings) -> None:
    # api and worker processes only meet through the shared queue and store.
    if s.role == "all":
        return
    if s.queue == "memory":
        raise SettingsError(
            f"--queue=memory with --role={s.role}: api and worker processes must share a "
            "queue; use --queue redis://HOST:PORT/DB"
        )
    if s.results == "memory":
        raise SettingsError(
            f"--results=memory with --role={s.role}: api and worker processes must share "
            "results; use --results s3://BUCKET/PREFIX or file://DIR on a shared volume"
        )


def _check_webhooks(s: Settings) -> None:
    if s.webhook_hosts() and not s.webhook_secret:
        raise SettingsError(
            "--webhook-allow-hosts is set but --webhook-secret is not: webhooks are always signed"
        )
    for entry in s.webhook_hosts():
        if not _ALLOW_ENTRY.fullmatch(entry):
            raise SettingsError(
                f"--webhook-allow-hosts: {entry!r} must be HOST or HOST:PORT (port 1..65535; "
                "an IPv6 address in brackets: [::1]:8080)")


_ALLOW_ENTRY = re.compile(
    r"(?:[a-z0-9._-]+|\[[0-9a-f:.]+\])"
    r"(?::(?:6553[0-5]|655[0-2]\d|65[0-4]\d\d|6[0-4]\d{3}|[1-5]\d{4}|[1-9]\d{0,3}))?")


def check_choices(s: Any) -> None:
    """Every field with `choices` holds one of them (any settings dataclass)."""
    for f in dataclasses.fields(s):
        choices = f.metadata.get("choices")
        if choices and getattr(s, f.name) not in choices:
            raise SettingsError(
                f"{flag_name(f.name)}={getattr(s, f.name)!r}: must be one of {', '.join(choices)}"
            )


def _check_sim_steps(s: Settings) -> None:
    # The per-batch flags time whole batches only; a step-wise replay must say what a step costs.
    if s.flush_policy == "continuous" and s.model == "sim" and (s.sim_base_ms or
                                                                s.sim_per_image_ms):
        raise SettingsError(
            "--flush-policy=continuous with --model=sim runs step by step: time it with "
            "--sim-step-ms/--sim-step-per-image-ms (--sim-base-ms/--sim-per-image-ms time "
            "whole batches only)"
        )
def _check_lora(s: Settings) -> None:
    if s.lora is not None and not s.lora_specs():  # parsing also checks every scale
        raise SettingsError(f"--lora={s.lora!r}: names no file (PATH[:SCALE], comma separated)")


def _check_lora_dir(s: Settings) -> None:
    if s.lora_dir is not None and not Path(s.lora_dir).is_dir():
        raise SettingsError(f"--lora-dir={s.lora_dir!r}: no such folder")
    if s.lora_dir is not None and s.compile:
        # Hooks come and go as adapters load and leave: a compiled graph would recompile (or
        # ignore them) each time.
        raise SettingsError("--lora-dir does not work with --compile yet: per-request LoRA "
                            "adds and removes layer hooks that a compiled UNet does not see")


def _check_warmup(s: Settings) -> None:
    for w, h, _ in ([] if s.warmup.strip() == "auto" else parse_shapes(s.warmup)):
        if w % 8 or h % 8:
            raise SettingsError(f"--warmup: {w}x{h} must be multiples of 8")
    if s.warmup_batch_sizes == "auto":
        return
    parts = [p.strip() for p in s.warmup_batch_sizes.split(",")]
    if not all(p.isdigit() and 1 <= int(p) <= s.max_batch_size for p in parts):
        raise SettingsError(f"--warmup-batch-sizes={s.warmup_batch_sizes!r}: must be auto or "
                            f"comma-separated sizes 1..{s.max_batch_size} (--max-batch-size)")


def _check_image_limits(s: Settings) -> None:
    if s.max_image_bytes < s.max_body_bytes:
        raise SettingsError(f"--max-image-bytes={s.max_image_bytes} must be >= --max-body-bytes "
                            f"({s.max_body_bytes}): a body with an image is never held to less")
    # Pillow refuses more than twice its own limit (89478485) as a decompression bomb anyway.
    if not 64 * 64 <= s.max_input_pixels <= 2 * 89_478_485:
        raise SettingsError(f"--max-input-pixels={s.max_input_pixels} must be 4096..178956970")


_CHECKS: list[Callable[[Settings], None]] = [
    check_choices,
    _check_warmup,
    _check_sim_steps,
    _check_lora,
    _check_lora_dir,
    _rule("max_loras_per_request", lambda v: 1 <= v <= 16, "must be 1..16"),
    _rule("lora_rescan_s", lambda v: v > 0, "must be > 0"),
    _rule("lora_cache_mb", lambda v: v >= 1, "must be >= 1"),
    _rule("port", lambda v: 0 <= v <= 65535, "must be 0..65535"),
    _rule("clip_skip", lambda v: 1 <= v <= 24, "must be 1..24 (1 = last layer)"),
    _rule("max_batch_size", lambda v: 1 <= v <= 256, "must be 1..256"),
    _rule("max_wait_ms", lambda v: 0 <= v <= 60_000, "must be 0..60000"),
    _rule("priority_aging_s", lambda v: v > 0, "must be > 0"),
    _rule("max_queue", lambda v: v >= 1, "must be >= 1"),
    _rule("request_timeout_s", lambda v: v > 0, "must be > 0"),
    _rule("drain_timeout_s", lambda v: v >= 0, "must be >= 0"),
    _rule("max_pixels", lambda v: v >= 64 * 64, "must be >= 4096 (64x64)"),
    _rule("max_steps", lambda v: 1 <= v <= 1000, "must be 1..1000"),
    _rule("max_cost", lambda v: v >= 0, "must be >= 0"),
    _rule("max_priority", lambda v: -10 <= v <= 10, "must be -10..10"),
    _rule("watchdog_factor", lambda v: v == 0 or v >= 1.5, "must be 0 (off) or >= 1.5"),
    _rule("refusal_hold_s", lambda v: 0 <= v <= 300, "must be 0..300"),
    _rule("refusal_hold_max", lambda v: v >= 0, "must be >= 0"),
    _rule("log_refusals_per_s", lambda v: v >= 0, "must be >= 0"),
    _rule("preview_every", lambda v: 0 <= v <= 1000, "must be 0..1000"),
    _rule("watchdog_min_s", lambda v: v >= 1, "must be >= 1"),
    _rule("max_body_bytes", lambda v: v >= 1024, "must be >= 1024"),
    _check_image_limits,
    _rule("api_key", lambda v: v is None or len(v) >= 8, "must be at least 8 characters"),
    _rule("encode_workers", lambda v: 1 <= v <= 64, "must be 1..64"),
    _rule("png_compress_level", lambda v: 0 <= v <= 9, "must be 0..9"),
    _rule("sim_base_ms", lambda v: v >= 0, "must be >= 0"),
    _rule("sim_per_image_ms", lambda v: v >= 0, "must be >= 0"),
    _rule("sim_step_ms", lambda v: v >= 0, "must be >= 0"),
    _rule("sim_step_per_image_ms", lambda v: v >= 0, "must be >= 0"),
    _check_queue,
    _check_results,
    _check_roles,
    _rule("max_jobs_waiting", lambda v: v >= 1, "must be >= 1"),
    _rule("job_ttl_s", lambda v: v > 0, "must be > 0"),
    _rule("job_visibility_timeout_s", lambda v: v > 0, "must be > 0"),
    _rule("job_max_attempts", lambda v: 1 <= v <= 100, "must be 1..100"),
    _rule("webhook_secret", lambda v: v is None or len(v) >= 16,
          "must be at least 16 characters"),
    _check_webhooks,
]
