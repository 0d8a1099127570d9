"""AUTOMATIC1111's API: `POST /sdapi/v1/txt2img`, `POST /sdapi/v1/img2img` and the listing routes
its clients call first.

A translation onto the one request. A1111 ignores fields it does not know, and clients send many
(`url`, `auth`, `styles: []`, `override_settings`, `hr_*` with `enable_hr: false`, ...), so
unknown fields are ignored here too; but a value that would change the picture in a way we
cannot honour (`enable_hr: true`, `restore_faces: true`, an `alwayson_scripts` entry, ...) is
refused with a 422 naming it, never answered with a silently different image.

img2img takes what maps onto our request: one init image stretched to width x height
(`resize_mode` 0; when they are absent the model family's size, as for txt2img: A1111's 512x512
on SD 1.x, 1024x1024 on SDXL, never the init image's), `denoising_strength`, and with a
`mask` the inpainting A1111 calls "whole picture" with masked content "original"
(`inpaint_full_res` false, `inpainting_fill` 1), `mask_blur`, `inpainting_mask_invert`. A1111's
defaults for those two are "only masked" and "fill", so an inpainting client must send both;
anything else is refused with a 422 that says what to send.

Errors use the shape of A1111's own exception handler (a FastAPI app):
`{"error": <class name>, "detail": <message>, "body": "", "errors": <message>}`.
"""

from __future__ import annotations

import base64
import re
from functools import partial
from pathlib import PurePath
from typing import Any

import orjson
from starlette.requests import Request
from starlette.responses import Response

from ..errors import BatchServeError, ValidationError
from ..images import MaskRule
from ..progress import BATCH
from ..samplers import ALL_SAMPLERS, FLOW_SAMPLERS, SAMPLERS
from ..schema import FIELDS, MAX_SEED, Limits, T2IRequest, decode, repeat, validate
from ..service import Service
from .common import Gateway, Generated, JSONResponse, error_headers

MAX_IMAGES = 16  # batch_size * n_iter per request
# A1111 sampler name (lower case) -> (our sampler on a uniform schedule, ours on Karras).
SAMPLER_FAMILIES: dict[str, tuple[str, str | None]] = {
    "dpm++ 2m": ("dpm++2m", "dpm++2m-karras"),
    "euler a": ("euler-a", None),
    "euler": ("euler", None),
    "ddim": ("ddim", None),
    "heun": ("heun", None),
    "unipc": ("unipc", None),
}
A1111_NAMES = {"dpm++ 2m": "DPM++ 2M", "euler a": "Euler a", "euler": "Euler", "ddim": "DDIM",
               "heun": "Heun", "unipc": "UniPC"}
LEGACY = {"dpm++ 2m karras": "dpm++2m-karras"}  # A1111 < 1.9 folded the schedule into the name
# "automatic" is the sampler's usual schedule: Karras for DPM++ 2M, uniform for the others.
SCHEDULERS = {"automatic": "Automatic", "uniform": "Uniform", "normal": "Normal",
              "karras": "Karras"}
_MAPPED = {"prompt": "prompt", "negative_prompt": "negative_prompt", "steps": "inference_steps",
           "cfg_scale": "guidance_scale", "width": "width", "height": "height"}
_ALIASES = {ours: theirs for theirs, ours in _MAPPED.items()}
# Options that change the image: refused when set to anything but their neutral value.
_REFUSED_TRUE = ("enable_hr", "restore_faces", "tiling")
# img2img's modes, by A1111's numbers; the served one of each is the first.
RESIZE_MODES = {0: "just resize", 1: "crop and resize", 2: "resize and fill",
                3: "just resize (latent upscale)"}
INPAINTING_FILLS = {1: "original", 0: "fill", 2: "latent noise", 3: "latent nothing"}
IMAGE_FIELDS = ("init_images", "mask")


def render_error(exc: BatchServeError) -> Response:
    body = {"error": type(exc).__name__, "detail": exc.message, "body": "", "errors": exc.message}
    return JSONResponse(body, status_code=exc.status, headers=error_headers(exc))


