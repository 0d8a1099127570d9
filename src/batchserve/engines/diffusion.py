"""The diffusers engine: the only module that imports torch and diffusers.

GPU tuning is planned by a pure function (`plan_tuning`) from the settings and what the machine
has, then applied; each switch that cannot apply (no CUDA, no xformers) is off with a reason that
the startup log and `/v1/info` show.
"""

from __future__ import annotations

import contextlib
import copy
import functools
import importlib
import importlib.util
import logging
import time
import traceback
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from PIL.Image import Image

from ..errors import EngineOutOfMemory, Interrupted
from ..logs import adopt_library_loggers
from ..settings import Settings, SettingsError
from . import checkpoints, families
from .families.base import Family
from .lora.library import LoraLibrary
from .lora.rows import Choice
from .lora.runtime import LoraEvents, LoraRuntime
from .preview import latent_preview
from .prompts import PromptEncoder
from .protocol import (
    BatchKey,
    EngineInfo,
    GenerationItem,
    OnStep,
    StepState,
    StopCheck,
    Switch,
    warm_batches,
)
from .stepwise import StepwiseDiffusion, stage_steps

log = logging.getLogger("batchserve.engine")

# name -> (diffusers class, extra config)
SCHEDULERS: dict[str, tuple[str, dict[str, Any]]] = {
    "dpm++2m-karras": (
        "DPMSolverMultistepScheduler",
        {"algorithm_type": "dpmsolver++", "solver_order": 2, "use_karras_sigmas": True},
    ),
    "dpm++2m": ("DPMSolverMultistepScheduler", {"algorithm_type": "dpmsolver++", "solver_order": 2,
                                                "use_karras_sigmas": False}),
    "unipc": ("UniPCMultistepScheduler", {}),
    "euler": ("EulerDiscreteScheduler", {}),
    "euler-a": ("EulerAncestralDiscreteScheduler", {}),
    "ddim": ("DDIMScheduler", {}),
    "heun": ("HeunDiscreteScheduler", {}),
}
PIPELINES = {"sd1": "StableDiffusionPipeline", "sdxl": "StableDiffusionXLPipeline"}
"""Each served family's diffusers pipeline."""
HUB_PRESETS = {"sdxl": "stabilityai/stable-diffusion-xl-base-1.0"}
"""`--model` names for real checkpoints on the hub."""
PRESETS = {"tiny": "tiny", "tiny-inpaint": "tiny_inpaint", "tiny-sdxl": "tiny_sdxl", "sd15": "sd15"}
"""`--model` names built in code -> their module."""
REFINER_PRESETS = {"tiny-sdxl-refiner"}
"""`--refiner` names built in code (`tiny_sdxl_refiner`)."""
_DTYPES = {"fp16": torch.float16, "bf16": torch.bfloat16, "fp32": torch.float32}
_GPU_ONLY = "needs CUDA; off on this machine"
COMPILE_MODE = "max-autotune-no-cudagraphs"  # the same on CPU (inductor's C++ backend) and CUDA


@dataclass(frozen=True, slots=True)
class Plan:
    device: str
    dtype: str
    attention: str
    switches: tuple[Switch, ...]

    def enabled(self, name: str) -> bool:
        return any(s.name == name and s.enabled for s in self.switches)


