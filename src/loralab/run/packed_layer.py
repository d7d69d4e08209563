"""The packed model: one frozen base shared by several LoRA runs, each run on its own rows of the batch.

Every targeted linear layer computes its frozen weight once over the whole packed batch, then adds each run's LoRA
update on that run's rows only (mLoRA's BatchLoRA): y = W x; y[rows_i] += scale_i * B_i(A_i(dropout_i(x[rows_i]))).
Head modules (classifier, pooler, score) are per run: each run's copy sees its own rows. Rows never mix in a
transformer (attention and norms work within a sequence), so a run's outputs, loss and gradients are those it would
have alone; the runs' parameters are separate tensors, so one backward of the summed losses keeps them apart.

A run's modules are the very modules of its solo peft model (its "shell": built exactly as a solo run builds it, its
frozen weights then pointed at the shared base's tensors), so initialization, scaling (alpha/r, rsLoRA, rank and alpha
patterns), dropout, the optimizer's parameter groups and the saved adapter are the solo run's own.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Optional

import torch
from torch import nn

from ..errors import LoralabError

PEFT_PREFIX = "base_model.model."
ADAPTER = "default"


class NotPackable(LoralabError):
    """A run whose model the packed layer cannot express (it trains solo; the message says why)."""


@dataclass
class PackSlots:
    """Which rows of the packed batch belong to which run, for the current forward (set before each one)."""

    rows: list[tuple[int, slice]] = field(default_factory=list)


@dataclass
class LoraSlot:
    """One run's LoRA update of one layer: peft's own modules from the run's shell."""

    lora_A: nn.Module
    lora_B: nn.Module
    dropout: nn.Module
    scaling: float


