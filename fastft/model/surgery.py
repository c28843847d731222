"""Layer surgery: the three edits of transfer learning, done in place on a plain ``nn.Module``.

1. Replace the output layer: :func:`find_head`, :func:`replace_head`, or for an encoder
   with no classifier :func:`append_head`.
2. Add or remove hidden layers: :func:`insert_layers`, :func:`remove_layers`.
3. Freeze what did not change: :func:`freeze`, :func:`unfreeze`.

Modules added by ``replace_head``, ``append_head`` and ``insert_layers`` are recorded as
*new* on the module objects themselves (``module._fastft_new = True``), so the record
survives later surgery, deepcopy and pickling; :func:`new_modules` lists them by their
current names, and ``freeze(model, except_new=True)`` freezes everything else. The edited
model stays an ordinary ``nn.Module`` built from torch modules (``nn.Sequential`` wraps an
insertion point; only :class:`EncoderWithHead` is a fastft class).

Unknown names raise :class:`~fastft.SurgeryError` suggesting the closest existing names, and
a pattern that matches nothing is an error, not a no-op.

The edits live in modules of their own, re-exported here (``fastft.surgery`` is this
module): the output layer in this one, hidden layers in :mod:`~fastft.model.layer_edits`,
freezing in :mod:`~fastft.model.freezing`, the record of new modules and :func:`summary` in
:mod:`~fastft.model.status`.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import torch
import torch.fx
from torch import nn

from fastft.errors import SurgeryError
from fastft.model.calling import call_model
from fastft.model.freezing import freeze, unfreeze
from fastft.model.heads import find_head
from fastft.model.layer_edits import insert_layers, remove_layers
from fastft.model.status import (
    get_module,
    mark_new,
    new_modules,
    parent_of,
    place_like,
    summary,
)

__all__ = [
    "EncoderWithHead",
    "append_head",
    "find_head",
    "freeze",
    "insert_layers",
    "new_modules",
    "remove_layers",
    "replace_head",
    "summary",
    "unfreeze",
]


def _set_module(model: nn.Module, name: str, module: nn.Module) -> None:
    parent, key = parent_of(model, name)
    setattr(parent, key, module)


# ---------------------------------------------------------------------------- output layer
def replace_head(
    model: nn.Module,
    num_classes: int | None = None,
    module: nn.Module | None = None,
    name: str | None = None,
) -> nn.Module:
    """Swap the output layer for a new one, in place, and return the new module.

    Give either ``num_classes`` or ``module``; the new module is recorded as new.

    Args:
        model: the model, edited in place.
        num_classes: the new layer's outputs: a new ``nn.Linear(in_features, num_classes)``
            with the old layer's ``in_features``, bias setting, dtype and device (a 1x1
            convolution for a 1x1-conv classifier).
        module: a ready-made layer, used as is, moved to the old layer's device and floating
            dtype (the model's when the old layer has no parameters).
        name: the qualified name of the layer to replace (default: :func:`find_head`).
    """
    if (num_classes is None) == (module is None):
        raise SurgeryError(
            "replace_head needs exactly one of num_classes= (a new Linear) or module=."
        )
    if name is None:
        name, old = find_head(model)
    else:
        old = get_module(model, name)
    if module is None:
        if not isinstance(num_classes, int) or isinstance(num_classes, bool) or num_classes < 1:
            raise SurgeryError(f"num_classes must be a positive int, got {num_classes!r}.")
        in_features = getattr(old, "in_features", None)
        conv = isinstance(old, nn.modules.conv._ConvNd) and all(k == 1 for k in old.kernel_size)
        if conv:
            in_features = old.in_channels
        if not isinstance(in_features, int):
            raise SurgeryError(
                f"cannot infer the input width of {name!r} ({type(old).__name__} has no "
                "in_features); pass module= with the new output layer instead of num_classes=."
            )
        weight = getattr(old, "weight", None)
        kw = {} if weight is None else {"device": weight.device, "dtype": weight.dtype}
        bias = getattr(old, "bias", None) is not None
        module = (
            type(old)(in_features, num_classes, 1, bias=bias, **kw)
            if conv
            else nn.Linear(in_features, num_classes, bias=bias, **kw)
        )
    elif not isinstance(module, nn.Module):
        raise SurgeryError(f"module= must be an nn.Module, got {type(module).__name__}.")
    else:
        place_like(module, old, model)
    _set_module(model, name, mark_new(module))
    return module


@torch.fx.wrap
def _pick_output(out: Any, key: str | None) -> Any:
    """The encoder output the head reads: ``out[key]`` for a dict output, else ``out``.

    A leaf function for torch.fx (``torch.fx.wrap``), so the isinstance test runs on real
    values, never on a trace proxy.
    """
    if key is None or not isinstance(out, Mapping):
        return out
    if key not in out:
        raise SurgeryError(
            f"the encoder's output has no key {key!r} (keys: {', '.join(map(str, out))})."
        )
    return out[key]


class EncoderWithHead(nn.Module):
    """``head(encoder(x)[output_key])``: an encoder without a classifier plus a new head.

    Args:
        encoder: the encoder (a SentenceTransformer returns a dict: ``token_embeddings``,
            ``sentence_embedding``, ...).
        head: the new head, fed the encoder's output.
        output_key: the entry of a dict output fed to the head (default
            ``"sentence_embedding"``); a tensor output is fed as is.
    """

    def __init__(
        self, encoder: nn.Module, head: nn.Module, output_key: str | None = "sentence_embedding"
    ):
        super().__init__()
        self.encoder = encoder
        self.head = head
        self.output_key = output_key

    def forward(self, x: Any) -> Any:
        # A dict goes to the encoder as keywords or as one argument (fastft.model.calling).
        return self.head(_pick_output(call_model(self.encoder, x), self.output_key))

    def extra_repr(self) -> str:
        return f"output_key={self.output_key!r}"


def append_head(
    model: nn.Module,
    modules: nn.Module | Sequence[nn.Module],
    *,
    output_key: str | None = "sentence_embedding",
) -> EncoderWithHead:
    """Return ``EncoderWithHead(model, head, output_key)`` running ``model`` then ``modules``.

    For encoders with no classifier (e.g. a SentenceTransformer). ``model`` itself is not
    copied.

    Args:
        model: the encoder.
        modules: one module, or a list run in order as an ``nn.Sequential``: the head,
            recorded as new and moved to the encoder's device and floating dtype (a
            ``.half()`` encoder gets an fp16 head).
        output_key: the entry of a dict output fed to the head (default
            ``"sentence_embedding"``; see :class:`EncoderWithHead`).
    """
    if isinstance(modules, nn.Module):
        modules = [modules]
    modules = list(modules)
    if not modules or not all(isinstance(m, nn.Module) for m in modules):
        raise SurgeryError(
            "append_head needs one or more nn.Module objects to run after the model."
        )
    head = modules[0] if len(modules) == 1 else nn.Sequential(*modules)
    place_like(head, model)
    return EncoderWithHead(model, mark_new(head), output_key=output_key)
