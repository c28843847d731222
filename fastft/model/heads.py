"""The output layer: finding a model's own (:func:`find_head`) and building the new layers a
FineTuner adds (:func:`build_head`: hidden layers and the output layer)."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

from fastft.errors import FastFTValueError, SurgeryError

#: Attribute names that hold the output layer in common model families, in search order
#: (torchvision ``fc``/``classifier``, timm ``head``/``head.fc``, ViT ``heads.head``,
#: Hugging Face ``classifier``/``score``).
HEAD_NAMES = ("fc", "classifier", "head", "heads.head", "score")


ACTIVATIONS = {"relu": nn.ReLU, "gelu": nn.GELU, "silu": nn.SiLU, "tanh": nn.Tanh}


def build_head(
    in_features: int,
    num_outputs: int,
    hidden: Sequence[int] | None = None,
    *,
    activation: str = "relu",
    dropout: float = 0.0,
    seed: int | None = None,
) -> nn.Module:
    """``[Linear → activation (→ Dropout)] × len(hidden) → Linear(num_outputs)``.

    With no hidden layers this is a single ``nn.Linear``. ``seed`` makes the random
    initialisation reproducible without touching the global RNG stream.
    """
    if activation not in ACTIVATIONS:
        raise FastFTValueError(
            f"unknown activation {activation!r}; use one of {', '.join(ACTIVATIONS)}."
        )
    if not 0.0 <= dropout < 1.0:
        raise FastFTValueError(f"dropout must be in [0, 1), got {dropout}.")
    widths = list(hidden or [])
    if any(int(w) <= 0 for w in widths):
        raise FastFTValueError(f"hidden widths must be positive integers, got {widths}.")
    with torch.random.fork_rng(devices=[]):
        if seed is not None:
            torch.manual_seed(seed)
        layers: list[nn.Module] = []
        width = in_features
        for w in widths:
            layers += [nn.Linear(width, int(w)), ACTIVATIONS[activation]()]
            if dropout:
                layers.append(nn.Dropout(dropout))
            width = int(w)
        layers.append(nn.Linear(width, num_outputs))
    return layers[0] if len(layers) == 1 else nn.Sequential(*layers)


def _as_output_linear(name: str, m: nn.Module) -> tuple[str, nn.Linear] | None:
    """The output Linear inside a head-like module: itself, the Linear a Sequential ends in
    (parameterless layers after it allowed), or timm's ``ClassifierHead.fc``."""
    if isinstance(m, nn.Linear):
        return name, m
    if isinstance(m, nn.Sequential):
        for key, child in reversed(list(m._modules.items())):
            if isinstance(child, nn.Linear):
                return f"{name}.{key}", child
            if any(True for _ in child.parameters()):
                return None  # a layer with weights after the last Linear: not an output layer
        return None
    fc = getattr(m, "fc", None)
    if isinstance(fc, nn.Linear):
        return f"{name}.fc", fc
    return None


def find_head(model: nn.Module) -> tuple[str, nn.Module]:
    """Locate the output layer: ``(qualified name, module)``.

    Looks for ``fc``, ``classifier`` (also a Sequential ending in a Linear: its last Linear
    is returned), ``head`` (or ``head.fc``), ``heads.head`` and ``score``; then, when the
    model itself is an ``nn.Sequential``, its last direct ``nn.Linear`` child (when only
    parameterless layers follow it). Raises :class:`~fastft.SurgeryError` listing the
    Linear layers of the model when none of these is present.
    """
    for attr in HEAD_NAMES:
        try:
            m = model.get_submodule(attr)
        except AttributeError:
            continue
        found = _as_output_linear(attr, m)
        if found is not None:
            return found
    if isinstance(model, nn.Sequential):
        for key, child in reversed(list(model._modules.items())):
            if isinstance(child, nn.Linear):
                return key, child
            if any(True for _ in child.parameters()):
                break
    linears = [n for n, m in model.named_modules() if isinstance(m, nn.Linear)]
    listing = ", ".join(repr(n) for n in linears[-8:]) if linears else "none"
    raise SurgeryError(
        f"no output layer found in {type(model).__name__} (looked for {', '.join(HEAD_NAMES)} and "
        f"the last Linear of an nn.Sequential). Linear layers in the model (last 8): {listing}. "
        "Pass name= naming the layer to replace, or use append_head() for an encoder."
    )
