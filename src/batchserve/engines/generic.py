"""The `generic` engine: any other diffusers text-to-image pipeline (FLUX.1, SD3/3.5, PixArt,
Sana, ...) loaded with diffusers' auto pipeline and run whole by its own `__call__`, one batch of
one key per call, one generator per item (`families.generic` says which pipelines take them).

It has no step-wise interface: the step core (`stepwise`) is written for UNet families, so
`--flush-policy continuous` is refused at start; no per-request LoRA and no inpainting. Items
with an init image run whole through the pipeline's diffusers img2img sibling where one keeps
the seed guarantee (`families.generic.IMG2IMG`; `capabilities` refuses them elsewhere at
validation). The request's `guidance_scale` goes to the
pipeline's own `guidance_scale`: classifier-free guidance for SD3 or PixArt, the guidance input
of a guidance-distilled FLUX.1.
"""

from __future__ import annotations

import dataclasses
import importlib
import inspect
import logging
import time
import traceback
from collections.abc import Sequence
from typing import Any

import torch
from PIL.Image import Image

from ..errors import EngineOutOfMemory
from ..settings import Settings, SettingsError
from .diffusion import (
    _DTYPES,
    COMPILE_MODE,
    Plan,
    _between_steps,
    plan_tuning,
    route_library_logs,
    xformers_available,
)
from .families.generic import (
    IMG2IMG,
    LIST_GENERATORS,
    check_settings,
    samplers_of,
    scheduler_kind,
    served_samplers,
    sizes_of,
)
from .protocol import (
    BatchKey,
    EngineInfo,
    GenerationItem,
    ImageInput,
    OnStep,
    StopCheck,
    warm_batches,
)

log = logging.getLogger("batchserve.engine")

PRESETS = {"tiny-flux": "tiny_flux"}
"""`--model` names of generic pipelines built in code -> their module."""


def auto_dtype(asked: str, *, cuda: bool, bf16: bool) -> str:
    """`--dtype auto` on CUDA is bf16 for generic models where the GPU has it: FLUX, SD3.5 and
    Sana ship in bf16, and their T5 encoders overflow in fp16 (NaN images). Anything asked for
    explicitly stays; on CPU auto stays fp32."""
    return "bf16" if asked == "auto" and cuda and bf16 else asked


def load_pipeline(settings: Settings, torch_dtype: torch.dtype) -> Any:
    """A preset, or a diffusers folder / hub id through diffusers' auto text-to-image pipeline
    (DiffusionPipeline for a pipeline the auto mapping does not list)."""
    import diffusers

    model = settings.model
    if model in PRESETS:
        pipe = importlib.import_module(f".{PRESETS[model]}", __package__).build_pipeline()
        return pipe if torch_dtype == torch.float32 else pipe.to(dtype=torch_dtype)
    try:
        try:
            return diffusers.AutoPipelineForText2Image.from_pretrained(model,
                                                                       torch_dtype=torch_dtype)
        except ValueError as exc:
            if "AutoPipeline" not in str(exc):
                raise
            return diffusers.DiffusionPipeline.from_pretrained(model, torch_dtype=torch_dtype)
    except (OSError, ValueError) as exc:
        raise SettingsError(f"--model={model}: cannot load it as a diffusers pipeline: "
                            f"{str(exc)[:300]}") from None


