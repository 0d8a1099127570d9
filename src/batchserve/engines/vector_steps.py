"""One scheduler update for many items at once, each at its own step of its own schedule.

The step core gives every item its own scheduler (its own timesteps, history and noise), so a
step of n items made n `scheduler.step` calls: a few hundred microseconds of Python each on a
CPU, a tenth of a small model's step. For DPM-Solver multistep (`dpm++2m`, `dpm++2m-karras`,
the default) the update is elementwise in the latents with coefficients that depend only on
each item's sigmas, so the items that take the same branch of `step` (first, second or third
order this step) are updated in one call of diffusers' own update functions: a shallow copy of
one item's scheduler whose `sigmas` hold, for every item, its sigmas around its own step index
(a [window, n, 1, 1, 1] tensor: each coefficient broadcasts over that item's latents only), and
whose history holds the items' histories stacked. Each item's scheduler then moves on as its
own `step` would have moved it.

Only where that equals the per-item call: deterministic DPM-Solver(++) without thresholding or
learned variance, on float32 latents (a 0-d sigma keeps fp16 latents in fp16 where a sigma
tensor would promote them; fp16 on a GPU, where these calls are a few small kernels, keeps the
per-item `step`). Anything else goes through `scheduler.step` item by item.
"""

from __future__ import annotations

import copy
import weakref
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch

_DETERMINISTIC = ("dpmsolver++", "dpmsolver")
_WINDOW = 2  # sigma rows before the step index that a third-order update reads (s2 is i-2)
_WINDOWS: weakref.WeakKeyDictionary[Any, torch.Tensor] = weakref.WeakKeyDictionary()
"""Per scheduler (it lives as long as its item): [steps + 1, _WINDOW + 2], row i its sigmas
from step i - _WINDOW to i + 1, so a step reads an item's window with one index."""


@dataclass(slots=True)
class Update:
    """One item's part of a step: its scheduler, the guided model output, its timestep, its
    latents, and the keyword arguments its `step` takes (generator, eta)."""

    scheduler: Any
    output: torch.Tensor
    timestep: torch.Tensor
    sample: torch.Tensor
    kwargs: dict[str, Any]


def step_all(updates: Sequence[Update]) -> list[torch.Tensor]:
    """Each item's next latents, as its own `scheduler.step` gives them (within float rounding
    of batched kernels), vectorised where `_branch` allows."""
    out: list[torch.Tensor | None] = [None] * len(updates)
    groups: dict[tuple[Any, ...], list[int]] = {}
    for n, update in enumerate(updates):
        branch = _branch(update)
        if branch is None:
            out[n] = _own_step(update)
        else:
            groups.setdefault(branch, []).append(n)
    for branch, members in groups.items():
        if len(members) == 1:
            out[members[0]] = _own_step(updates[members[0]])
            continue
        for n, latents in zip(members, _dpm_together([updates[n] for n in members], branch[-1]),
                              strict=True):
            out[n] = latents
    return [o for o in out if o is not None]


@dataclass(frozen=True, slots=True)
class _Kind:
    """What a scheduler's config decides, read once per scheduler (config reads are slow
    next to a step's arithmetic): the group key of its math (None: not vectorised) and the
    rules of `step`'s choice of order."""

    math: tuple[Any, ...] | None
    solver_order: int = 2
    final_early: bool = False  # the last step is first order whatever the count
    lower_order_final: bool = False


_KINDS: weakref.WeakKeyDictionary[Any, _Kind] = weakref.WeakKeyDictionary()


def _kind(scheduler: Any) -> _Kind:
    kind = _KINDS.get(scheduler)
    if kind is None:
        config = scheduler.config
        if (type(scheduler).__name__ != "DPMSolverMultistepScheduler"
                or config.algorithm_type not in _DETERMINISTIC or config.thresholding
                or config.variance_type in ("learned", "learned_range")):
            kind = _Kind(None)
        else:
            kind = _Kind(
                (config.algorithm_type, config.solver_type, config.prediction_type,
                 bool(getattr(config, "use_flow_sigmas", False)), config.solver_order),
                config.solver_order,
                bool(config.euler_at_final or config.final_sigmas_type == "zero"),
                bool(config.lower_order_final))
        _KINDS[scheduler] = kind
    return kind


