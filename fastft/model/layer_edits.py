"""Adding and removing hidden layers: :func:`insert_layers` runs new modules after a named
one, :func:`remove_layers` drops modules once it has checked that the shapes still fit.
"""

from __future__ import annotations

import collections
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

import torch
from torch import nn

from fastft.errors import SurgeryError
from fastft.model.calling import call_model
from fastft.model.status import all_eval, get_module, mark_new, parent_of, place_like

__all__ = ["insert_layers", "remove_layers"]


def insert_layers(
    model: nn.Module, after: str, modules: nn.Module | Sequence[nn.Module]
) -> list[str]:
    """Run new ``modules`` right after the module called ``after``; return their names.

    Inside an ``nn.Sequential`` they are inserted in place (a numbered Sequential is
    renumbered, so later entries' names shift by ``len(modules)``). Anywhere else (a plain
    attribute, a ``ModuleList`` entry) the target is wrapped: ``after`` becomes
    ``nn.Sequential(target, *modules)``, so the target's own name gains a ``.0``; the target
    must then take one input and return one tensor.

    Args:
        model: the model, edited in place.
        after: the qualified name of the module the new ones follow.
        modules: one module or a list, run in order; each is recorded as new and moved to
            the device and floating dtype of ``after`` (of the model when ``after`` has no
            parameters, e.g. a ReLU).
    """
    if isinstance(modules, nn.Module):
        modules = [modules]
    modules = list(modules)
    if not modules or not all(isinstance(m, nn.Module) for m in modules):
        raise SurgeryError("insert_layers needs one or more nn.Module objects in modules=.")
    target = get_module(model, after)
    parent, key = parent_of(model, after)
    for m in modules:
        mark_new(m)
        place_like(m, target, model)  # the target's device and dtype (else the model's)
    if isinstance(parent, nn.Sequential):
        items = list(parent._modules.items())
        at = [k for k, _ in items].index(key) + 1
        numbered = all(k.isdigit() for k, _ in items)
        existing = set(parent._modules)
        fresh = []
        for i, _ in enumerate(modules):
            base = f"{key}_new" if i == 0 else f"{key}_new{i}"
            while base in existing:  # keep names unique if inserted twice at the same place
                base += "_"
            existing.add(base)
            fresh.append(base)
        new_items = items[:at] + list(zip(fresh, modules)) + items[at:]
        if numbered:
            new_items = [(str(i), m) for i, (_, m) in enumerate(new_items)]
        parent._modules = collections.OrderedDict(new_items)
        prefix = after.rpartition(".")[0]
        keys = [k for k, m in new_items if any(m is x for x in modules)]
        return [f"{prefix}.{k}" if prefix else k for k in keys]
    setattr(parent, key, nn.Sequential(target, *modules))
    return [f"{after}.{i + 1}" for i in range(len(modules))]


# Widths of layers whose input and output feature sizes are known from their attributes.
def _widths(m: nn.Module) -> tuple[int | None, int | None] | None:
    """(input width, output width) of m when known; None for an unknown layer."""
    if isinstance(m, nn.Linear):
        return m.in_features, m.out_features
    if isinstance(m, nn.modules.conv._ConvNd):
        return m.in_channels, m.out_channels
    if isinstance(m, nn.modules.batchnorm._BatchNorm):
        return m.num_features, m.num_features
    if isinstance(m, nn.LayerNorm) and m.normalized_shape:
        return m.normalized_shape[-1], m.normalized_shape[-1]
    if isinstance(m, nn.Embedding):
        return None, m.embedding_dim
    if _keeps_width(m):
        return None, None
    if isinstance(m, nn.Sequential) and len(m):
        chain = [_widths(c) for c in m]
        if any(w is None for w in chain):
            return None
        ins = [w[0] for w in chain if w[0] is not None or w[1] is not None]
        outs = [w[1] for w in chain if w[0] is not None or w[1] is not None]
        return (ins[0] if ins else None), (outs[-1] if outs else None)
    return None


def _keeps_width(m: nn.Module) -> bool:
    """Parameterless layers that do not change the feature width."""
    return isinstance(m, (nn.Identity, nn.modules.dropout._DropoutNd)) or (
        type(m).__module__ == "torch.nn.modules.activation"
        and not any(True for _ in m.parameters())
    )