class GenericEngine:
    def __init__(self, pipe: Any, plan: Plan, settings: Settings) -> None:
        self.pipe = pipe
        self.plan = plan
        self.settings = settings
        self.pipeline_class = type(pipe).__name__
        self.native = pipe.scheduler  # "native": the checkpoint's own scheduler, untouched
        self.scheduler_config = pipe.scheduler.config
        self.samplers, self.default_sampler = served_samplers(settings.model, settings.scheduler)
        kind = scheduler_kind(type(self.native).__name__, dict(self.scheduler_config))
        if samplers_of(kind) != self.samplers:
            # The doors validated with what disk said before loading (a hub id downloaded only
            # now): they and the engine must agree on the sampler names.
            raise SettingsError(
                f"--model={settings.model}: its scheduler {type(self.native).__name__} takes "
                f"{', '.join(samplers_of(kind))}, not {', '.join(self.samplers)} as read "
                "before loading; download the model before serving it")
        self.sampler = ""  # the one `pipe.scheduler` is built for ("" none yet)
        self.batched = self.pipeline_class in LIST_GENERATORS
        self._takes = frozenset(inspect.signature(pipe.__call__).parameters)
        # img2img: diffusers' sibling pipeline on the same components (no extra memory).
        self.img2img = _img2img(pipe) if self.pipeline_class in IMG2IMG else None

    @classmethod
    def load(cls, settings: Settings) -> GenericEngine:
        check_settings(settings)
        route_library_logs()
        cuda = torch.cuda.is_available()
        on_gpu = cuda and settings.device != "cpu"
        dtype = auto_dtype(settings.dtype, cuda=on_gpu,
                           bf16=on_gpu and torch.cuda.is_bf16_supported())
        plan = plan_tuning(dataclasses.replace(settings, dtype=dtype), cuda=cuda,
                           xformers=xformers_available())
        started = time.perf_counter()
        pipe = load_pipeline(settings, _DTYPES[plan.dtype])
        pipe.set_progress_bar_config(disable=True)
        pipe.to(plan.device)
        _apply(pipe, plan)
        multiple = _size_multiple(pipe)
        doors = sizes_of(settings.model).multiple_of
        if doors % multiple:  # what the doors take (read from disk) the pipeline must take
            raise SettingsError(f"--model={settings.model}: {type(pipe).__name__} takes sizes "
                                f"in multiples of {multiple}, not {doors} as read before "
                                "loading; serve a diffusers folder")
        for w, h, _ in settings.warmup_shapes():
            if w % multiple or h % multiple:
                raise SettingsError(f"--warmup: {w}x{h} must be multiples of {multiple} for "
                                    f"{type(pipe).__name__}")
        log.info("model %s (%s) loaded on %s/%s in %.1f s", settings.model, type(pipe).__name__,
                 plan.device, plan.dtype, time.perf_counter() - started)
        return cls(pipe, plan, settings)

    def info(self) -> EngineInfo:
        return EngineInfo(
            model=self.settings.model,
            device=self.plan.device,
            dtype=self.plan.dtype,
            attention=self.plan.attention,
            scheduler=self.default_sampler,
            demo=self.settings.model in PRESETS,
            tuning=self.plan.switches,
            extra={"family": "generic", "pipeline": self.pipeline_class,
                   "batched": self.batched,
                   "img2img": None if self.img2img is None else type(self.img2img).__name__,
                   "vae_scale_factor": int(getattr(self.pipe, "vae_scale_factor", 8)),
                   "schedulers": list(self.samplers), "refiner": None},
        )

    def warmup(self) -> dict[BatchKey, float]:
        """Each warm-up shape at each warm-up batch size, as `DiffusionEngine.warmup`."""
        return warm_batches(self.generate, self.settings.warmup_shapes(),
                            self.settings.warmup_batch_sizes_on(self.plan.device),
                            self.default_sampler, log.info)

    def generate(
        self, items: Sequence[GenerationItem], should_stop: StopCheck | None = None,
        on_step: OnStep | None = None,
    ) -> list[Image]:
        """One call of the pipeline for the batch (one key), each item with its own generator;
        a pipeline not in `LIST_GENERATORS` is called once per item instead. Items with an init
        image go to the img2img sibling (one call; strength 1 shares the text items' key)."""
        if any(i.init is not None for i in items) and self.img2img is None:
            raise ValueError(f"init_image: {self.pipeline_class} takes text only")
        if any(i.init is not None and i.init.mask is not None for i in items):
            raise ValueError("mask_image: a generic model does no inpainting")
        if any(i.loras for i in items):
            raise ValueError("loras: a generic model serves no per-request LoRA")
        self._use_sampler(items[0].sampler or self.default_sampler)
        if self.plan.device == "cuda":
            torch.cuda.reset_peak_memory_stats()
        try:
            with torch.inference_mode():
                rows = range(len(items))
                calls = ([[n for n in rows if items[n].init is None],
                          [n for n in rows if items[n].init is not None]] if self.batched
                         else [[n] for n in rows])
                made: dict[int, Image] = {}
                for call in filter(None, calls):
                    images = self._call([items[n] for n in call], should_stop, on_step)
                    made.update(zip(call, images, strict=True))
                return [made[n] for n in rows]
        except torch.OutOfMemoryError as exc:
            message = str(exc)
            traceback.clear_frames(exc.__traceback__)
        if self.plan.device == "cuda":
            torch.cuda.empty_cache()
        raise EngineOutOfMemory(message)

    def _call(self, items: Sequence[GenerationItem], should_stop: StopCheck | None,
              on_step: OnStep | None) -> list[Image]:
        first = items[0]
        pipe = self.pipe
        kwargs: dict[str, Any] = {
            "prompt": [i.prompt for i in items],
            "width": first.width, "height": first.height,
            "num_inference_steps": first.inference_steps,
            "guidance_scale": first.guidance_scale,
            "generator": [torch.Generator(self.plan.device).manual_seed(i.seed) for i in items],
            "output_type": "pil",
        }
        if first.init is not None:  # one key: every item starts at the same step
            assert self.img2img is not None
            pipe = self.img2img
            pipe.scheduler = self.pipe.scheduler
            kwargs["image"] = [_picture(i.init) for i in items if i.init is not None]
            kwargs["strength"] = _strength(first.inference_steps, first.start_step)
        if "negative_prompt" in self._takes:
            kwargs["negative_prompt"] = [i.negative_prompt for i in items]
        if "callback_on_step_end" in self._takes and (should_stop or on_step):
            # No latent previews: a generic pipeline's latents (FLUX packs them) have no
            # known RGB projection.
            kwargs["callback_on_step_end"] = _between_steps(should_stop, on_step, "generic")
        return list(pipe(**kwargs).images)

    def _use_sampler(self, sampler: str) -> None:
        """The batch's sampler, built from the checkpoint's own scheduler config."""
        if sampler == self.sampler:
            return
        if sampler not in self.samplers:
            raise ValueError(f"sampler {sampler!r}: this model can use "
                             f"{', '.join(self.samplers)}")
        if sampler == "native":
            self.pipe.scheduler = self.native
        elif sampler == "flow-euler":
            import diffusers

            self.pipe.scheduler = diffusers.FlowMatchEulerDiscreteScheduler.from_config(
                self.scheduler_config)
        else:
            from .diffusion import make_scheduler

            self.pipe.scheduler = make_scheduler(sampler, self.scheduler_config)
        self.sampler = sampler

    def memory_bytes(self) -> tuple[int, int] | None:
        if self.plan.device != "cuda":
            return None
        return torch.cuda.max_memory_allocated(), torch.cuda.memory_reserved()