def _own_step(u: Update) -> torch.Tensor:
    latents: torch.Tensor = u.scheduler.step(u.output, u.timestep, u.sample, **u.kwargs,
                                             return_dict=False)[0]
    return latents


def _branch(update: Update) -> tuple[Any, ...] | None:
    """The group an item's update can share: the math its scheduler's config selects and the
    order of this step's update; None: its own `step` only."""
    scheduler, sample = update.scheduler, update.sample
    kind = _kind(scheduler)
    if (kind.math is None or sample.dtype != torch.float32
            or update.output.dtype != torch.float32):
        return None
    if scheduler.step_index is None:  # its first step: as `step` starts (begin index or t)
        scheduler._init_step_index(update.timestep)
    index, count = scheduler.step_index, len(scheduler.timesteps)
    # `DPMSolverMultistepScheduler.step`'s choice of update, item by item
    short = kind.lower_order_final and count < 15
    final = index == count - 1 and (kind.final_early or short)
    second = index == count - 2 and short
    if kind.solver_order == 1 or scheduler.lower_order_nums < 1 or final:
        order = 1
    elif kind.solver_order == 2 or scheduler.lower_order_nums < 2 or second:
        order = 2
    else:
        order = 3
    return (*kind.math, sample.device, sample.shape[1:], order)


def _dpm_together(updates: Sequence[Update], order: int) -> list[torch.Tensor]:
    """One update of `order` for items whose schedulers share the math (`_branch`)."""
    first = updates[0].scheduler
    proxy = copy.copy(first)  # shallow: only the attributes set below are its own
    proxy.sigmas = _sigma_window(updates)
    proxy._step_index = _WINDOW
    samples = torch.cat([u.sample for u in updates])
    converted = proxy.convert_model_output(torch.cat([u.output for u in updates]),
                                           sample=samples)
    # each item's history shifted as its `step` shifts it, then stacked (only the last
    # `order` entries are read)
    histories = [[*u.scheduler.model_outputs[1:], converted[n:n + 1]]
                 for n, u in enumerate(updates)]
    samples = samples.to(torch.float32)
    if order == 1:
        prev = proxy.dpm_solver_first_order_update(converted, sample=samples, noise=None)
    else:
        stacked = [torch.cat([h[k] for h in histories]) for k in range(-order, 0)]
        update = (proxy.multistep_dpm_solver_second_order_update if order == 2
                  else proxy.multistep_dpm_solver_third_order_update)
        prev = update(stacked, sample=samples, noise=None)
    prev = prev.to(converted.dtype)
    for n, u in enumerate(updates):
        scheduler = u.scheduler
        scheduler.model_outputs[:] = histories[n]
        if scheduler.lower_order_nums < scheduler.config.solver_order:
            scheduler.lower_order_nums += 1
        scheduler._step_index += 1
    return list(prev.split(1))


def _sigma_window(updates: Sequence[Update]) -> torch.Tensor:
    """[_WINDOW + 2, n, 1, 1, 1]: row _WINDOW + d is each item's sigma at its step index + d
    (d from -_WINDOW to +1; rows before an item's first sigma repeat it and are never read by
    the order its branch takes)."""
    rows = [_windows(u.scheduler)[u.scheduler.step_index] for u in updates]
    window = torch.stack(rows, dim=1).to(updates[0].sample.device)
    return window.reshape(window.shape[0], len(updates), *([1] * (updates[0].sample.dim() - 1)))


def _windows(scheduler: Any) -> torch.Tensor:
    table = _WINDOWS.get(scheduler)
    if table is None:
        sigmas = scheduler.sigmas
        at = (torch.arange(len(sigmas))[:, None] + torch.arange(-_WINDOW, 2)[None, :])
        table = _WINDOWS[scheduler] = sigmas[at.clamp_(0, len(sigmas) - 1)]
    return table