def sampler_for(name: Any, scheduler: Any, default: str,
                served: tuple[str, ...] = SAMPLERS) -> str:
    """A1111's `sampler_name` + `scheduler` to one of our samplers. On a flow-matching model
    (`served` has no classic sampler) "Euler" is its flow-matching Euler, as Forge names it
    for FLUX."""
    if name in (None, ""):
        return default
    ours = _sampler_for(name, scheduler)
    if ours == "euler" and ours not in served and FLOW_SAMPLERS[0] in served:
        return FLOW_SAMPLERS[0]
    return ours


def _sampler_for(name: Any, scheduler: Any) -> str:
    if not isinstance(name, str) or not isinstance(scheduler, str | None):
        raise ValidationError("sampler_name and scheduler must be strings", field="sampler_name")
    key, sched = name.strip().lower(), (scheduler or "automatic").strip().lower()
    if key in LEGACY:
        return LEGACY[key]
    if key in ALL_SAMPLERS and key not in SAMPLER_FAMILIES:  # our own name, e.g. "euler-a"
        return key
    if key not in SAMPLER_FAMILIES:
        raise ValidationError(
            f"sampler_name {name!r} is not served here; served: "
            f"{', '.join(A1111_NAMES.values())} (schedulers: {', '.join(SCHEDULERS.values())})",
            field="sampler_name",
        )
    uniform, karras = SAMPLER_FAMILIES[key]
    if sched not in SCHEDULERS:
        raise ValidationError(
            f"scheduler {scheduler!r} is not served here; served: "
            f"{', '.join(SCHEDULERS.values())}", field="scheduler",
        )
    if sched == "karras" or (sched == "automatic" and karras is not None):
        if karras is None:
            raise ValidationError(
                f"{A1111_NAMES[key]} with the Karras schedule is not served here; use "
                "scheduler Automatic or Uniform", field="scheduler",
            )
        return karras
    return uniform


def _refuse(field: str, why: str) -> ValidationError:
    return ValidationError(f"{field}: {why} is not supported here; the image would differ "
                           "from what you asked for", field=field)


def _refuse_unhonourable(data: dict[str, Any], model: str, clip_skip: int,
                         img2img: bool = False) -> None:
    def refuse(field: str, why: str) -> None:
        raise _refuse(field, why)

    for name in _REFUSED_TRUE:
        if data.get(name):
            refuse(name, f"{name}=true")
    if data.get("init_images") and not img2img:
        refuse("init_images", "init_images on txt2img (use /sdapi/v1/img2img)")
    scripts = data.get("alwayson_scripts")
    if scripts:
        # Its names are the keys of an object; anything else (5, true, a list) is named by
        # its JSON type, never iterated (that was a 500).
        names = ", ".join(map(str, scripts)) if isinstance(scripts, dict) else (
            f"a {type(scripts).__name__} value")
        refuse("alwayson_scripts", f"scripts ({names})")
    if data.get("script_name"):
        refuse("script_name", f"script {data['script_name']!r}")
    if data.get("styles"):
        refuse("styles", "prompt styles")
    strength = data.get("subseed_strength") or 0
    if not isinstance(strength, int | float) or strength > 0:
        refuse("subseed_strength", "variation seeds (subseed_strength > 0)")
    overrides = data.get("override_settings") or {}
    if not isinstance(overrides, dict):
        refuse("override_settings", "override_settings that is not an object")
    checkpoint = overrides.get("sd_model_checkpoint")
    if checkpoint not in (None, "", model):
        refuse("override_settings", f"checkpoint {checkpoint!r} (this server runs {model!r})")
    if overrides.get("CLIP_stop_at_last_layers") not in (None, clip_skip):
        refuse("override_settings", f"CLIP_stop_at_last_layers other than this server's "
               f"--clip-skip {clip_skip}")


def _count(data: dict[str, Any], name: str) -> int:
    value = data.get(name)
    if value is None:
        return 1
    if isinstance(value, bool) or not isinstance(value, int) or not 1 <= value <= MAX_IMAGES:
        raise ValidationError(f"{name} must be an integer between 1 and {MAX_IMAGES}", field=name)
    return value