def _img2img(pipe: Any) -> Any:
    import diffusers

    try:
        sibling = diffusers.AutoPipelineForImage2Image.from_pipe(pipe)
    except ValueError:  # no img2img sibling in this diffusers
        return None
    sibling.set_progress_bar_config(disable=True)
    return sibling


def _picture(init: ImageInput) -> Any:
    """The fitted init image as the PIL image the img2img pipeline preprocesses."""
    from PIL import Image as PILImage

    return PILImage.frombytes("RGB", (init.width, init.height), init.rgb)


def _strength(steps: int, start: int) -> float:
    """The strength for which diffusers' `get_timesteps` (t_start = int(steps - steps *
    strength)) starts at our `start` step: half a step inside it, so float rounding cannot
    move it. Items of one key share `start`, not always their own strength (0.73 and 0.75 of
    20 steps both start at 6 here; diffusers would start 0.73 at 5)."""
    return (steps - start - 0.5) / steps


def _size_multiple(pipe: Any) -> int:
    """What width and height must be multiples of: the VAE's scale factor times the
    transformer's patch size (FLUX, SD3, PixArt: 16)."""
    scale = int(getattr(pipe, "vae_scale_factor", 8))
    model = getattr(pipe, "transformer", None)
    patch = int(getattr(getattr(model, "config", None), "patch_size", 1) or 1)
    if type(pipe).__name__.startswith(("Flux", "Chroma")):
        patch = 2  # FLUX packs 2x2 latent patches itself (its transformer's patch_size is 1)
    return scale * patch


def _apply(pipe: Any, plan: Plan) -> None:
    """The tuning switches that apply to any pipeline: xformers, cuDNN autotuning, compiling
    the denoiser (its transformer, or UNet)."""
    if plan.attention == "xformers":
        pipe.enable_xformers_memory_efficient_attention()
    if plan.enabled("channels_last"):
        for name in ("unet", "vae"):  # convolutional parts only (a transformer has none)
            if getattr(pipe, name, None) is not None:
                getattr(pipe, name).to(memory_format=torch.channels_last)
    if plan.enabled("cudnn_benchmark"):
        torch.backends.cudnn.benchmark = True
    if plan.enabled("torch_compile"):
        name = "transformer" if getattr(pipe, "transformer", None) is not None else "unet"
        setattr(pipe, name, torch.compile(getattr(pipe, name), mode=COMPILE_MODE,
                                          fullgraph=True))
