"""One scheduler update for many items at once, each at its own step of its own schedule.

The step core gives every item its own scheduler (its own timesteps, history and noise), so a
step of n items made n `scheduler.step` calls: a few hundred microseconds of Python each on a
CPU, a tenth of a small model's step. For DPM-Solver++ multistep of order 1 or 2 (`dpm++2m`,
`dpm++2m-karras`, the default) an update is elementwise in the latents:

    x0   = the model output converted to a data prediction (its prediction type)
    next = A * sample - B * x0 - C * (R * (x0 - previous x0))

with A, B, C, R depending only on the item's sigmas around its step index and the order its
`step` takes there (a first-order step has C = R = 0; its previous x0 is its own, so the last
term is exactly zero). Those four numbers are computed once per (schedule, step, order) with
the operations diffusers' `multistep_dpm_solver_second_order_update` and
`dpm_solver_first_order_update` use, on the same float32 sigmas, and cached, so a step of any
mix of items and orders is a dozen tensor operations for the whole batch, and each item's
result is bit-identical to its own `step` on CPU. Each item's scheduler then moves on as its
`step` would have moved it (history, lower-order count, step index).

Only where that holds: deterministic DPM-Solver++ of order <= 2 without thresholding or learned
variance, on float32 latents (a 0-d sigma keeps fp16 latents in fp16 where a coefficient tensor
would promote them; fp16 on a GPU, where these calls are a few small kernels, keeps the per-item
`step`). Anything else goes through `scheduler.step` item by item.
"""

from __future__ import annotations

import weakref
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch

_PREDICTIONS = ("epsilon", "v_prediction", "sample", "flow_prediction")
_COEFFICIENTS = 4096
"""(schedule, step, order) entries kept: a (sampler, steps) pair has steps x 2 at most."""


@dataclass(slots=True)
class Update:
    """One item's part of a step: its scheduler, the guided model output, its timestep, its
    latents, and the keyword arguments its `step` takes (generator, eta)."""

    scheduler: Any
    output: torch.Tensor
    timestep: torch.Tensor
    sample: torch.Tensor
    kwargs: dict[str, Any]


@dataclass(frozen=True, slots=True)
class _Kind:
    """What a scheduler's config decides, read once per scheduler (config reads are slow next
    to a step's arithmetic): whether its updates can be fused, with what math, and the rules
    of `step`'s choice of order."""

    fused: bool
    prediction: str = "epsilon"
    heun: bool = False  # solver_type "heun" (else "midpoint")
    solver_order: int = 2
    final_early: bool = False  # the last step is first order whatever the count
    lower_order_final: bool = False
    schedule: tuple[Any, ...] = ()
    """What its coefficients depend on besides the step: the math and its sigmas' values
    (items whose schedulers were copied from one prototype share it)."""


_KINDS: weakref.WeakKeyDictionary[Any, _Kind] = weakref.WeakKeyDictionary()
_CACHE: dict[tuple[Any, ...], tuple[float, float, float, float, float, float]] = {}


def step_all(updates: Sequence[Update]) -> list[torch.Tensor]:
    """Each item's next latents, as its own `scheduler.step` gives them, those `_Kind` allows
    in one fused update per device and latent shape."""
    out: list[torch.Tensor | None] = [None] * len(updates)
    groups: dict[tuple[Any, ...], list[int]] = {}
    for n, update in enumerate(updates):
        group = _group(update)
        if group is None:
            out[n] = _own_step(update)
        else:
            groups.setdefault(group, []).append(n)
    for members in groups.values():
        if len(members) == 1:
            out[members[0]] = _own_step(updates[members[0]])
            continue
        for n, latents in zip(members, _fused([updates[n] for n in members]), strict=True):
            out[n] = latents
    return [o for o in out if o is not None]


def _kind(scheduler: Any) -> _Kind:
    kind = _KINDS.get(scheduler)
    if kind is None:
        config = scheduler.config
        if (type(scheduler).__name__ != "DPMSolverMultistepScheduler"
                or config.algorithm_type != "dpmsolver++" or config.solver_order > 2
                or config.solver_type not in ("midpoint", "heun") or config.thresholding
                or config.prediction_type not in _PREDICTIONS
                or config.variance_type in ("learned", "learned_range")):
            kind = _Kind(False)
        else:
            math = (config.prediction_type, config.solver_type,
                    bool(getattr(config, "use_flow_sigmas", False)))
            kind = _Kind(
                True, config.prediction_type, config.solver_type == "heun",
                config.solver_order,
                bool(config.euler_at_final or config.final_sigmas_type == "zero"),
                bool(config.lower_order_final),
                (*math, scheduler.sigmas.dtype, tuple(scheduler.sigmas.tolist())))
        _KINDS[scheduler] = kind
    return kind


def _own_step(u: Update) -> torch.Tensor:
    latents: torch.Tensor = u.scheduler.step(u.output, u.timestep, u.sample, **u.kwargs,
                                             return_dict=False)[0]
    return latents