def translate(
    data: dict[str, Any], limits: Limits, model: str, clip_skip: int = 1,
    refiner: str | None = None,
) -> list[T2IRequest]:
    """An A1111 txt2img body to our requests, one per image (batch_size * n_iter)."""
    _refuse_unhonourable(data, model, clip_skip)
    ours, count = _common(data, limits)
    _map_refiner(data, ours, refiner)
    return repeat(validate(ours, limits, _ALIASES_ALL, count=count), count)


_ALIASES_ALL = {**_ALIASES, "sampler": "sampler_name", "init_image": "init_images",
                "strength": "denoising_strength", "mask_image": "mask",
                "refiner_switch": "refiner_switch_at"}
WATCH_S = 10.0  # previews are made this long after a /progress poll
REFINER_SWITCH_AT = 0.8  # A1111's default when a refiner is named without a switch


def _map_refiner(data: dict[str, Any], ours: dict[str, Any], refiner: str | None) -> None:
    """A1111's `refiner_checkpoint` (the served refiner, by its name or file name, a
    " [hash]" suffix allowed) + `refiner_switch_at` to our `refiner_switch`. No checkpoint (or
    "None", as the web UI sends): no refiner, whatever the switch says."""
    name = data.get("refiner_checkpoint")
    if name in (None, "", "None"):
        return
    if not isinstance(name, str):
        raise ValidationError("refiner_checkpoint must be a string", field="refiner_checkpoint")
    if refiner is None:
        raise ValidationError("refiner_checkpoint: this server has no refiner (start it with "
                              "--refiner)", field="refiner_checkpoint")
    if name.split(" [")[0] not in _refiner_names(refiner):
        raise ValidationError(f"refiner_checkpoint {name!r} is not served here; the refiner "
                              f"is {refiner!r}", field="refiner_checkpoint")
    switch = data.get("refiner_switch_at")
    ours["refiner_switch"] = REFINER_SWITCH_AT if switch is None else switch


def _refiner_names(refiner: str) -> set[str]:
    path = PurePath(refiner)
    return {refiner, path.name, path.stem}


def _common(data: dict[str, Any], limits: Limits) -> tuple[dict[str, Any], int]:
    """What txt2img and img2img share: our fields and the image count."""
    count = _count(data, "batch_size") * _count(data, "n_iter")
    if count > MAX_IMAGES:
        raise ValidationError(f"batch_size * n_iter must be at most {MAX_IMAGES}",
                              field="batch_size")
    ours = {_MAPPED[k]: v for k, v in data.items() if k in _MAPPED and v is not None}
    seed = data.get("seed")
    if seed is not None and seed != -1:  # -1: random, as in A1111
        ours["seed"] = seed
    name = data.get("sampler_name") or data.get("sampler_index")
    ours["sampler"] = sampler_for(name, data.get("scheduler"), limits.default_sampler,
                                  limits.samplers)
    if isinstance(ours.get("prompt"), str):
        ours["prompt"], loras = lora_tags(ours["prompt"])
        if loras:
            ours["loras"] = loras
    return ours, count


_LORA_TAG = re.compile(r"<lora:([^:<>]*)((?::[^:<>]*)*)>", re.IGNORECASE)


def lora_tags(prompt: str) -> tuple[str, list[dict[str, Any]]]:
    """A1111's extra-network syntax: `<lora:NAME>` or `<lora:NAME:WEIGHT>` in the prompt,
    removed from it and returned as our `loras` (names and weights checked by `validate`). A
    separate text-encoder weight (`<lora:NAME:TE:UNET>`) is refused: rows take one scale."""
    picks: list[dict[str, Any]] = []

    def take(match: re.Match[str]) -> str:
        name, rest = match.group(1).strip(), match.group(2)
        weights = [w.strip() for w in rest.split(":")[1:]] if rest else []
        if len(weights) > 1 and len(set(weights)) > 1:
            raise _refuse("prompt", f"<lora:{name}:{':'.join(weights)}> with separate text "
                          "encoder and UNet weights")
        try:
            scale = float(weights[0]) if weights and weights[0] else 1.0
        except ValueError:
            raise ValidationError(f"prompt: <lora:{name}:{weights[0]}>: the weight must be a "
                                  "number", field="prompt") from None
        picks.append({"name": name, "scale": scale})
        return ""

    clean = _LORA_TAG.sub(take, prompt)
    return (" ".join(clean.split()) if picks else prompt), picks