def plan_tuning(settings: Settings, *, cuda: bool, xformers: bool) -> Plan:
    """Decides every tuning switch; pure, so the CUDA paths are testable on a CPU machine."""
    if settings.device == "cuda" and not cuda:
        raise SettingsError("--device=cuda: CUDA is not available on this machine")
    device = "cuda" if settings.device == "cuda" or (settings.device == "auto" and cuda) else "cpu"
    on_gpu = device == "cuda"
    dtype, dtype_note = _plan_dtype(settings.dtype, on_gpu)
    attention, attention_note = _plan_attention(settings.attention, on_gpu, xformers)
    shapes = settings.warmup_shapes()

    def gpu(name: str, wanted: bool, what: str, *, on_cpu_too: bool = False) -> Switch:
        if not wanted:
            return Switch(name, False, "disabled by setting")
        if on_cpu_too and not on_gpu:
            return Switch(name, True, f"{what} (on CPU, as asked)")
        return Switch(name, on_gpu, what if on_gpu else _GPU_ONLY)

    sizes = settings.warmup_batch_sizes_on(device)
    warmup = ", ".join(f"{w}x{h}x{n}" for w, h, n in shapes)
    switches = (
        Switch("fp16", dtype == "fp16", dtype_note),
        Switch("memory_efficient_attention", attention in ("sdpa", "xformers"), attention_note),
        gpu("channels_last", settings.channels_last, "UNet and VAE in channels-last layout",
            on_cpu_too=settings.channels_last_cpu),
        gpu("cudnn_benchmark", settings.cudnn_benchmark, "cuDNN autotuner on"),
        # Off by default, so asking for it is explicit: honoured on CPU too (inductor's C++
        # backend compiles the same graph with the same mode and fullgraph as on CUDA).
        gpu("torch_compile", settings.compile, f"UNet compiled (mode={COMPILE_MODE}, fullgraph)",
            on_cpu_too=True),
        Switch("inference_mode", True, "torch.inference_mode around every batch"),
        Switch("warmup", bool(shapes),
               f"{warmup} at batch sizes {', '.join(map(str, sizes))}" if shapes else "none"),
    )
    return Plan(device, dtype, attention, switches)


def _plan_dtype(asked: str, on_gpu: bool) -> tuple[str, str]:
    if asked == "auto":
        return ("fp16", "half precision on CUDA") if on_gpu else ("fp32", "fp32 on CPU")
    if asked == "fp16" and not on_gpu:
        return "fp32", "fp16 needs CUDA; using fp32"
    return asked, f"{asked} as set"


def _plan_attention(asked: str, on_gpu: bool, xformers: bool) -> tuple[str, str]:
    if asked == "default":
        return "default", "plain attention (debugging)"
    if asked == "xformers":
        if not on_gpu:
            return "sdpa", "xformers needs CUDA; using PyTorch SDPA"
        if not xformers:
            return "sdpa", "xformers not installed (pip install 'batchserve[gpu]'); using SDPA"
        return "xformers", "xformers memory-efficient attention"
    return "sdpa", "PyTorch scaled_dot_product_attention"


def xformers_available() -> bool:
    return importlib.util.find_spec("xformers") is not None


def route_library_logs() -> None:
    """diffusers and transformers put a plain-text stderr handler on their loggers when first
    used, and torch stops propagation: send all of them through the one JSON log instead (its
    prompt filter included). Idempotent; the libraries never add their handler twice."""
    from diffusers.utils import logging as diffusers_logging
    from transformers.utils import logging as transformers_logging

    for library in (diffusers_logging, transformers_logging):
        library.disable_default_handler()
        library.enable_propagation()
    adopt_library_loggers()


SCHEDULER_PROTOTYPES = 32
"""(sampler, steps) pairs whose ready scheduler the step-wise engine keeps to copy."""


def make_scheduler(name: str, base_config: Any) -> Any:
    import diffusers

    if name not in SCHEDULERS:
        raise SettingsError(f"--scheduler={name!r}: must be one of {', '.join(SCHEDULERS)}")
    cls_name, extra = SCHEDULERS[name]
    return getattr(diffusers, cls_name).from_config(base_config, **extra)


def load_pipeline(settings: Settings, torch_dtype: torch.dtype, family: str = "sd1") -> Any:
    """`tiny`, a single-file checkpoint, a diffusers folder or a hub id, as `family`'s
    pipeline."""
    import diffusers

    model = settings.model
    if model in PRESETS:
        preset = importlib.import_module(f".{PRESETS[model]}", __package__)
        pipe = preset.build_pipeline()
        return pipe if torch_dtype == torch.float32 else pipe.to(dtype=torch_dtype)
    if model.lower().endswith(checkpoints.WEIGHT_SUFFIXES):
        return checkpoints.load_single_file(settings, torch_dtype, family)
    pipeline = getattr(diffusers, PIPELINES[family])
    extra: dict[str, Any] = (
        {"add_watermarker": False} if family == "sdxl"
        else {"safety_checker": None, "requires_safety_checker": False}
    )
    return pipeline.from_pretrained(HUB_PRESETS.get(model, model), torch_dtype=torch_dtype,
                                    **extra)


