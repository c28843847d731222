"""Attach a task's new layers to a pretrained model and freeze what is not new.

This is what ``FineTuner(model, num_classes=..., hidden=...)`` does to the model: find the
output layer and replace it, or, for an encoder with no classifier, append the new layers
after its output (which needs one forward pass to learn the output's width); then freeze.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from fastft import data as fdata
from fastft.errors import SurgeryError
from fastft.model import surgery


@dataclass
class HeadSpec:
    """How the new output layer was attached, so that a saved tuner can rebuild it without data."""

    mode: str  # "replace" (an existing head was swapped) or "append" (encoder + new head)
    name: str | None
    in_features: int
    output_key: str | None = None


class NeedsProbe(Exception):
    """Attaching the head needs one forward pass over real inputs (an encoder's output width)."""


def locate_head(
    model: nn.Module,
    *,
    head_name: str | None,
    custom_head: bool,
    output_key: str,
    example: Any | None,
) -> HeadSpec:
    """Where the new output layer goes: the layer ``head_name`` names or :func:`find_head`
    finds, else after the model's output (measured on ``example``; :class:`NeedsProbe` without
    one). ``custom_head``: a ready-made head module replaces a layer of any kind."""
    try:
        name, old = (
            (head_name, model.get_submodule(head_name)) if head_name else surgery.find_head(model)
        )
    except (SurgeryError, AttributeError) as exc:
        if head_name:
            raise SurgeryError(f"head_name={head_name!r}: {exc}") from exc
        name, old = None, None
    if old is not None and getattr(old, "in_features", None) is not None:
        return HeadSpec("replace", name, int(old.in_features))
    if old is not None and custom_head:
        return HeadSpec("replace", name, -1)
    # No classifier to replace (an encoder): append a head after its output.
    if example is None:
        raise NeedsProbe()
    model.eval()
    with torch.no_grad():
        out = model(fdata.to_device(example, module_device(model)))
    key = None
    if isinstance(out, dict):
        if output_key not in out:
            raise SurgeryError(
                f"the model returns a dict without {output_key!r} (keys: {', '.join(out)}); "
                "pass output_key= naming the embedding to train on."
            )
        key, out = output_key, out[output_key]
    if not isinstance(out, torch.Tensor) or out.dim() != 2:
        raise SurgeryError(
            "no output layer found to replace, and the model's output is not a [batch, features] "
            f"tensor to append one to (got {type(out).__name__} {getattr(out, 'shape', '')}). "
            "Pass head_name= naming the layer to replace."
        )
    return HeadSpec("append", None, int(out.shape[1]), key)


def attach_head(model: nn.Module, spec: HeadSpec, head: nn.Module) -> nn.Module:
    """Put ``head`` where ``spec`` says; returns the edited model (a new root when appended)."""
    if spec.mode == "replace":
        surgery.replace_head(model, module=head, name=spec.name)
        return model
    return surgery.append_head(model, [head], output_key=spec.output_key)


def current_head(model: nn.Module, spec: HeadSpec) -> nn.Module:
    """The new output layer that :func:`attach_head` put in ``model``."""
    if spec.mode == "replace":
        return model.get_submodule(spec.name)
    return model.get_submodule(surgery.new_modules(model)[0])  # an appended head comes first


def apply_freeze(model: nn.Module, freeze: str | Sequence[str] | None) -> None:
    """``"auto"``: freeze everything not new; names or glob patterns: freeze those; ``None``:
    leave ``requires_grad`` as it is. Refuses a model left with nothing to train."""
    if freeze == "auto":
        surgery.freeze(model, except_new=True)
    elif freeze is not None:
        surgery.freeze(model, patterns=[freeze] if isinstance(freeze, str) else list(freeze))
    if not any(p.requires_grad for p in model.parameters()):
        raise SurgeryError(
            "nothing to train: every parameter is frozen. Pass num_classes= (a new output "
            "layer), hidden=, or unfreeze some layers with fastft.surgery.unfreeze."
        )


def module_device(model: nn.Module) -> torch.device:
    """Where ``model``'s parameters are (the CPU for a model without any)."""
    for p in model.parameters():
        return p.device
    return torch.device("cpu")


def path_of(root: nn.Module, module: nn.Module) -> str:
    """The qualified name of ``module`` inside ``root``."""
    for name, m in root.named_modules():
        if m is module:
            return name
    raise SurgeryError(f"{type(module).__name__} is not a submodule of this {type(root).__name__}.")