class PackedLinear(nn.Module):
    """A frozen linear layer shared by the pack, plus each run's LoRA update on its rows (peft's arithmetic order)."""

    def __init__(self, base: nn.Module, slots: PackSlots) -> None:
        super().__init__()
        self.base_layer, self.slots = base, slots
        self.runs: dict[int, LoraSlot] = {}
        self.lora = nn.ModuleDict()  # registers the runs' A/B/dropout modules (device moves, train/eval)

    def add(self, run: int, slot: LoraSlot) -> None:
        self.runs[run] = slot
        self.lora[str(run)] = nn.ModuleList([slot.lora_A, slot.lora_B, slot.dropout])

    def remove(self, run: int) -> None:
        self.runs.pop(run, None)
        if str(run) in self.lora:
            del self.lora[str(run)]

    def forward(self, x: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        result = self.base_layer(x, *args, **kwargs)
        if not self.runs:
            return result
        pieces = []
        for run, rows in self.slots.rows:
            piece = result[rows]
            s = self.runs.get(run)
            if s is not None:
                xi = x[rows].to(s.lora_A.weight.dtype)
                piece = (piece + s.lora_B(s.lora_A(s.dropout(xi))) * s.scaling).to(result.dtype)
            pieces.append(piece)
        return torch.cat(pieces) if len(pieces) > 1 else pieces[0]


class PackedRows(nn.Module):
    """A head module trained per run (classifier, pooler, score): run i's copy on run i's rows, batch-first."""

    def __init__(self, slots: PackSlots) -> None:
        super().__init__()
        self.slots = slots
        self.heads = nn.ModuleDict()

    def add(self, run: int, module: nn.Module) -> None:
        self.heads[str(run)] = module

    def remove(self, run: int) -> None:
        if str(run) in self.heads:
            del self.heads[str(run)]

    def forward(self, x: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        pieces = [self.heads[str(run)](x[rows], *args, **kwargs) for run, rows in self.slots.rows]
        return torch.cat(pieces) if len(pieces) > 1 else pieces[0]


def base_name(peft_name: str) -> str:
    """A shell's module or parameter name as the bare base model names it."""
    name = peft_name.removeprefix(PEFT_PREFIX)
    return name.replace(".base_layer", "").replace(".original_module", "")


def _set_module(root: nn.Module, name: str, module: nn.Module) -> None:
    parent, _, child = name.rpartition(".")
    setattr(root.get_submodule(parent) if parent else root, child, module)


def shell_parts(shell: nn.Module) -> tuple[dict[str, LoraSlot], dict[str, nn.Module]]:
    """A solo peft model's LoRA updates and trained head modules, by their names in the bare base model. Raises
    NotPackable for anything the packed layer does not compute exactly as peft does."""
    from peft.tuners.lora.layer import Linear as LoraLinear
    from peft.tuners.lora.layer import LoraLayer
    from peft.utils.other import ModulesToSaveWrapper

    loras: dict[str, LoraSlot] = {}
    heads: dict[str, nn.Module] = {}
    for name, module in shell.named_modules():
        if isinstance(module, ModulesToSaveWrapper):
            heads[base_name(name)] = module.modules_to_save[ADAPTER]
        elif isinstance(module, LoraLayer):
            if type(module) is not LoraLinear or ADAPTER in getattr(module, "lora_variant", {}):
                raise NotPackable(f"{base_name(name)} is a {type(module).__name__} LoRA layer"
                                  f"{' with a variant (DoRA)' if ADAPTER in getattr(module, 'lora_variant', {}) else ''}"
                                  f": the packed layer computes plain LoRA on linear layers only")
            if not isinstance(module.base_layer, nn.Linear):
                raise NotPackable(f"{base_name(name)}: the base layer is a {type(module.base_layer).__name__} "
                                  f"(quantized?), the packed layer shares plain nn.Linear bases only")
            loras[base_name(name)] = LoraSlot(module.lora_A[ADAPTER], module.lora_B[ADAPTER],
                                              module.lora_dropout[ADAPTER], float(module.scaling[ADAPTER]))
    for lname in loras:
        for h in heads:
            if lname.startswith(h + "."):
                raise NotPackable(f"LoRA on {lname} lies inside the trained head module {h}")
    return loras, heads


def share_frozen(shell: nn.Module, base: nn.Module) -> None:
    """Point every frozen tensor of a shell at the shared base's (so K runs hold one base), after checking they are
    equal: an init that rewrites the base weights (PiSSA, OLoRA) gives each run its own base, which no pack shares."""
    tensors = {base_name(n): p for n, p in base.named_parameters() if not p.requires_grad}  # runs' own: trainable
    heads_original = ".original_module."
    for name, p in shell.named_parameters():
        if p.requires_grad or heads_original in name:
            continue  # trained tensors, and the untrained originals of head modules (the runs' copies are used)
        other = tensors.get(base_name(name))
        if other is None or other.shape != p.shape or other.dtype != p.dtype:
            raise NotPackable(f"frozen tensor {name} has no counterpart of the same shape and dtype in the shared base")
        if not torch.equal(other.data, p.data):
            raise NotPackable(f"frozen tensor {base_name(name)} differs from the shared base's (an init that rewrites "
                              f"the base weights, e.g. lora.init=pissa/olora)")
        p.data = other.data


class PackedModel(nn.Module):
    """The shared base with packed layers in place; runs are added (admitted) and removed (finished) at any time."""

    def __init__(self, base: nn.Module) -> None:
        super().__init__()
        base.requires_grad_(False)
        self.base, self.slots = base, PackSlots()
        self.linears: dict[str, PackedLinear] = {}
        self.heads: dict[str, PackedRows] = {}
        self.head_names: Optional[set[str]] = None

    def add_run(self, run: int, shell: nn.Module) -> None:
        loras, heads = shell_parts(shell)
        if self.head_names is not None and set(heads) != self.head_names:
            raise NotPackable(f"its trained head modules {sorted(heads)} differ from the pack's {sorted(self.head_names)}")
        share_frozen(shell, self.base)
        self.head_names = set(heads)
        for name, slot in loras.items():
            layer = self.linears.get(name)
            if layer is None:
                layer = self.linears[name] = PackedLinear(self.base.get_submodule(name), self.slots)
                _set_module(self.base, name, layer)
            layer.add(run, slot)
        for name, module in heads.items():
            head = self.heads.get(name)
            if head is None:
                head = self.heads[name] = PackedRows(self.slots)
                _set_module(self.base, name, head)
            head.add(run, module)

    def remove_run(self, run: int) -> None:
        for layer in self.linears.values():
            layer.remove(run)
        for head in self.heads.values():
            head.remove(run)

    def forward(self, rows: list[tuple[int, slice]], **inputs: torch.Tensor) -> torch.Tensor:
        self.slots.rows = rows
        return self.base(**inputs).logits