class DiffusionEngine:
    def __init__(self, pipe: Any, plan: Plan, settings: Settings,
                 addons: checkpoints.Addons | None = None, scheduler_config: Any = None,
                 refiner: Any = None) -> None:
        self.pipe = pipe
        self.plan = plan
        self.settings = settings
        self.addons = addons or checkpoints.Addons()
        self.family: Family = _family_for(pipe, settings, self.addons)
        self.prompts: PromptEncoder = self.family.prompts  # the (first) text encoder's
        # The checkpoint's own scheduler config: a batch's sampler is built from it (cheap),
        # never from another sampler's (whose extras, e.g. Karras sigmas, would leak).
        self.scheduler_config = scheduler_config
        self.sampler = settings.scheduler  # the one `pipe.scheduler` is now
        # `_scheduler_for`'s ready schedulers, one per (sampler, steps) recently used
        self._prototype = functools.lru_cache(maxsize=SCHEDULER_PROTOTYPES)(self._new_scheduler)
        self.refiner = refiner
        self.refiner_family = None if refiner is None else _refiner_family(refiner, settings,
                                                                           self.addons)
        self._steps = StepwiseDiffusion(pipe, plan.device, self._scheduler_for, self.family,
                                        refiner, self.refiner_family)
        # Per-request LoRA: hooks on the layers adapters touch, only once one is loaded. They
        # apply to the base model only; the refiner runs as loaded (as in A1111).
        self.lora: LoraRuntime | None = None
        if settings.lora_dir:
            self._start_lora()

    @classmethod
    def load(cls, settings: Settings) -> DiffusionEngine:
        route_library_logs()
        plan = plan_tuning(settings, cuda=torch.cuda.is_available(), xformers=xformers_available())
        checkpoints.check_paths(settings)
        family = families.resolve(settings.model_family, settings.model, settings.model_config)
        families.check_refiner(settings, family)
        started = time.perf_counter()
        pipe = load_pipeline(settings, _DTYPES[plan.dtype], family)
        base_config = pipe.scheduler.config
        pipe.scheduler = make_scheduler(settings.scheduler, base_config)
        pipe.set_progress_bar_config(disable=True)
        pipe.to(plan.device)
        addons = checkpoints.apply_addons(pipe, settings)  # before compiling: LoRA edits weights
        refiner = None
        if settings.refiner is not None:
            refiner = load_refiner(settings.refiner, pipe, _DTYPES[plan.dtype],
                                   config=settings.refiner_config,
                                   allow_pickle=settings.allow_pickle)
            refiner.to(plan.device)
            _apply(refiner, plan)
        _apply(pipe, plan)
        log.info("model %s loaded on %s/%s in %.1f s", settings.model, plan.device, plan.dtype,
                 time.perf_counter() - started)
        checkpoints.log_addons(addons, settings)
        return cls(pipe, plan, settings, addons, base_config, refiner)

    def use_loras(self, library: LoraLibrary, events: LoraEvents | None = None) -> None:
        """Serves the LoRA files of `library` per request: judges them against this model."""
        runtime = self._start_lora()
        if events is not None:
            runtime.events = events
        runtime.attach(library)

    def _start_lora(self) -> LoraRuntime:
        """The per-request LoRA runtime, hooked into the step core and every text encoder."""
        if self.lora is None:
            self.lora = LoraRuntime(self.pipe, self.plan.device, self.pipe.unet.dtype,
                                    cache_bytes=self.settings.lora_cache_mb << 20)
            self._steps.lora = self.lora
            for encoder in self.family.encoders:
                encoder.lora = self.lora
        return self.lora

    def info(self) -> EngineInfo:
        return EngineInfo(
            model=self.settings.model,
            device=self.plan.device,
            dtype=self.plan.dtype,
            attention=self.plan.attention,
            scheduler=self.settings.scheduler,
            demo=self.settings.model in PRESETS,
            tuning=self.plan.switches,
            extra={"family": self.family.name,
                   "vae_scale_factor": int(self.pipe.vae_scale_factor),
                   "schedulers": sorted(SCHEDULERS),
                   "refiner": self.settings.refiner,
                   **checkpoints.describe(self.addons, self.settings)},
        )

    def warmup(self) -> dict[BatchKey, float]:
        """Runs each warm-up shape at each warm-up batch size, so cudnn.benchmark has tuned and
        torch.compile has compiled (dynamic in the batch dimension after two sizes) what the
        server will run before /readyz turns 200. Returns each shape's time at batch size 1
        (when warmed at 1), which seeds the adaptive batch-time model."""
        return warm_batches(self.generate, self.settings.warmup_shapes(),
                            self.settings.warmup_batch_sizes_on(self.plan.device),
                            self.settings.scheduler, log.info)

    def generate(
        self, items: Sequence[GenerationItem], should_stop: StopCheck | None = None,
        on_step: OnStep | None = None,
    ) -> list[Image]:
        first = items[0]
        if first.refiner_switch and self.refiner is None:
            raise ValueError("refiner_switch: no refiner loaded (--refiner)")
        if any(i.init is not None for i in items) or self._steps.inpainting_unet:
            return self._generate_in_steps(items, should_stop, on_step)
        generators = [torch.Generator(self.plan.device).manual_seed(i.seed) for i in items]
        sampler = first.sampler or self.settings.scheduler  # one per batch: it joins the key
        if sampler != self.sampler:
            config = self.scheduler_config or self.pipe.scheduler.config
            self.pipe.scheduler = make_scheduler(sampler, config)
            self.sampler = sampler
        step_end, refine_end = ((None, None) if should_stop is None and on_step is None
                                else self._step_ends(first, should_stop, on_step))
        on_gpu = self.plan.device == "cuda"
        if on_gpu:
            torch.cuda.reset_peak_memory_stats()  # memory_bytes() reports this batch's peak
        switch = first.refiner_switch or None
        try:
            loras = self.lora.choices(items) if self.lora is not None else None
            with torch.inference_mode():
                with self.family.conditioning(items, loras) as text, \
                        self._unet_rows(loras, guided=text["negative_prompt_embeds"] is not None):
                    out = self.pipe(
                        **text,
                        width=first.width,
                        height=first.height,
                        num_inference_steps=first.inference_steps,
                        guidance_scale=first.guidance_scale,
                        generator=generators,
                        output_type="latent" if switch else "pil",
                        callback_on_step_end=step_end,
                        **({"denoising_end": switch} if switch else {}),
                    )
                if switch:
                    out = self._refine(items, out.images, generators, switch, refine_end)
        except torch.OutOfMemoryError as exc:
            message = str(exc)
            # The traceback's frames hold the failed attempt's activations: drop them, and
            # free the cache only after leaving the `except` (which keeps `exc` alive).
            traceback.clear_frames(exc.__traceback__)
        else:
            return list(out.images)
        del generators
        self._free_cache()
        raise EngineOutOfMemory(message)

    def _step_ends(self, item: GenerationItem, should_stop: StopCheck | None,
                   on_step: OnStep | None) -> tuple[Any, Any]:
        """The base's and the refiner's step callbacks. With a hand-off both count through
        one total (the refiner's first step is the base's last + 1), as the step core
        (`continuous`) counts it; each pipeline alone would count its own steps from 1."""
        # The refiner's previews too are the base family's: it shares the base's VAE.
        end = functools.partial(_between_steps, should_stop, on_step, self.family.name)
        if not item.refiner_switch:
            return end(), None
        base, later = stage_steps(self._scheduler_for(item), item.refiner_switch)
        return end(total=base + later), end(done=base, total=base + later)

    @contextlib.contextmanager
    def _unet_rows(self, loras: list[Choice] | None, *, guided: bool) -> Iterator[None]:
        """The pipeline's UNet rows: [negatives..., prompts...] with guidance, as it batches."""
        if self.lora is None or loras is None:
            yield
            return
        with self.lora.unet_rows(loras + loras if guided else loras):
            yield

    def _refine(self, items: Sequence[GenerationItem], latents: torch.Tensor,
                generators: list[torch.Generator], switch: float, step_end: Any) -> Any:
        """diffusers' ensemble of experts: the refiner denoises the base's latents from
        `denoising_start=switch`, with the same sampler and the items' generators (which
        continue where the base left them, as when one calls both pipelines in turn)."""
        first = items[0]
        refiner, family = self.refiner, self.refiner_family
        assert refiner is not None and family is not None
        refiner.scheduler = make_scheduler(first.sampler or self.settings.scheduler,
                                           self.scheduler_config or self.pipe.scheduler.config)
        with family.conditioning(items) as text:
            return refiner(
                **text, image=latents, num_inference_steps=first.inference_steps,
                denoising_start=switch, guidance_scale=first.guidance_scale,
                generator=generators, output_type="pil", callback_on_step_end=step_end,
            )

    def _generate_in_steps(
        self, items: Sequence[GenerationItem], should_stop: StopCheck | None,
        on_step: OnStep | None = None,
    ) -> list[Image]:
        """A whole batch through the step core: image items (they share a key, so a start step),
        and every batch of an inpainting UNet, which the text-to-image pipeline cannot run. One
        schedule for all, so they finish together; the same images as alone."""
        if self.plan.device == "cuda":
            torch.cuda.reset_peak_memory_stats()
        states = self._steps.prepare(items)
        total = max(s.remaining for s in states)
        step = 0
        while active := [s for s in states if not s.done]:
            self._steps.step(active)
            step += 1
            if on_step is not None:
                on_step(step, total, lambda i: self.preview(states[i]))
            if should_stop is not None and should_stop():
                raise Interrupted(f"stopped after step {step}")
        return self._steps.finish(states)

    # -- the step-wise interface (`--flush-policy continuous`) ----------------------------

    def prepare(self, items: Sequence[GenerationItem]) -> list[StepState]:
        return self._steps.prepare(items)

    def step(self, states: Sequence[StepState]) -> None:
        self._steps.step(states)

    def preview(self, state: StepState) -> bytes | None:
        """A running item's preview (`preview.latent_preview`) from its latents now."""
        latents = getattr(state, "latents", None)
        if latents is None:
            return None
        # The refiner's latents too: it shares the base's VAE, so its latent space.
        return latent_preview(latents, self.family.name)

    def finish(self, states: Sequence[StepState]) -> list[Image]:
        return self._steps.finish(states)

    def encode_ahead(self, items: Sequence[GenerationItem]) -> None:
        self._steps.encode_ahead(items)

    def _scheduler_for(self, item: GenerationItem) -> Any:
        """A fresh scheduler per item with its timesteps set: its own sampler (the request's,
        else --scheduler), built from the checkpoint's config like a whole batch's. A copy of
        one built once per (sampler, steps): building one (`from_config`) and setting Karras
        timesteps take ~2.5 ms on a CPU, paid by every joiner; the copy ~0.1 ms."""
        return _fresh_copy(self._prototype(item.sampler or self.settings.scheduler,
                                           item.inference_steps))

    def _new_scheduler(self, sampler: str, steps: int) -> Any:
        scheduler = make_scheduler(sampler, self.scheduler_config or self.pipe.scheduler.config)
        scheduler.set_timesteps(steps, device=self.plan.device)
        return scheduler

    def memory_bytes(self) -> tuple[int, int] | None:
        """(peak allocated during the last batch, reserved now); None off CUDA."""
        if self.plan.device != "cuda":
            return None
        return torch.cuda.max_memory_allocated(), torch.cuda.memory_reserved()

    def _free_cache(self) -> None:
        if self.plan.device == "cuda":
            torch.cuda.empty_cache()


