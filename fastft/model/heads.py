"""The output layer: finding a model's own (:func:`find_head`) and building the new layers a
FineTuner adds (:func:`build_head`: hidden layers and the output layer)."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import nn

from fastft.errors import FastFTValueError, SurgeryError

#: Attribute names that hold the output layer in common model families, in search order
#: (torchvision ``fc``/``classifier``, timm ``head``/``head.fc``, ViT ``heads.head``,
#: Hugging Face ``classifier``/``score``). Model contracts come first: see :func:`find_heads`.
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


def _is_conv1x1(m: nn.Module) -> bool:
    """A 1x1 convolution: a classifier over every position (squeezenet, timm conv heads)."""
    return (
        isinstance(m, nn.modules.conv._ConvNd)
        and all(k == 1 for k in m.kernel_size)
        and m.groups == 1
    )


def _as_output_linear(name: str, m: nn.Module) -> tuple[str, nn.Module] | None:
    """The output layer inside a head-like module: itself (a Linear or a 1x1 conv), the
    Linear or 1x1 conv a Sequential ends in (parameterless layers after it allowed), or a
    ``fc`` / ``out_proj`` Linear inside it (timm's ``ClassifierHead.fc``, the
    ``dense`` + ``out_proj`` heads of Hugging Face encoders)."""
    if isinstance(m, nn.Linear) or _is_conv1x1(m):
        return name, m
    if isinstance(m, nn.Sequential):
        for key, child in reversed(list(m._modules.items())):
            if isinstance(child, nn.Linear) or _is_conv1x1(child):
                return f"{name}.{key}", child
            if any(True for _ in child.parameters()):
                return None  # a layer with weights after the last Linear: not an output layer
        return None
    for attr in ("fc", "out_proj"):
        inner = getattr(m, attr, None)
        if isinstance(inner, nn.Linear):
            return f"{name}.{attr}", inner
    return None


@dataclass
class FoundHead:
    """The output layer(s) of a model, as its own contract or layout names them: usually one,
    two for a distilled model (a class head and a distillation head, averaged)."""

    names: list[str]
    modules: list[nn.Module]
    how: str  # which rule found it, for messages

    @property
    def in_features(self) -> int:
        m = self.modules[0]
        return int(m.in_features if isinstance(m, nn.Linear) else m.in_channels)

    @property
    def kind(self) -> str:
        """``"linear"`` or ``"conv"`` (a 1x1 convolution over a feature map)."""
        return "conv" if _is_conv1x1(self.modules[0]) else "linear"


def _named(model: nn.Module, module: nn.Module) -> str | None:
    return next((n for n, m in model.named_modules() if m is module), None)


def _describe(m: nn.Module) -> str:
    text = " ".join(repr(m).split())
    return text if len(text) <= 160 else text[:157] + "..."


def _unknown(model: nn.Module, where: str, m: nn.Module, rule: str) -> SurgeryError:
    return SurgeryError(
        f"{type(model).__name__} has an output layer by {rule} ({where} = {_describe(m)}), but "
        "fastft cannot tell which of its layers maps features to classes (it knows a Linear, a "
        "1x1 convolution, a Sequential ending in one, and their fc / out_proj forms). Pass "
        "head_name= naming the layer to replace (or head= with a module to put there); fastft "
        "never appends a new head after an existing classifier."
    )


def _timm_heads(model: nn.Module) -> FoundHead | None | bool:
    """timm's contract: ``get_classifier()`` (a module, or a tuple of them for distilled
    models; ``nn.Identity`` when the model has no classifier). False: not a timm-like model."""
    get = getattr(model, "get_classifier", None)
    if not (callable(get) and callable(getattr(model, "reset_classifier", None))):
        return False
    try:
        found = get()
    except Exception:
        return False
    mods = list(found) if isinstance(found, (tuple, list)) else [found]
    if not mods or not all(isinstance(m, nn.Module) for m in mods):
        return False
    if all(isinstance(m, nn.Identity) for m in mods):
        return None  # num_classes=0: features out, no classifier
    names, outs = [], []
    for m in mods:
        where = _named(model, m)
        if where is None:
            return False
        hit = _as_output_linear(where, m)
        if hit is None:
            raise _unknown(model, where, m, "timm's get_classifier()")
        names.append(hit[0])
        outs.append(hit[1])
    return FoundHead(names, outs, "timm get_classifier()")


def _hf_heads(model: nn.Module) -> FoundHead | None:
    """Hugging Face's contract: the Linear whose ``out_features`` is ``config.num_labels``,
    under ``classifier`` / ``score`` (also ``classifier.out_proj`` and the like) first."""
    config = getattr(model, "config", None)
    n = getattr(config, "num_labels", None)
    if not isinstance(n, int) or not hasattr(config, "id2label"):
        return None
    hits = [
        (name, m)
        for name, m in model.named_modules()
        if isinstance(m, nn.Linear) and m.out_features == n
    ]
    heady = [
        (name, m)
        for name, m in hits
        if any(w in part for part in name.split(".") for w in ("classifier", "score", "head"))
    ]
    pick = heady or hits
    if len(pick) > 1 and len({m.in_features for _, m in pick}) == 1 and pick is heady:
        # a class head and a distillation head of the same input (DeiT with teacher)
        if all(name.count(".") == pick[0][0].count(".") for name, _ in pick):
            return FoundHead([p[0] for p in pick], [p[1] for p in pick], "config.num_labels")
    if len(pick) == 1:
        return FoundHead([pick[0][0]], [pick[0][1]], "config.num_labels")
    return None


def find_heads(model: nn.Module) -> FoundHead | None:
    """The model's output layer(s), found by the model's own contract first: timm's
    ``get_classifier()``, Hugging Face's ``config.num_labels``; then the usual layouts
    (:data:`HEAD_NAMES`, a 1x1-conv classifier, the last Linear of an ``nn.Sequential``).

    None when the model has no classifier (an encoder: a SentenceTransformer, a timm model
    built with ``num_classes=0``). Raises :class:`~fastft.SurgeryError` when a classifier is
    there but fastft cannot tell its output layer (never a silent append after it).
    """
    timm = _timm_heads(model)
    if timm is not False:
        return timm
    hf = _hf_heads(model)
    if hf is not None:
        return hf
    unknown = None
    for attr in HEAD_NAMES:
        try:
            m = model.get_submodule(attr)
        except AttributeError:
            continue
        if isinstance(m, nn.Identity):
            continue
        found = _as_output_linear(attr, m)
        if found is not None:
            return FoundHead([found[0]], [found[1]], f"the layout {attr!r}")
        if unknown is None and any(True for _ in m.parameters()):
            unknown = (attr, m)
    if isinstance(model, nn.Sequential):
        for key, child in reversed(list(model._modules.items())):
            if isinstance(child, nn.Linear):
                return FoundHead([key], [child], "the last Linear of an nn.Sequential")
            if any(True for _ in child.parameters()):
                break
    if unknown is not None:
        raise _unknown(model, unknown[0], unknown[1], "its name")
    return None


def find_head(model: nn.Module) -> tuple[str, nn.Module]:
    """Locate the output layer: ``(qualified name, module)`` (see :func:`find_heads`; the
    first one of a distilled model).

    Args:
        model: the model; its own contract first (timm ``get_classifier``, transformers'
            ``config``), then the usual names and layouts.

    Raises :class:`~fastft.SurgeryError` listing the Linear layers of the model when it has
    none, or naming what it found when a classifier's layout is unknown.
    """
    found = find_heads(model)
    if found is not None:
        return found.names[0], found.modules[0]
    linears = [n for n, m in model.named_modules() if isinstance(m, nn.Linear)]
    listing = ", ".join(repr(n) for n in linears[-8:]) if linears else "none"
    raise SurgeryError(
        f"no output layer found in {type(model).__name__} (looked for {', '.join(HEAD_NAMES)} and "
        f"the last Linear of an nn.Sequential). Linear layers in the model (last 8): {listing}. "
        "Pass name= naming the layer to replace, or use append_head() for an encoder."
    )


def as_conv1x1(head: nn.Module, dims: int = 2) -> nn.Module:
    """``head`` (Linear layers and parameterless ones) as 1x1 convolutions with the same
    weights, for a classifier that maps every position of a feature map (squeezenet)."""
    conv = {1: nn.Conv1d, 2: nn.Conv2d, 3: nn.Conv3d}[dims]

    def convert(m: nn.Module) -> nn.Module:
        if isinstance(m, nn.Linear):
            c = conv(m.in_features, m.out_features, 1, bias=m.bias is not None)
            with torch.no_grad():
                c.weight.copy_(m.weight.reshape(c.weight.shape))
                if m.bias is not None:
                    c.bias.copy_(m.bias)
            return c.to(m.weight.device, m.weight.dtype)
        if isinstance(m, nn.Sequential):
            return nn.Sequential(*[convert(c) for c in m])
        if any(True for _ in m.parameters()):
            raise SurgeryError(
                f"cannot turn {type(m).__name__} into a 1x1 convolution for a conv classifier; "
                "pass head= with a module that takes the feature map."
            )
        return m

    return convert(head)