def translate_img2img(
    data: dict[str, Any], limits: Limits, model: str, clip_skip: int = 1,
    refiner: str | None = None,
) -> list[T2IRequest]:
    """An A1111 img2img body to our requests, one per image (batch_size * n_iter). Decodes the
    images: call it off the event loop."""
    _refuse_unhonourable(data, model, clip_skip, img2img=True)
    ours, count = _common(data, limits)
    _map_refiner(data, ours, refiner)
    # A1111's img2img defaults to 512x512 whatever the model: the family's size here, as for
    # txt2img (an SDXL model makes poor 512 images), and never the init image's size.
    ours.setdefault("width", limits.default_size[0])
    ours.setdefault("height", limits.default_size[1])
    ours["init_image"] = _init_image(data)
    mode = data.get("resize_mode")
    if mode not in (None, 0):
        raise _refuse("resize_mode", f"resize_mode {mode!r} "
                      f"({RESIZE_MODES.get(mode, 'unknown') if isinstance(mode, int) else '?'}); "
                      "only 0 (just resize) is served")
    if data.get("denoising_strength") is not None:
        ours["strength"] = data["denoising_strength"]
    if data.get("initial_noise_multiplier") not in (None, 1, 1.0):
        raise _refuse("initial_noise_multiplier", "initial_noise_multiplier other than 1")
    if data.get("latent_mask"):
        raise _refuse("latent_mask", "a latent_mask")
    rule = MaskRule.WHITE
    if data.get("mask"):
        ours["mask_image"] = data["mask"]
        ours["mask_blur"] = _mask_blur(data)
        rule = _inpainting(data)
    return repeat(validate(ours, limits, _ALIASES_ALL, count=count, masks=rule), count)


def _init_image(data: dict[str, Any]) -> Any:
    images = data.get("init_images")
    if not isinstance(images, list) or not images:
        raise ValidationError("init_images must be a list holding one base64 image",
                              field="init_images")
    if len(images) > 1:
        raise _refuse("init_images", f"{len(images)} init images (one per request)")
    return images[0]


def _mask_blur(data: dict[str, Any]) -> Any:
    """A1111's `mask_blur` sets both `mask_blur_x` and `mask_blur_y` (default 4 each); we blur
    the same in both directions."""
    if data.get("mask_blur") is not None:
        return data["mask_blur"]
    x, y = data.get("mask_blur_x", 4), data.get("mask_blur_y", 4)
    if x != y:
        raise _refuse("mask_blur_x", "mask_blur_x other than mask_blur_y")
    return x


def _inpainting(data: dict[str, Any]) -> MaskRule:
    """The served inpainting: whole picture, masked content from the init image. A1111's
    defaults (only masked, fill) are refused with what to send instead."""
    fill = data.get("inpainting_fill", 0)
    if fill != 1:
        name = INPAINTING_FILLS.get(fill, "unknown") if isinstance(fill, int) else "?"
        raise _refuse("inpainting_fill", f"inpainting_fill {fill!r} ({name}); send "
                      "inpainting_fill: 1 (original), the one served")
    if data.get("inpaint_full_res", True) not in (False, 0):
        raise _refuse("inpaint_full_res", "inpaint_full_res true (inpaint area: only masked); "
                      "send inpaint_full_res: false (whole picture), the one served")
    if data.get("mask_round", True) is False:
        raise _refuse("mask_round", "mask_round false (a soft latent mask)")
    invert = data.get("inpainting_mask_invert", 0)
    if invert not in (0, 1, False, True):
        raise ValidationError("inpainting_mask_invert must be 0 or 1",
                              field="inpainting_mask_invert")
    return MaskRule.BLACK if invert else MaskRule.WHITE