def _group(update: Update) -> tuple[Any, ...] | None:
    """The fused update an item can share (its model output's meaning, device and latent
    shape); None: its own `step`."""
    sample, kind = update.sample, _kind(update.scheduler)
    if not kind.fused or sample.dtype != torch.float32 or update.output.dtype != torch.float32:
        return None
    return kind.prediction, sample.device, sample.shape[1:]


def _order(scheduler: Any, kind: _Kind, timestep: torch.Tensor) -> int:
    """`DPMSolverMultistepScheduler.step`'s choice of update for this step (1 or 2)."""
    if scheduler.step_index is None:  # its first step: as `step` starts (begin index or t)
        scheduler._init_step_index(timestep)
    index, count = scheduler.step_index, len(scheduler.timesteps)
    short = kind.lower_order_final and count < 15
    final = index == count - 1 and (kind.final_early or short)
    if kind.solver_order == 1 or scheduler.lower_order_nums < 1 or final:
        return 1
    return 2


def _coefficients(scheduler: Any, kind: _Kind, index: int, order: int
                  ) -> tuple[float, float, float, float, float, float]:
    """(A, B, C, R) of the update at step `index` of this order, and (P, Q) of the model
    output's conversion (epsilon: x0 = (sample - Q * out) / P; v: x0 = P * sample - Q * out;
    flow: x0 = sample - Q * out), each as diffusers' functions compute it on 0-d sigmas."""
    key = (kind.schedule, index, order)
    found = _CACHE.get(key)
    if found is not None:
        return found
    sigmas = scheduler.sigmas
    to_alpha_sigma = scheduler._sigma_to_alpha_sigma_t
    alpha_t, sigma_t = to_alpha_sigma(sigmas[index + 1])
    alpha_s0, sigma_s0 = to_alpha_sigma(sigmas[index])
    lambda_t = torch.log(alpha_t) - torch.log(sigma_t)
    lambda_s0 = torch.log(alpha_s0) - torch.log(sigma_s0)
    h = lambda_t - lambda_s0
    a = sigma_t / sigma_s0
    b = alpha_t * (torch.exp(-h) - 1.0)
    zero = torch.zeros((), dtype=sigmas.dtype)
    c, r = zero, zero
    if order == 2:
        alpha_s1, sigma_s1 = to_alpha_sigma(sigmas[index - 1])
        lambda_s1 = torch.log(alpha_s1) - torch.log(sigma_s1)
        r = 1.0 / ((lambda_s0 - lambda_s1) / h)
        # heun's `+ c * D1` as `- (-c) * D1`: a sign flip is exact
        c = (-(alpha_t * ((torch.exp(-h) - 1.0) / h + 1.0)) if kind.heun
             else 0.5 * (alpha_t * (torch.exp(-h) - 1.0)))
    p, q = alpha_s0, (sigmas[index] if kind.prediction == "flow_prediction" else sigma_s0)
    found = (a.item(), b.item(), c.item(), r.item(), p.item(), q.item())
    if len(_CACHE) >= _COEFFICIENTS:
        _CACHE.clear()
    _CACHE[key] = found
    return found


def _fused(updates: Sequence[Update]) -> list[torch.Tensor]:
    """One update for items whose schedulers `_group` lets share it, at any steps and orders."""
    n = len(updates)
    kinds = [_kind(u.scheduler) for u in updates]
    orders = [_order(u.scheduler, k, u.timestep) for u, k in zip(updates, kinds, strict=True)]
    sample = updates[0].sample
    numbers = [_coefficients(u.scheduler, k, u.scheduler.step_index, o)
               for u, k, o in zip(updates, kinds, orders, strict=True)]
    # float32 holds each coefficient exactly (they were computed in the sigmas' float32)
    table = torch.tensor(numbers, dtype=torch.float32, device=sample.device).T
    a, b, c, r, p, q = table.reshape(6, n, *([1] * (sample.dim() - 1)))
    samples = torch.cat([u.sample for u in updates])
    outputs = torch.cat([u.output for u in updates])
    x0 = _data_prediction(kinds[0].prediction, samples, outputs, p, q)
    previous = torch.cat([u.scheduler.model_outputs[-1] if o == 2 else x0[i:i + 1]
                          for i, (u, o) in enumerate(zip(updates, orders, strict=True))])
    prev = a * samples - b * x0 - c * (r * (x0 - previous))
    for i, u in enumerate(updates):
        scheduler = u.scheduler
        history = scheduler.model_outputs
        history[:] = [*history[1:], x0[i:i + 1]]
        if scheduler.lower_order_nums < scheduler.config.solver_order:
            scheduler.lower_order_nums += 1
        scheduler._step_index += 1
    return list(prev.split(1))


def _data_prediction(prediction: str, sample: torch.Tensor, output: torch.Tensor,
                     p: torch.Tensor, q: torch.Tensor) -> torch.Tensor:
    """`convert_model_output` of DPM-Solver++ (x0 from the model's output)."""
    if prediction == "epsilon":
        return (sample - q * output) / p
    if prediction == "v_prediction":
        return p * sample - q * output
    if prediction == "flow_prediction":
        return sample - q * output
    return output  # "sample"
