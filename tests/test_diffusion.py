"""The diffusers engine: tuning plans for CPU and CUDA, schedulers, loading from disk."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from batchserve.engines import GenerationItem, tiny
from batchserve.engines.diffusion import (
    SCHEDULERS,
    DiffusionEngine,
    make_scheduler,
    plan_tuning,
)
from batchserve.errors import Interrupted
from batchserve.settings import Settings, SettingsError

ITEM = GenerationItem("a red cube", "", 7, 64, 64, 2, 7.5)


def switches(plan: object) -> dict[str, tuple[bool, str]]:
    return {s.name: (s.enabled, s.detail) for s in plan.switches}  # type: ignore[attr-defined]


def test_cpu_plan_switches_gpu_tuning_off_with_reasons() -> None:
    plan = plan_tuning(Settings(), cuda=False, xformers=False)
    assert (plan.device, plan.dtype, plan.attention) == ("cpu", "fp32", "sdpa")
    s = switches(plan)
    for name in ("channels_last", "cudnn_benchmark"):
        assert s[name] == (False, "needs CUDA; off on this machine")
    assert s["torch_compile"] == (False, "disabled by setting")  # opt-in; honoured on CPU too
    assert s["fp16"] == (False, "fp32 on CPU")
    assert s["inference_mode"][0] and s["memory_efficient_attention"][0]


def test_cuda_plan_turns_everything_on() -> None:
    plan = plan_tuning(Settings(compile=True), cuda=True, xformers=False)
    assert (plan.device, plan.dtype) == ("cuda", "fp16")
    assert all(enabled for enabled, _ in switches(plan).values())


def test_cuda_plan_respects_switches_turned_off() -> None:
    plan = plan_tuning(Settings(channels_last=False, cudnn_benchmark=False), cuda=True,
                       xformers=True)
    s = switches(plan)
    assert s["channels_last"] == (False, "disabled by setting")
    assert s["cudnn_benchmark"] == (False, "disabled by setting")
    assert s["torch_compile"] == (False, "disabled by setting")


@pytest.mark.parametrize(("cuda", "installed", "backend", "note"), [
    (True, True, "xformers", "xformers memory-efficient attention"),
    (True, False, "sdpa", "xformers not installed"),
    (False, True, "sdpa", "xformers needs CUDA"),
])
def test_xformers_only_when_cuda_and_installed(cuda: bool, installed: bool, backend: str,
                                               note: str) -> None:
    plan = plan_tuning(Settings(attention="xformers"), cuda=cuda, xformers=installed)
    assert plan.attention == backend
    assert note in switches(plan)["memory_efficient_attention"][1]


def test_fp16_on_cpu_falls_back_to_fp32() -> None:
    plan = plan_tuning(Settings(dtype="fp16"), cuda=False, xformers=False)
    assert plan.dtype == "fp32" and "needs CUDA" in switches(plan)["fp16"][1]


def test_device_cuda_without_cuda_fails_clearly() -> None:
    with pytest.raises(SettingsError, match="--device=cuda"):
        plan_tuning(Settings(device="cuda"), cuda=False, xformers=False)


@pytest.fixture(scope="module")
def tiny_engine() -> DiffusionEngine:
    return DiffusionEngine.load(Settings(model="tiny", warmup=""))


def test_tiny_engine_on_cpu_reports_no_gpu_memory(tiny_engine: DiffusionEngine) -> None:
    assert tiny_engine.memory_bytes() is None
    assert tiny_engine.plan.device == "cpu"
    assert tiny_engine.info().to_dict()["vae_scale_factor"] == 8


@pytest.mark.parametrize("steps", [1, 3])
@pytest.mark.parametrize("name", sorted(SCHEDULERS))
def test_every_scheduler_builds_and_generates(tiny_engine: DiffusionEngine, name: str,
                                              steps: int) -> None:
    scheduler = make_scheduler(name, tiny_engine.pipe.scheduler.config)
    original = tiny_engine.pipe.scheduler
    tiny_engine.pipe.scheduler = scheduler
    try:
        (image,) = tiny_engine.generate([GenerationItem("x", "", 1, 64, 64, steps, 7.5)])
    finally:
        tiny_engine.pipe.scheduler = original
    assert image.size == (64, 64)


def test_default_scheduler_is_dpmpp_2m_karras(tiny_engine: DiffusionEngine) -> None:
    config = tiny_engine.pipe.scheduler.config
    assert type(tiny_engine.pipe.scheduler).__name__ == "DPMSolverMultistepScheduler"
    assert config.use_karras_sigmas and config.algorithm_type == "dpmsolver++"


def test_unknown_scheduler_is_a_settings_error(tiny_engine: DiffusionEngine) -> None:
    with pytest.raises(SettingsError, match="--scheduler"):
        make_scheduler("nope", tiny_engine.pipe.scheduler.config)


def test_out_of_memory_becomes_engine_out_of_memory(
    tiny_engine: DiffusionEngine, monkeypatch: pytest.MonkeyPatch
) -> None:
    from batchserve.errors import EngineOutOfMemory

    def oom(**_: object) -> None:
        raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")

    monkeypatch.setattr(tiny_engine, "pipe", oom)
    with pytest.raises(EngineOutOfMemory):
        tiny_engine.generate([ITEM])


def test_saved_tiny_model_loads_by_path_and_matches(tiny_engine: DiffusionEngine,
                                                    tmp_path: Path) -> None:
    """The real `from_pretrained` path, on the tiny model saved with `save_pretrained`."""
    tiny_engine.pipe.save_pretrained(tmp_path / "tiny-sd")
    loaded = DiffusionEngine.load(Settings(model=str(tmp_path / "tiny-sd"), warmup=""))
    assert loaded.info().demo is False
    (a,) = tiny_engine.generate([ITEM])
    (b,) = loaded.generate([ITEM])
    assert np.abs(np.asarray(a, np.int16) - np.asarray(b, np.int16)).max() <= 1


def test_missing_single_file_checkpoint_is_a_clear_error(tmp_path: Path) -> None:
    with pytest.raises(SettingsError, match="no such checkpoint file"):
        DiffusionEngine.load(Settings(model=str(tmp_path / "missing.safetensors"), warmup=""))


def test_should_stop_interrupts_between_steps_and_the_engine_runs_on(
    tiny_engine: DiffusionEngine,
) -> None:
    polls: list[int] = []

    def stop_after_two() -> bool:
        polls.append(1)
        return len(polls) >= 2

    item = GenerationItem("a red cube", "", 7, 64, 64, 6, 7.5)
    with pytest.raises(Interrupted):
        tiny_engine.generate([item], should_stop=stop_after_two)
    assert len(polls) == 2  # polled once per step: stopped after step 2 of 6, no VAE decode
    (image,) = tiny_engine.generate([ITEM], should_stop=lambda: False)
    assert image.size == (64, 64)


def test_gpu_memory_is_the_peak_of_each_batch_on_cuda(monkeypatch: pytest.MonkeyPatch) -> None:
    """On CUDA each batch starts by resetting the peak, and memory_bytes() reports that peak
    (max_memory_allocated), which is what sizes batches near out-of-memory."""
    calls: list[str] = []
    monkeypatch.setattr(torch.cuda, "reset_peak_memory_stats",
                        lambda *a: calls.append("reset"))
    monkeypatch.setattr(torch.cuda, "max_memory_allocated", lambda *a: 7_000)
    monkeypatch.setattr(torch.cuda, "memory_allocated", lambda *a: 1_000)
    monkeypatch.setattr(torch.cuda, "memory_reserved", lambda *a: 9_000)

    class Out:
        images = ("image",)

    class Pipe:  # the tiny model's text side (the engine encodes prompts); denoising recorded
        def __init__(self) -> None:
            real = tiny.build_pipeline()
            self.tokenizer, self.text_encoder, self.unet = (
                real.tokenizer, real.text_encoder, real.unet)

        def __call__(self, **_: object) -> Out:
            calls.append("batch")
            return Out()

    class Generator:
        def __init__(self, device: str) -> None:
            pass

        def manual_seed(self, seed: int) -> Generator:
            return self

    monkeypatch.setattr(torch, "Generator", Generator)
    settings = Settings(warmup="")
    engine = DiffusionEngine(Pipe(), plan_tuning(settings, cuda=True, xformers=False), settings)
    engine.generate([ITEM])
    assert calls == ["reset", "batch"]
    assert engine.memory_bytes() == (7_000, 9_000)


def test_gpu_memory_calls_nothing_of_cuda_on_cpu(tiny_engine: DiffusionEngine,
                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    def no_cuda(*_: object) -> None:
        raise AssertionError("torch.cuda called on a CPU engine")

    for name in ("reset_peak_memory_stats", "max_memory_allocated", "memory_reserved",
                 "empty_cache"):
        monkeypatch.setattr(torch.cuda, name, no_cuda)
    (image,) = tiny_engine.generate([GenerationItem("x", "", 1, 64, 64, 1, 7.5)])
    assert image.size == (64, 64) and tiny_engine.memory_bytes() is None


def test_warmup_runs_every_shape_at_every_warmup_batch_size(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    settings = Settings(warmup="64x64x1,128x64x2", warmup_batch_sizes="1,3", max_batch_size=4)
    engine = DiffusionEngine(tiny.build_pipeline(), plan_tuning(settings, cuda=False,
                                                                xformers=False), settings)
    calls: list[tuple[int, int, int, int]] = []

    def generate(items: list[GenerationItem]) -> list[object]:
        calls.append((items[0].width, items[0].inference_steps, len(items),
                      len({i.seed for i in items})))
        return []

    monkeypatch.setattr(engine, "generate", generate)
    engine.warmup()
    assert calls == [(64, 1, 1, 1), (64, 1, 3, 3), (128, 2, 1, 1), (128, 2, 3, 3)]
