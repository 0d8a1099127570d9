"""Many LoRAs in one forward pass: each row of a batch gets its own adapters.

For every Linear / Conv2d that a resident adapter touches, a forward hook adds
`sum_j scale_j * up_j(down_j(x))` to the layer's output, for the rows that chose adapter `j`
only: the rows are grouped by adapter (`index_select`), each group goes through its adapter's
two small matmuls (convolutions on a Conv2d), and the result is added back into those rows
(`index_add_`). A layer no resident adapter touches has no hook; a batch without LoRA rows
activates no group, so its layers pay one Python call that returns at once.

Which row chose what is set per forward pass (`rows`): the batch changes every step under the
continuous policy, and classifier-free guidance doubles an item's rows. Dimension 0 of every
hooked layer's input is the row (attention projections see [rows, tokens, features], convolutions
[rows, channels, h, w], the time embedding [rows, features]); a hook that sees another size fails
the batch rather than mixing rows.

This is vLLM's punica idea (wrap the base layer, index the rows) at the granularity diffusion
needs. PEFT's own mixed-batch forward (`adapter_names`) takes one adapter per row at a scale
fixed per adapter; a request here combines up to `--max-loras-per-request` adapters at its own
scales (see docs/decisions.md).
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F

from .files import AdapterWeights, Delta

Choice = tuple[tuple[str, float], ...]
"""One row's adapters: (adapter key, scale) pairs; () for a row without LoRA."""


class RowMismatch(RuntimeError):
    """A hooked layer saw a batch of another size than the rows set for it."""


@dataclass(frozen=True, slots=True)
class _Group:
    key: str
    index: torch.Tensor  # the rows that chose the adapter, long, on the model's device
    scales: torch.Tensor  # [len(index)] in the model's dtype
    whole: bool  # every row chose it: no gather / scatter needed


class _Layer:
    """The adapters resident on one layer and the hook that applies them."""

    __slots__ = ("conv", "deltas", "handle", "owner")

    def __init__(self, owner: ComponentRows, module: torch.nn.Module) -> None:
        self.owner = owner
        self.deltas: dict[str, Delta] = {}
        self.conv = module if isinstance(module, torch.nn.Conv2d) else None
        self.handle = module.register_forward_hook(self.hook)

    def hook(self, module: torch.nn.Module, args: tuple[Any, ...], output: torch.Tensor
             ) -> torch.Tensor | None:
        groups = self.owner.active
        if not groups:
            return None
        x = args[0]
        if x.shape[0] != self.owner.size:
            raise RowMismatch(f"a LoRA layer saw {x.shape[0]} rows where {self.owner.size} "
                              "were set")
        single = self.owner.single
        if single is not None and self.conv is None and self._batched(x, output, single):
            return output
        for group in groups:
            delta = self.deltas.get(group.key)
            if delta is None:
                continue
            rows = x if group.whole else x.index_select(0, group.index)
            change = self._apply(rows.to(delta.down.dtype), delta)
            change = change * group.scales.view(-1, *([1] * (change.dim() - 1)))
            if group.whole:
                output.add_(change.to(output.dtype))
            else:
                output.index_add_(0, group.index, change.to(output.dtype))
        return output

    def _batched(self, x: torch.Tensor, output: torch.Tensor, single: _Single) -> bool:
        """Rows with one adapter each, several adapters of one rank on this (linear) layer:
        every row's two projections in two batched matmuls (punica's BGMV), each row with its
        own adapter's weights (zeros for a row without one here), instead of a gather, two
        matmuls and a scatter per adapter. False when the adapters' ranks differ here."""
        deltas = [self.deltas.get(key) if key else None for key in single.keys]
        present = [d for d in deltas if d is not None]
        if not present:
            return True  # nothing of these rows' adapters touches this layer
        rank, dtype = present[0].down.shape[0], present[0].down.dtype
        if any(d.down.shape[0] != rank or d.down.dtype != dtype for d in present):
            return False
        down_zero = torch.zeros_like(present[0].down)
        up_zero = torch.zeros_like(present[0].up)
        down = torch.stack([d.down if d is not None else down_zero for d in deltas])
        up = torch.stack([d.up if d is not None else up_zero for d in deltas])
        rows = x.reshape(x.shape[0], -1, x.shape[-1]).to(dtype)  # [B, tokens, in]
        hidden = torch.bmm(rows, down.transpose(1, 2))  # [B, tokens, r]
        change = torch.bmm(hidden, up.transpose(1, 2))  # [B, tokens, out]
        change = change * single.scales.to(dtype).view(-1, 1, 1)
        output.add_(change.reshape(output.shape).to(output.dtype))
        return True

    def _apply(self, x: torch.Tensor, delta: Delta) -> torch.Tensor:
        conv = self.conv
        if conv is None:
            return F.linear(F.linear(x, delta.down), delta.up)
        hidden = F.conv2d(x, delta.down, None, conv.stride, conv.padding, conv.dilation)
        return F.conv2d(hidden, delta.up)