def _model_title(service: Service) -> str:
    return service.settings.model


class A1111Door:
    def __init__(self, gateway: Gateway) -> None:
        self.gateway = gateway
        self.service = gateway.service

    async def txt2img(self, request: Request, record: dict[str, Any]) -> Response:
        gateway, service = self.gateway, self.service
        gateway.authorize(request, basic=True)
        gateway.check_admitting()
        body = await gateway.read_json(request)
        try:
            data = decode(body)
            reqs = translate(data, service.limits, _model_title(service),
                             service.settings.clip_skip, service.settings.refiner)
        except BatchServeError as exc:
            raise gateway.rejecting(exc) from None
        return await self._answer(request, record, data, reqs)

    async def img2img(self, request: Request, record: dict[str, Any]) -> Response:
        gateway, service = self.gateway, self.service
        gateway.authorize(request, basic=True)
        gateway.check_admitting()
        body = await gateway.read_json(request, images=IMAGE_FIELDS)
        try:
            data = decode(body)
        except BatchServeError as exc:
            raise gateway.rejecting(exc) from None
        reqs = await gateway.validated(partial(
            translate_img2img, data, service.limits, _model_title(service),
            service.settings.clip_skip, service.settings.refiner), images=True)
        return await self._answer(request, record, data, reqs)

    async def _answer(self, request: Request, record: dict[str, Any], data: dict[str, Any],
                      reqs: list[T2IRequest]) -> Response:
        images = await self.gateway.generate(request, reqs, "png", record)
        send = data.get("send_images", True) is not False
        return JSONResponse({
            "images": [base64.b64encode(g.content).decode() for g in images] if send else [],
            "parameters": self._parameters(data, reqs[0]),
            "info": orjson.dumps(self._info(data, images)).decode(),
        }, headers={"X-Seed": str(reqs[0].seed)})

    def _parameters(self, data: dict[str, Any], req: T2IRequest) -> dict[str, Any]:
        """The request as A1111 echoes it: what was sent, defaults filled in (no secrets); the
        images of an img2img request only with `include_init_images`, as A1111 does."""
        sent = {k: v for k, v in data.items() if k not in ("auth", "url")}
        out = {**sent, "prompt": req.prompt, "negative_prompt": req.negative_prompt,
               "seed": data.get("seed", -1), "steps": req.inference_steps,
               "cfg_scale": req.guidance_scale, "width": req.width, "height": req.height,
               "batch_size": data.get("batch_size", 1), "n_iter": data.get("n_iter", 1),
               "sampler_name": data.get("sampler_name") or req.sampler,
               "scheduler": data.get("scheduler") or "automatic"}
        if req.init is not None:
            out["denoising_strength"] = req.init.strength
            if not data.get("include_init_images"):
                out.update(init_images=None, mask=None)
        return out

    def _info(self, data: dict[str, Any], images: list[Generated]) -> dict[str, Any]:
        first = images[0].request
        seeds = [g.request.seed for g in images]
        return {
            "prompt": first.prompt, "all_prompts": [first.prompt] * len(images),
            "negative_prompt": first.negative_prompt,
            "all_negative_prompts": [first.negative_prompt] * len(images),
            "seed": seeds[0], "all_seeds": seeds, "subseed": -1, "all_subseeds": [-1] * len(seeds),
            "subseed_strength": 0, "width": first.width, "height": first.height,
            "sampler_name": data.get("sampler_name") or first.sampler,
            "scheduler": data.get("scheduler") or "automatic", "batchserve_sampler": first.sampler,
            "cfg_scale": first.guidance_scale, "steps": first.inference_steps,
            "batch_size": data.get("batch_size", 1), "n_iter": data.get("n_iter", 1),
            "restore_faces": False, "sd_model_name": _model_title(self.service),
            "sd_model_hash": None, "clip_skip": self.service.settings.clip_skip,
            "index_of_first_image": 0,
            "infotexts": [self._infotext(g.request) for g in images], "styles": [],
            "version": "batchserve",
            "batchserve": {"batch_sizes": [g.batch_size for g in images],
                           "queue_ms": [g.queue_ms for g in images],
                           "inference_ms": [g.inference_ms for g in images]},
            **({} if first.init is None else {
                "denoising_strength": first.init.strength,
                "mask_blur": first.init.mask_blur if first.init.mask is not None else None}),
        }

    def _infotext(self, req: T2IRequest) -> str:
        negative = f"\nNegative prompt: {req.negative_prompt}" if req.negative_prompt else ""
        edit = ""
        if req.init is not None:
            edit = f", Denoising strength: {req.init.strength:g}"
            if req.init.mask is not None:
                edit += f", Mask blur: {req.init.mask_blur}"
        return (f"{req.prompt}{negative}\nSteps: {req.inference_steps}, Sampler: {req.sampler}, "
                f"CFG scale: {req.guidance_scale:g}, Seed: {req.seed}, "
                f"Size: {req.width}x{req.height}, Model: {_model_title(self.service)}{edit}")

    # -- the listing routes clients call before generating ------------------------------------

    async def sd_models(self, request: Request, record: dict[str, Any]) -> Response:
        self.gateway.authorize(request, basic=True)
        served = [_model_title(self.service)]
        if self.service.settings.refiner:
            served.append(self.service.settings.refiner)
        return JSONResponse([{"title": title, "model_name": title, "hash": None, "sha256": None,
                              "filename": title, "config": None} for title in served])

    async def loras(self, request: Request, record: dict[str, Any]) -> Response:
        """A1111's listing of LoRA networks: the usable files of `--lora-dir` (names as the
        `<lora:NAME:WEIGHT>` prompt syntax takes them; file names only, never server paths)."""
        self.gateway.authorize(request, basic=True)
        library = self.service.loras
        entries = library.entries() if library is not None else {}
        return JSONResponse([{"name": name, "alias": name, "path": e.file.path.name,
                              "metadata": {}} for name, e in entries.items() if e.usable])

    async def refresh_loras(self, request: Request, record: dict[str, Any]) -> Response:
        """Lists `--lora-dir` again now (files added or changed are judged at once)."""
        self.gateway.authorize(request, basic=True)
        if self.service.loras is not None:
            self.service.loras.refresh()
        return JSONResponse(None)

    async def samplers(self, request: Request, record: dict[str, Any]) -> Response:
        self.gateway.authorize(request, basic=True)
        served = self.service.limits.samplers
        if not set(served) & set(SAMPLERS):  # a flow-matching or native-only model
            return JSONResponse([{"name": "Euler" if ours in FLOW_SAMPLERS else ours,
                                  "aliases": [ours], "options": {}} for ours in served])
        return JSONResponse([
            {"name": A1111_NAMES[key], "aliases": [ours for ours in fam if ours],
             "options": {"scheduler": "karras"} if fam[1] else {}}
            for key, fam in SAMPLER_FAMILIES.items()
        ])

    async def schedulers(self, request: Request, record: dict[str, Any]) -> Response:
        self.gateway.authorize(request, basic=True)
        return JSONResponse([{"name": name, "label": label, "aliases": None,
                              "default_rho": -1, "need_inner_model": False}
                             for name, label in SCHEDULERS.items()])

    async def get_options(self, request: Request, record: dict[str, Any]) -> Response:
        self.gateway.authorize(request, basic=True)
        return JSONResponse(self._options())

    def _options(self) -> dict[str, Any]:
        return {"sd_model_checkpoint": _model_title(self.service), "sd_checkpoint_hash": None,
                "samples_format": "png",
                "CLIP_stop_at_last_layers": self.service.settings.clip_skip, "sd_vae": "Automatic"}

    async def set_options(self, request: Request, record: dict[str, Any]) -> Response:
        """Accepted when it names the served model (clients post the whole options dict back);
        the other options do not apply here and are ignored."""
        self.gateway.authorize(request, basic=True)
        data = decode(await self.gateway.read_json(request))
        model = data.get("sd_model_checkpoint")
        if model not in (None, _model_title(self.service)):
            raise ValidationError(
                f"sd_model_checkpoint {model!r} is not served here; this server runs "
                f"{_model_title(self.service)!r}", field="sd_model_checkpoint",
            )
        return JSONResponse(None)

    async def progress(self, request: Request, record: dict[str, Any]) -> Response:
        """The running batch's real progress (its furthest item: step, steps, a preview as
        `current_image` while someone polls, every `--preview-every` steps), the ETA from its
        step rate plus the queue ahead from the last batch times. Polling turns previews on
        for `WATCH_S`."""
        self.gateway.authorize(request, basic=True)
        service = self.service
        board = service.progress
        board.watch(BATCH, WATCH_S)
        live = service.live()
        last = live["last_batch_s"]
        now = board.get(BATCH)
        step = steps = 0
        done = eta = 0.0
        if now is not None:
            step, steps, done = now.step, now.steps, now.fraction
            eta = now.seconds_left()
        elif live["running_batch_size"] and last:  # an engine that reports no steps
            done = min(0.99, live["running_for_s"] / last)
            eta = max(0.0, last - live["running_for_s"])
        if last:
            eta += last * -(-live["queue_depth"] // service.settings.max_batch_size)
        running = now is not None or live["running_batch_size"] > 0
        image = (base64.b64encode(now.preview).decode("ascii")
                 if now is not None and now.preview else None)
        return JSONResponse({
            "progress": round(min(done, 0.999), 3), "eta_relative": round(eta, 3),
            "state": {"skipped": False, "interrupted": False, "job": "", "job_count":
                      live["queue_depth"] + (1 if running else 0), "job_timestamp": "0",
                      "job_no": 0, "sampling_step": step, "sampling_steps": steps},
            "current_image": image, "textinfo": None,
        })

    async def interrupt(self, request: Request, record: dict[str, Any]) -> Response:
        """A no-op: a batch is shared with other clients' images, so one client cannot stop it.
        A client that disconnects still has its queued images dropped."""
        self.gateway.authorize(request, basic=True)
        return JSONResponse(None)


def openapi(limits: Limits) -> dict[str, Any]:
    """This door's paths; the mapped fields come from the shared field definitions."""
    props: dict[str, Any] = {
        theirs: FIELDS[ours].json_schema(limits, description=f"our {ours}: "
                                         + FIELDS[ours].doc)
        for theirs, ours in _MAPPED.items()
    }
    props["seed"] = {"type": "integer", "minimum": -1, "maximum": MAX_SEED,
                     "default": -1, "description": "-1: random"}
    props["sampler_name"] = {"type": "string", "enum": list(A1111_NAMES.values())
                             + list(LEGACY) + list(ALL_SAMPLERS)}
    props["scheduler"] = {"type": "string", "enum": list(SCHEDULERS) + list(SCHEDULERS.values())}
    for name in ("batch_size", "n_iter"):
        props[name] = {"type": "integer", "minimum": 1, "maximum": MAX_IMAGES, "default": 1,
                       "description": f"batch_size * n_iter <= {MAX_IMAGES}; all in one queue"}
    props["refiner_checkpoint"] = {"type": ["string", "null"], "description": "the served "
                                   "--refiner (its name or file name); null or \"None\": none"}
    props["refiner_switch_at"] = FIELDS["refiner_switch"].json_schema(
        limits, default=REFINER_SWITCH_AT, description="with refiner_checkpoint: our "
        "refiner_switch: " + FIELDS["refiner_switch"].doc)
    for name in _REFUSED_TRUE:
        props[name] = {"type": "boolean", "const": False, "description": "true is refused"}
    error = {"description": "an error in A1111's shape",
             "content": {"application/json": {"schema": {
                 "$ref": "#/components/schemas/A1111Error"}}}}
    any_json = {"200": {"description": "OK", "content": {"application/json": {
        "schema": {}}}}, "default": error}

    def route(method: str, summary: str, op: str, **extra: Any) -> dict[str, Any]:
        return {method: {"tags": ["AUTOMATIC1111"], "summary": summary, "operationId": op,
                         "security": [{"bearer": []}, {"basic": []}, {}],
                         "responses": any_json, **extra}}

    edit = _img2img_props(limits)
    return {
        "/sdapi/v1/txt2img": route(
            "post", "Generate images (A1111 txt2img; unknown fields ignored)", "a1111_txt2img",
            requestBody={"required": True, "content": {"application/json": {"schema": {
                "type": "object", "properties": props}}}},
        ),
        "/sdapi/v1/img2img": route(
            "post", "Edit an image: img2img and inpainting (A1111 img2img; unknown fields "
            "ignored)", "a1111_img2img",
            requestBody={"required": True, "content": {"application/json": {"schema": {
                "type": "object", "required": ["init_images"],
                "properties": {**props, **edit}}}}},
        ),
        "/sdapi/v1/sd-models": route("get", "The served model", "a1111_sd_models"),
        "/sdapi/v1/samplers": route("get", "Served samplers, by A1111 name", "a1111_samplers"),
        "/sdapi/v1/loras": route("get", "LoRA files of --lora-dir, usable per request with "
                                 "<lora:NAME:WEIGHT> in the prompt", "a1111_loras"),
        "/sdapi/v1/refresh-loras": route("post", "List --lora-dir again now",
                                         "a1111_refresh_loras"),
        "/sdapi/v1/schedulers": route("get", "Served schedules", "a1111_schedulers"),
        "/sdapi/v1/options": {
            **route("get", "Options (the served model)", "a1111_get_options"),
            **route("post", "Accepted for the served model; 422 for another",
                    "a1111_set_options", requestBody={"content": {"application/json": {
                        "schema": {"type": "object"}}}}),
        },
        "/sdapi/v1/progress": route("get", "Queue and running batch", "a1111_progress"),
        "/sdapi/v1/interrupt": route("post", "No-op (batches are shared)", "a1111_interrupt"),
    }


def _img2img_props(limits: Limits) -> dict[str, Any]:
    """img2img's own fields; the image ones from the shared definitions."""
    image = FIELDS["init_image"].json_schema(limits)
    return {
        "init_images": {"type": "array", "minItems": 1, "maxItems": 1, "items": image,
                        "description": "one init image: " + image["description"]},
        "mask": FIELDS["mask_image"].json_schema(
            limits, description="inpainting mask, init image's size: white (or opaque, on a "
            "transparent canvas) is repainted"),
        "denoising_strength": FIELDS["strength"].json_schema(limits),
        "mask_blur": FIELDS["mask_blur"].json_schema(limits),
        "resize_mode": {"type": "integer", "const": 0, "default": 0,
                        "description": "0: just resize (stretch); others are refused"},
        "inpainting_fill": {"type": "integer", "const": 1, "description": "with a mask: 1 "
                            "(original) is the one served; A1111's default 0 is refused"},
        "inpaint_full_res": {"type": "boolean", "const": False, "description": "with a mask: "
                             "false (whole picture) is the one served; A1111's default true is "
                             "refused"},
        "inpainting_mask_invert": {"type": "integer", "enum": [0, 1], "default": 0,
                                   "description": "1: black is repainted"},
        "include_init_images": {"type": "boolean", "default": False,
                                "description": "echo the init image and mask in parameters"},
        "width": _size_prop(limits, "width"),
        "height": _size_prop(limits, "height"),
    }


def _size_prop(limits: Limits, name: str) -> dict[str, Any]:
    return FIELDS[name].json_schema(limits, description=f"our {name}; when absent the model "
                                    "family's (not the init image's)")


ERROR_SCHEMA = {"type": "object", "properties": {
    "error": {"type": "string"}, "detail": {"type": "string"}, "body": {"type": "string"},
    "errors": {"type": "string"}}}