def _fresh_copy(scheduler: Any) -> Any:
    """A scheduler of its own for one item: its per-step state (history lists, step index,
    last sample) copied, its tensors (timesteps, sigmas, alphas) and frozen config shared.
    Schedulers replace those tensors (`set_timesteps`, `.to`) and never write into them, and
    copying them was three quarters of a deep copy's time."""
    memo: dict[int, Any] = {id(scheduler.config): scheduler.config}
    for value in vars(scheduler).values():
        if isinstance(value, torch.Tensor):
            memo[id(value)] = value
    return copy.deepcopy(scheduler, memo)


def load_refiner(refiner: str, base: Any, torch_dtype: torch.dtype, *,
                 config: str | None = None, allow_pickle: bool = False) -> Any:
    """The SDXL refiner, sharing the base's VAE and second text encoder (as diffusers'
    ensemble-of-experts recipe loads it): a preset, a single file or a diffusers folder.
    `config` (`--refiner-config`) names the diffusers layout a single file fills."""
    import diffusers

    if refiner in REFINER_PRESETS:
        from .tiny_sdxl_refiner import build_refiner

        return build_refiner(base)
    shared = {"vae": base.vae, "text_encoder_2": base.text_encoder_2,
              "tokenizer_2": base.tokenizer_2, "torch_dtype": torch_dtype,
              "add_watermarker": False}
    if refiner.lower().endswith(checkpoints.WEIGHT_SUFFIXES):
        pipe = checkpoints.load_single_refiner(refiner, config, allow_pickle, **shared)
    else:
        try:
            pipe = diffusers.StableDiffusionXLImg2ImgPipeline.from_pretrained(refiner, **shared)
        except (OSError, ValueError) as exc:
            raise SettingsError(f"--refiner={refiner}: cannot load an SDXL refiner: "
                                f"{str(exc)[:300]}") from None
    pipe.set_progress_bar_config(disable=True)
    return pipe


