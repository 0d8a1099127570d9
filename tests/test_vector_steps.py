"""Scheduler updates of many items in one call (`engines.vector_steps`) against each item's own
`scheduler.step`: the same latents for items at different steps of different schedules."""

from __future__ import annotations

import copy
from typing import Any

import pytest
import torch
from diffusers import DPMSolverMultistepScheduler, EulerAncestralDiscreteScheduler

from batchserve.engines.vector_steps import Update, _group, step_all

BASE = {"num_train_timesteps": 1000, "beta_start": 0.00085, "beta_end": 0.012,
        "beta_schedule": "scaled_linear"}


def _scheduler(steps: int, **config: Any) -> Any:
    scheduler = DPMSolverMultistepScheduler(**BASE, **config)
    scheduler.set_timesteps(steps)
    return scheduler


def _run(schedulers: list[Any], starts: list[int], steps: int, together: bool,
         dtype: torch.dtype = torch.float32) -> list[torch.Tensor]:
    """Every item steps `steps` times from its own start offset (items join part-way); model
    outputs are a fixed function of the latents so both paths see the same inputs."""
    gen = torch.Generator().manual_seed(0)
    latents = [torch.randn(1, 4, 8, 8, generator=gen).to(dtype) for _ in schedulers]
    weights = torch.randn(1, 4, 8, 8, generator=gen).to(dtype)
    index = [-s for s in starts]  # an item enters once its index reaches 0
    for _ in range(steps):
        live = [n for n, i in enumerate(index) if 0 <= i < len(schedulers[n].timesteps)]
        updates = [Update(schedulers[n], torch.tanh(latents[n] * weights),
                          schedulers[n].timesteps[index[n]], latents[n], {}) for n in live]
        if together:
            moved = step_all(updates)
        else:
            moved = [u.scheduler.step(u.output, u.timestep, u.sample, return_dict=False)[0]
                     for u in updates]
        for n, new in zip(live, moved, strict=True):
            latents[n] = new
        index = [i + 1 for i in index]
    return latents


@pytest.mark.parametrize("config", [
    {"use_karras_sigmas": True},  # dpm++2m-karras, the default sampler
    {},
    {"solver_order": 3},
    {"algorithm_type": "dpmsolver", "solver_type": "heun", "final_sigmas_type": "sigma_min"},
    {"prediction_type": "v_prediction", "final_sigmas_type": "zero"},
    {"solver_type": "heun", "use_karras_sigmas": True},
    {"prediction_type": "sample", "final_sigmas_type": "sigma_min"},
    {"solver_order": 1},
    {"euler_at_final": True, "lower_order_final": False},
])
def test_items_at_different_steps_move_as_their_own_step_moves_them(config: dict[str, Any]
                                                                       ) -> None:
    steps = [20, 20, 12, 30, 8]  # 12 and 8 take the lower-order final steps
    starts = [0, 3, 3, 7, 11]
    alone = _run([_scheduler(s, **config) for s in steps], starts, 40, together=False)
    together = _run([_scheduler(s, **config) for s in steps], starts, 40, together=True)
    for a, b in zip(alone, together, strict=True):
        assert torch.equal(b, a)  # bit-identical on CPU


def test_the_default_sampler_is_fused_for_every_order_in_one_update() -> None:
    """Items at their first (first-order), middle (second-order) and last (first-order, zero
    final sigma) steps of different schedules share one update."""
    schedulers = [_scheduler(s, use_karras_sigmas=True) for s in (20, 30, 12)]
    for scheduler, index in zip(schedulers, (0, 11, 11), strict=True):
        scheduler._step_index = index
        scheduler.lower_order_nums = min(index, 2)
        scheduler.model_outputs = [torch.ones(1, 4, 8, 8)] * 2
    sample = torch.ones(1, 4, 8, 8)
    groups = {_group(Update(s, sample, s.timesteps[0], sample, {})) for s in schedulers}
    assert len(groups) == 1 and None not in groups


def test_updates_it_cannot_share_go_through_their_own_step() -> None:
    euler = EulerAncestralDiscreteScheduler(**BASE)
    euler.set_timesteps(10)
    sample = torch.zeros(1, 4, 8, 8)
    assert _group(Update(euler, sample, euler.timesteps[0], sample, {})) is None
    dpm = _scheduler(10)
    half = sample.half()
    assert _group(Update(dpm, half, dpm.timesteps[0], half, {})) is None  # fp16: per item
    sde = _scheduler(10, algorithm_type="sde-dpmsolver++")
    assert _group(Update(sde, sample, sde.timesteps[0], sample, {})) is None
    # an ancestral sampler's noise comes from each item's own generator, as alone
    schedulers = [copy.deepcopy(euler) for _ in range(3)]
    gens = [torch.Generator().manual_seed(n) for n in range(3)]
    out = step_all([Update(s, sample, s.timesteps[0], sample, {"generator": g})
                    for s, g in zip(schedulers, gens, strict=True)])
    again = [copy.deepcopy(euler).step(sample, euler.timesteps[0], sample,
                                       generator=torch.Generator().manual_seed(n),
                                       return_dict=False)[0] for n in range(3)]
    for a, b in zip(out, again, strict=True):
        assert torch.equal(a, b)
