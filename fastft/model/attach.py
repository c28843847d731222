"""Attach a task's new layers to a pretrained model and freeze what is not new.

This is what ``FineTuner(model, num_classes=..., hidden=...)`` does to the model: find the
output layer and replace it (sized from what reaches it: :func:`probe_width`), or, for an
encoder with no classifier, append the new layers after its output (which needs one forward
pass to learn the output's width); then freeze. The model's record of its classes (a Hugging
Face config's ``num_labels``) follows the new head (:func:`sync_label_config`).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from fastft import data as fdata
from fastft.errors import FastFTError, SurgeryError
from fastft.model import surgery
from fastft.model.calling import call_model, dtype_mismatch
from fastft.model.heads import FoundHead, find_heads
from fastft.model.status import all_eval


@dataclass
class HeadSpec:
    """How the new output layer was attached, so that a saved tuner can rebuild it without data."""

    mode: str  # "replace" (an existing head was swapped) or "append" (encoder + new head)
    name: str | None
    in_features: int
    output_key: str | None = None
    kind: str = "linear"  # "conv": the old layer was a 1x1 convolution over a feature map
    also: list[str] = field(default_factory=list)  # more output layers (a distillation head)
    conv_dims: int = 2


class NeedsProbe(Exception):
    """Attaching the head needs one forward pass over real inputs (an encoder's output width)."""


class _Reached(BaseException):
    """Raised by the probe's pre-hook once the head's input is known."""


def _layer_spec(name: str, old: nn.Module, how: FoundHead | None = None) -> HeadSpec | None:
    if isinstance(old, nn.Linear):
        spec = HeadSpec("replace", name, int(old.in_features))
    elif isinstance(old, nn.modules.conv._ConvNd) and all(k == 1 for k in old.kernel_size):
        spec = HeadSpec("replace", name, int(old.in_channels), kind="conv")
        spec.conv_dims = len(old.kernel_size)
    else:
        return None
    if how is not None:
        spec.also = list(how.names[1:])
    return spec


def locate_head(
    model: nn.Module,
    *,
    head_name: str | None,
    custom_head: bool,
    output_key: str,
    example: Any | None,
) -> HeadSpec:
    """Where the new output layer goes: the layer ``head_name`` names or :func:`find_heads`
    finds (the model's contract first: timm, Hugging Face, then the usual layouts), else
    after the model's output (measured on ``example``; :class:`NeedsProbe` without one).
    ``custom_head``: a ready-made head module replaces a layer of any kind. A classifier
    whose layout is unknown is an error, never a new head appended after its logits."""
    found = None
    if head_name:
        try:
            old = model.get_submodule(head_name)
        except AttributeError as exc:
            raise SurgeryError(f"head_name={head_name!r}: {exc}") from exc
        name = head_name
    else:
        found = find_heads(model)
        name, old = (found.names[0], found.modules[0]) if found else (None, None)
    if old is not None:
        spec = _layer_spec(name, old, found)
        if spec is not None:
            return spec
        if custom_head:
            return HeadSpec("replace", name, -1)
        raise SurgeryError(
            f"{name!r} is a {type(old).__name__}, not a Linear or a 1x1 convolution: fastft "
            "cannot size a new output layer for it. Pass head= with a module to put there, or "
            "head_name= naming the Linear inside it."
        )
    # No classifier to replace (an encoder): append a head after its output.
    if example is None:
        raise NeedsProbe()
    model.eval()
    try:
        with torch.no_grad():
            out = call_model(model, fdata.to_device(example, module_device(model)))
    except Exception as exc:
        clash = dtype_mismatch(exc, example, model)
        if clash is not None:
            raise clash from exc
        raise
    key = None
    if isinstance(out, Mapping):
        if output_key not in out:
            raise SurgeryError(
                f"the model returns a {type(out).__name__} without {output_key!r} (keys: "
                f"{', '.join(map(str, out))}); pass output_key= naming the embedding to train on."
            )
        key, out = output_key, out[output_key]
    if not isinstance(out, torch.Tensor) or out.dim() != 2:
        raise SurgeryError(
            "no output layer found to replace, and the model's output is not a [batch, features] "
            f"tensor to append one to (got {type(out).__name__} {getattr(out, 'shape', '')}). "
            "Pass head_name= naming the layer to replace."
        )
    return HeadSpec("append", None, int(out.shape[1]), key)


def attach_head(model: nn.Module, spec: HeadSpec, heads: Sequence[nn.Module]) -> nn.Module:
    """Put ``heads[0]`` where ``spec`` says (and ``heads[1:]`` at ``spec.also``, a distilled
    model's other heads); returns the edited model (a new root when appended)."""
    if spec.mode == "replace":
        for name, head in zip([spec.name, *spec.also], heads):
            surgery.replace_head(model, module=head, name=name)
        return model
    return surgery.append_head(model, [heads[0]], output_key=spec.output_key)


def current_head(model: nn.Module, spec: HeadSpec) -> nn.Module:
    """The new output layer that :func:`attach_head` put in ``model``."""
    if spec.mode == "replace":
        return model.get_submodule(spec.name)
    return model.get_submodule(surgery.new_modules(model)[0])  # an appended head comes first


def head_input(model: nn.Module, head: nn.Module, example: Any) -> torch.Tensor:
    """What reaches ``head`` when ``model`` runs on ``example`` (the model stops there)."""
    seen: list[torch.Tensor] = []

    def stop(mod, args):
        seen.append(args[0] if args else None)
        raise _Reached

    handle = head.register_forward_pre_hook(stop)
    try:
        with torch.no_grad(), all_eval(model):
            call_model(model, fdata.to_device(example, module_device(model)))
    except _Reached:
        pass
    except FastFTError:
        raise  # already says what to do (inputs the model does not take, ...)
    except Exception as exc:
        clash = dtype_mismatch(exc, example, model)
        if clash is not None:
            raise clash from exc
        raise SurgeryError(
            f"the edited model fails before its new output layer on the example inputs "
            f"({type(exc).__name__}: {exc}); check the surgery (removed or inserted layers)."
        ) from exc
    finally:
        handle.remove()
    if not seen or not isinstance(seen[0], torch.Tensor):
        raise SurgeryError(
            "the new output layer does not run (or takes no tensor) on the example inputs: the "
            "model's forward does not reach it."
        )
    return seen[0]


def probe_width(model: nn.Module, spec: HeadSpec, head: nn.Module, example: Any) -> int:
    """The feature width that reaches the new head now: the last axis of its input (the
    channel axis for a 1x1-conv classifier). Surgery below the head (a removed stage, an
    inserted layer) may have changed it since the old layer was sized."""
    x = head_input(model, head, example)
    axis = 1 if spec.kind == "conv" else -1
    if x.dim() < 2:
        raise SurgeryError(
            f"the new output layer receives a tensor of shape {tuple(x.shape)}, not [batch, ...]."
        )
    return int(x.shape[axis])


def head_outputs(head: nn.Module) -> int | None:
    """Number of outputs of a head (its last Linear or conv), when known."""
    last = None
    for m in head.modules():
        if isinstance(m, nn.Linear):
            last = m.out_features
        elif isinstance(m, nn.modules.conv._ConvNd):
            last = m.out_channels
    return last


def sync_label_config(model: nn.Module, num_outputs: int | None) -> None:
    """Make the model's own record of its classes match the new head: a Hugging Face
    ``config.num_labels`` (which resets ``id2label`` / ``label2id`` when the count changes),
    a timm model's ``num_classes``."""
    if not num_outputs:
        return
    config = getattr(model, "config", None)
    if isinstance(getattr(config, "num_labels", None), int) and hasattr(config, "id2label"):
        if config.num_labels != num_outputs:
            config.num_labels = num_outputs
    if callable(getattr(model, "get_classifier", None)) and isinstance(
        getattr(model, "num_classes", None), int
    ):
        model.num_classes = num_outputs


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