class ComponentRows:
    """The per-row LoRA state of one model (a UNet or a text encoder)."""

    def __init__(self, model: torch.nn.Module) -> None:
        self.model = model
        self.layers: dict[str, _Layer] = {}
        self.active: list[_Group] = []
        self.single: _Single | None = None  # set when rows have one adapter each, several
        self.size = 0
        self._modules = dict(model.named_modules())

    def add(self, key: str, deltas: Mapping[str, Delta]) -> None:
        for name, delta in deltas.items():
            layer = self.layers.get(name)
            if layer is None:
                layer = self.layers[name] = _Layer(self, self._modules[name])
            layer.deltas[key] = delta

    def remove(self, key: str) -> None:
        for name in [n for n, layer in self.layers.items() if key in layer.deltas]:
            layer = self.layers[name]
            del layer.deltas[key]
            if not layer.deltas:  # no adapter left here: the layer runs hook-free again
                layer.handle.remove()
                del self.layers[name]

    def touches(self, key: str) -> bool:
        return any(key in layer.deltas for layer in self.layers.values())

    @contextmanager
    def rows(self, choices: Sequence[Choice]) -> Iterator[None]:
        """Inside the block, row `i` of every forward pass gets the adapters `choices[i]`."""
        if self.active:
            raise RuntimeError("LoRA rows are already set for this model")
        groups = _groups(choices, self._device_dtype())
        if not groups:
            yield
            return
        self.active, self.size = groups, len(choices)
        self.single = _single(choices, groups)
        try:
            yield
        finally:
            self.active, self.size, self.single = [], 0, None

    def _device_dtype(self) -> tuple[torch.device, torch.dtype]:
        weight = next(self.model.parameters())
        return weight.device, weight.dtype


def _groups(choices: Sequence[Choice], where: tuple[torch.device, torch.dtype]
            ) -> list[_Group]:
    """One group per adapter in order of first appearance, so the sum runs in the same order
    whichever rows share the batch."""
    rows: dict[str, list[int]] = {}
    scales: dict[str, list[float]] = {}
    for row, choice in enumerate(choices):
        for key, scale in choice:
            if scale == 0:
                continue
            rows.setdefault(key, []).append(row)
            scales.setdefault(key, []).append(scale)
    device, dtype = where
    return [
        _Group(key, torch.tensor(index, dtype=torch.long, device=device),
               torch.tensor(scales[key], dtype=dtype, device=device),
               len(index) == len(choices))
        for key, index in rows.items()
    ]


@dataclass(frozen=True, slots=True)
class _Single:
    """Every row has at most one adapter and the batch has several: row i's adapter key
    ("" for none) and scale, for the batched path."""

    keys: tuple[str, ...]
    scales: torch.Tensor  # [rows]


def _single(choices: Sequence[Choice], groups: list[_Group]) -> _Single | None:
    if len(groups) < 2 or any(len(choice) > 1 for choice in choices):
        return None  # one adapter for all rows (the plain path is cheaper) or combinations
    keys = tuple(choice[0][0] if choice and choice[0][1] != 0 else "" for choice in choices)
    scales = [choice[0][1] if choice else 0.0 for choice in choices]
    return _Single(keys, torch.tensor(scales, device=groups[0].scales.device))


class RowAdapters:
    """Per-row LoRA over the components of one pipeline (`unet`, `text_encoder`,
    `text_encoder_2`): adapters are added and removed by key; `rows` sets, for one forward
    pass of one component, which rows get which."""

    def __init__(self, components: Mapping[str, torch.nn.Module]) -> None:
        self.components = {name: ComponentRows(model) for name, model in components.items()}

    def add(self, key: str, weights: AdapterWeights) -> None:
        unknown = set(weights) - set(self.components)
        if unknown:
            raise ValueError(f"no component {sorted(unknown)[0]!r} here")
        for component, deltas in weights.items():
            self.components[component].add(key, deltas)

    def remove(self, key: str) -> None:
        for component in self.components.values():
            component.remove(key)

    @contextmanager
    def rows(self, component: str, choices: Sequence[Choice]) -> Iterator[None]:
        own = self.components.get(component)
        if own is None or not any(choices):
            yield
            return
        with own.rows(choices):
            yield