def _check_gap(entries: list[tuple[str, nn.Module]], removed: set[str], where: str) -> None:
    """In a Sequential whose ``removed`` keys go away, the nearest known output width before
    each gap must equal the nearest known input width after it."""
    keys = [k for k, _ in entries]
    for k in removed:
        i = keys.index(k)
        prev_out = next_in = None
        for j in range(i - 1, -1, -1):  # nearest kept layer before the gap with a known width
            if keys[j] in removed:
                continue
            w = _widths(entries[j][1])
            if w is None or w[1] is not None:
                prev_out = None if w is None else (w[1], keys[j])
                break
        for j in range(i + 1, len(keys)):
            if keys[j] in removed:
                continue
            w = _widths(entries[j][1])
            if w is None or w[0] is not None:
                next_in = None if w is None else (w[0], keys[j])
                break
        if prev_out and next_in and prev_out[0] != next_in[0]:
            raise SurgeryError(
                f"removing {where}.{k} leaves {where}.{prev_out[1]} (output width {prev_out[0]}) "
                f"feeding {where}.{next_in[1]} (input width {next_in[0]}): the shapes no longer "
                "fit. Remove the layers in between as well, or replace one of them with "
                "insert_layers/replace_head."
            )


def remove_layers(
    model: nn.Module, names: str | Iterable[str], *, example_inputs: Any = None
) -> dict[str, nn.Module]:
    """Remove modules; return ``{name: removed module}``.

    Entries of an ``nn.Sequential`` or ``nn.ModuleList`` are dropped (numbered containers are
    renumbered, e.g. ``encoder.layer.4`` and ``.5`` removed keeps 4 of 6 transformer layers);
    any other module is replaced by ``nn.Identity``. Shapes must still fit: layers with known
    widths (Linear, Conv, norms) on both sides of a removed Sequential entry must agree and
    an Identity replacement must not change the width. On any error nothing is changed.

    Args:
        model: the model, edited in place.
        names: qualified names of the modules to remove (one or several).
        example_inputs: a batch the edited model is run on once, as a check (default None:
            no run).
    """
    names = [names] if isinstance(names, str) else list(names)
    if not names:
        raise SurgeryError("remove_layers needs at least one module name.")
    for n in names:
        get_module(model, n)  # unknown names: error with suggestions, before changing anything
    if len(set(names)) != len(names):
        raise SurgeryError(f"remove_layers got a name twice: {names}.")
    groups: dict[int, tuple[nn.Module, str, list[str]]] = {}
    for n in names:
        parent, key = parent_of(model, n)
        groups.setdefault(id(parent), (parent, n.rpartition(".")[0], []))[2].append(key)
    saved = [(parent, collections.OrderedDict(parent._modules)) for parent, _, _ in groups.values()]
    removed: dict[str, nn.Module] = {n: model.get_submodule(n) for n in names}
    # Check every container before touching any.
    for parent, where, keys in groups.values():
        if isinstance(parent, nn.Sequential):
            _check_gap(list(parent._modules.items()), set(keys), where or "model")
        elif not isinstance(parent, nn.ModuleList):
            for k in keys:
                w = _widths(parent._modules[k])
                if w and w[0] is not None and w[1] is not None and w[0] != w[1]:
                    name = f"{where}.{k}" if where else k
                    raise SurgeryError(
                        f"{name!r} maps width {w[0]} to {w[1]}; replacing it with nn.Identity "
                        "would change the width seen by the next layer. Remove a whole "
                        "Sequential/ModuleList entry instead."
                    )
    for parent, _, keys in groups.values():
        if isinstance(parent, (nn.Sequential, nn.ModuleList)):
            kept = [(k, m) for k, m in parent._modules.items() if k not in keys]
            if all(k.isdigit() for k in parent._modules):
                kept = [(str(i), m) for i, (_, m) in enumerate(kept)]
            parent._modules = collections.OrderedDict(kept)
        else:
            for k in keys:
                setattr(parent, k, nn.Identity())
    if example_inputs is not None:
        try:
            with torch.no_grad(), all_eval(model):
                call_model(
                    model,
                    dict(example_inputs) if isinstance(example_inputs, Mapping) else example_inputs,
                )
        except Exception as exc:
            for parent, modules in saved:
                parent._modules = modules
            raise SurgeryError(
                f"after removing {', '.join(names)} the model no longer runs on the example inputs "
                f"({type(exc).__name__}: {exc}); nothing was removed."
            ) from exc
    return removed