def _refiner_family(refiner: Any, settings: Settings, addons: checkpoints.Addons) -> Any:
    from .families.sdxl import Refiner

    return Refiner.for_pipeline(refiner, long_prompts=settings.long_prompts,
                                clip_skip=settings.clip_skip, expansions=addons.expansions())


def _family_for(pipe: Any, settings: Settings, addons: checkpoints.Addons) -> Family:
    """The family of a loaded pipeline: SDXL's has a second text encoder."""
    from .families.sd1 import SD1
    from .families.sdxl import SDXL

    options: dict[str, Any] = {"long_prompts": settings.long_prompts,
                               "clip_skip": settings.clip_skip,
                               "expansions": addons.expansions()}
    if getattr(pipe, "text_encoder_2", None) is not None:
        return SDXL.for_pipeline(pipe, **options)
    return SD1(PromptEncoder.for_pipeline(pipe, **options))


def _between_steps(should_stop: StopCheck | None, on_step: OnStep | None, family: str, *,
                   done: int = 0, total: int | None = None) -> Any:
    """A diffusers step-end callback: reports the step (its previews read the latents the
    callback is handed) and raises `Interrupted` once nobody waits (rather than setting
    `pipe._interrupt`, which skips the remaining steps but still runs the VAE decode).
    `done` steps ran before this pipeline (a refiner's base); `total` is the count over
    all (default: this pipeline's own)."""

    def step_end(pipe: Any, step: int, timestep: Any, kwargs: dict[str, Any]) -> dict[str, Any]:
        at = done + step + 1
        if on_step is not None:
            latents = kwargs.get("latents")
            preview = None if latents is None else (
                lambda i: latent_preview(latents[i], family))
            on_step(at, total or int(getattr(pipe, "num_timesteps", 0) or at), preview)
        if should_stop is not None and should_stop():
            raise Interrupted(f"stopped after step {at}")
        return kwargs

    return step_end


def _apply(pipe: Any, plan: Plan) -> None:
    if plan.attention == "xformers":
        pipe.enable_xformers_memory_efficient_attention()
    elif plan.attention == "default":
        from diffusers.models.attention_processor import AttnProcessor

        pipe.unet.set_attn_processor(AttnProcessor())
        pipe.vae.set_attn_processor(AttnProcessor())
    if plan.enabled("channels_last"):
        pipe.unet.to(memory_format=torch.channels_last)
        pipe.vae.to(memory_format=torch.channels_last)
    if plan.enabled("cudnn_benchmark"):
        torch.backends.cudnn.benchmark = True
    if plan.enabled("torch_compile"):
        pipe.unet = torch.compile(pipe.unet, mode=COMPILE_MODE, fullgraph=True)
