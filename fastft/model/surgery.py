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
"""

from __future__ import annotations

import collections
import fnmatch
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

import torch
import torch.fx
from torch import nn

from fastft.errors import SurgeryError
from fastft.model.heads import find_head
from fastft.model.status import (
    all_eval,
    close_names,
    get_module,
    is_marked_new,
    mark_new,
    parent_of,
    suggest,
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


# ---------------------------------------------------------------------------- the new record
def new_modules(model: nn.Module) -> list[str]:
    """Current qualified names of the modules added by surgery (outermost ones only, in
    ``named_modules`` order: an inserted ``Sequential`` is listed, not its children)."""
    names: list[str] = []
    for name, m in model.named_modules():
        if is_marked_new(m) and not any(name.startswith(n + ".") or n == "" for n in names):
            names.append(name)
    return names


def _new_param_names(model: nn.Module) -> set[str]:
    prefixes = new_modules(model)
    return {
        n
        for n, _ in model.named_parameters()
        if any(p == "" or n.startswith(p + ".") for p in prefixes)
    }


def _set_module(model: nn.Module, name: str, module: nn.Module) -> None:
    parent, key = parent_of(model, name)
    setattr(parent, key, module)


def _device_of(module: nn.Module) -> torch.device | None:
    t = next(iter([*module.parameters(), *module.buffers()]), None)
    return None if t is None else t.device


# ---------------------------------------------------------------------------- output layer
def replace_head(
    model: nn.Module,
    num_classes: int | None = None,
    module: nn.Module | None = None,
    name: str | None = None,
) -> nn.Module:
    """Swap the output layer for a new one, in place, and return the new module.

    Give either ``num_classes`` (a new ``nn.Linear(in_features, num_classes)`` with the old
    layer's ``in_features``, bias setting, dtype and device) or ``module`` (used as is,
    moved to the old layer's device). ``name`` picks the layer; by default
    :func:`find_head` finds it. The new module is recorded as new.
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
        if not isinstance(in_features, int):
            raise SurgeryError(
                f"cannot infer the input width of {name!r} ({type(old).__name__} has no in_features); "
                "pass module= with the new output layer instead of num_classes=."
            )
        weight = getattr(old, "weight", None)
        kw = {} if weight is None else {"device": weight.device, "dtype": weight.dtype}
        module = nn.Linear(
            in_features, num_classes, bias=getattr(old, "bias", None) is not None, **kw
        )
    elif not isinstance(module, nn.Module):
        raise SurgeryError(f"module= must be an nn.Module, got {type(module).__name__}.")
    else:
        device = _device_of(old)
        if device is not None:
            module.to(device)
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

    When the encoder returns a dict (a SentenceTransformer returns ``token_embeddings``,
    ``sentence_embedding``, ...) the entry ``output_key`` is fed to the head; a tensor output
    is fed as is. Attributes: ``encoder``, ``head``, ``output_key``.
    """

    def __init__(
        self, encoder: nn.Module, head: nn.Module, output_key: str | None = "sentence_embedding"
    ):
        super().__init__()
        self.encoder = encoder
        self.head = head
        self.output_key = output_key

    def forward(self, x: Any) -> Any:
        return self.head(_pick_output(self.encoder(x), self.output_key))

    def extra_repr(self) -> str:
        return f"output_key={self.output_key!r}"


def append_head(
    model: nn.Module,
    modules: nn.Module | Sequence[nn.Module],
    *,
    output_key: str | None = "sentence_embedding",
) -> EncoderWithHead:
    """Return ``EncoderWithHead(model, head, output_key)`` running ``model`` then ``modules``.

    For encoders with no classifier (e.g. a SentenceTransformer): ``modules`` (one module,
    or a list run in order as an ``nn.Sequential``) become the head, recorded as new and
    moved to the encoder's device. ``model`` itself is not copied.
    """
    if isinstance(modules, nn.Module):
        modules = [modules]
    modules = list(modules)
    if not modules or not all(isinstance(m, nn.Module) for m in modules):
        raise SurgeryError(
            "append_head needs one or more nn.Module objects to run after the model."
        )
    head = modules[0] if len(modules) == 1 else nn.Sequential(*modules)
    device = _device_of(model)
    if device is not None:
        head.to(device)
    return EncoderWithHead(model, mark_new(head), output_key=output_key)


# ---------------------------------------------------------------------------- hidden layers
def insert_layers(
    model: nn.Module, after: str, modules: nn.Module | Sequence[nn.Module]
) -> list[str]:
    """Run new ``modules`` right after the module called ``after``; return their names.

    Inside an ``nn.Sequential`` they are inserted in place (a numbered Sequential is
    renumbered, so later entries' names shift by ``len(modules)``). Anywhere else (a plain
    attribute, a ``ModuleList`` entry) the target is wrapped: ``after`` becomes
    ``nn.Sequential(target, *modules)``, so the target's own name gains a ``.0``; the target
    must then take one input and return one tensor. Each inserted module is recorded as new.
    """
    if isinstance(modules, nn.Module):
        modules = [modules]
    modules = list(modules)
    if not modules or not all(isinstance(m, nn.Module) for m in modules):
        raise SurgeryError("insert_layers needs one or more nn.Module objects in modules=.")
    target = get_module(model, after)
    parent, key = parent_of(model, after)
    device = _device_of(target)
    for m in modules:
        mark_new(m)
        if device is not None:
            m.to(device)
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
                f"removing {where}.{k} leaves {where}.{prev_out[1]} (output width {prev_out[0]}) feeding "
                f"{where}.{next_in[1]} (input width {next_in[0]}): the shapes no longer fit. Remove the "
                "layers in between as well, or replace one of them with insert_layers/replace_head."
            )


def remove_layers(
    model: nn.Module, names: str | Iterable[str], *, example_inputs: Any = None
) -> dict[str, nn.Module]:
    """Remove modules; return ``{name: removed module}``.

    Entries of an ``nn.Sequential`` or ``nn.ModuleList`` are dropped (numbered containers are
    renumbered, e.g. ``encoder.layer.4`` and ``.5`` removed keeps 4 of 6 transformer layers);
    any other module is replaced by ``nn.Identity``. Shapes must still fit: layers with known
    widths (Linear, Conv, norms) on both sides of a removed Sequential entry must agree, an
    Identity replacement must not change the width, and when ``example_inputs`` is given the
    edited model is run once on them. On any of these errors nothing is changed.
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
                        f"{name!r} maps width {w[0]} to {w[1]}; replacing it with nn.Identity would change "
                        "the width seen by the next layer. Remove a whole Sequential/ModuleList entry instead."
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
                model(
                    dict(example_inputs) if isinstance(example_inputs, Mapping) else example_inputs
                )
        except Exception as exc:
            for parent, modules in saved:
                parent._modules = modules
            raise SurgeryError(
                f"after removing {', '.join(names)} the model no longer runs on the example inputs "
                f"({type(exc).__name__}: {exc}); nothing was removed."
            ) from exc
    return removed


# ---------------------------------------------------------------------------- freezing
def _select(model: nn.Module, names, patterns, depth) -> tuple[list[str], bool]:
    """Parameter names selected by names / patterns / depth; (names, whether anything was asked)."""
    params = [n for n, _ in model.named_parameters()]
    modules = [n for n, _ in model.named_modules() if n]
    asked = names is not None or patterns is not None or depth is not None
    if not asked:
        return params, False
    chosen: set[str] = set()

    def under(param: str, prefix: str) -> bool:
        return param == prefix or param.startswith(prefix + ".")

    for n in [names] if isinstance(names, str) else list(names or []):
        hit = [p for p in params if under(p, n)]
        if n not in params and n not in modules:
            raise SurgeryError(suggest(n, modules + params, "module or parameter"))
        chosen.update(hit)
    for pat in [patterns] if isinstance(patterns, str) else list(patterns or []):
        hit = [
            p
            for p in params
            if any(
                fnmatch.fnmatchcase(".".join(p.split(".")[:i]), pat)
                for i in range(1, p.count(".") + 2)
            )
        ]
        if not hit:
            close = close_names(
                pat.replace("*", "").replace("?", "").strip(".") or pat, modules + params
            )
            raise SurgeryError(
                f"pattern {pat!r} matches no parameter or module (a pattern matching nothing is an error, "
                "not a no-op); "
                + (
                    f"names close to it: {', '.join(map(repr, close))}."
                    if close
                    else f"top-level names: {', '.join(sorted({m.split('.')[0] for m in modules}))}."
                )
            )
        chosen.update(hit)
    if depth is not None:
        if not isinstance(depth, int) or isinstance(depth, bool) or depth < 0:
            raise SurgeryError(f"depth must be a non-negative int, got {depth!r}.")
        tops = [k for k, m in model.named_children() if any(True for _ in m.parameters())]
        if depth > len(tops):
            raise SurgeryError(
                f"depth={depth} but the model has only {len(tops)} top-level modules with parameters: {tops}."
            )
        for k in tops[:depth]:
            chosen.update(p for p in params if under(p, k))
    return [p for p in params if p in chosen], True


def freeze(
    model: nn.Module,
    names: str | Iterable[str] | None = None,
    patterns: str | Iterable[str] | None = None,
    depth: int | None = None,
    except_new: bool = False,
) -> list[str]:
    """Set ``requires_grad=False``; return the names of the parameters frozen.

    Selection (union of what is given; everything when nothing is given):
    ``names``: modules or parameters by qualified name; ``patterns``: glob patterns
    (``fnmatch``) matched against module and parameter names, e.g. ``"encoder.layer.[0-3]*"``;
    ``depth``: the first ``depth`` top-level children that hold parameters.
    ``except_new=True`` leaves the modules recorded as new out of the selection, so
    ``freeze(model, except_new=True)`` freezes everything that is not new.
    """
    selected, _ = _select(model, names, patterns, depth)
    if except_new:
        new = _new_param_names(model)
        selected = [p for p in selected if p not in new]
    _set_requires_grad(model, selected, False)
    return selected


def unfreeze(
    model: nn.Module,
    names: str | Iterable[str] | None = None,
    patterns: str | Iterable[str] | None = None,
    depth: int | None = None,
) -> list[str]:
    """Set ``requires_grad=True`` on the selection (as in :func:`freeze`; everything when
    nothing is given); return the names of the parameters unfrozen."""
    selected, _ = _select(model, names, patterns, depth)
    _set_requires_grad(model, selected, True)
    return selected


def _set_requires_grad(model: nn.Module, names: list[str], flag: bool) -> None:
    wanted = set(names)
    for n, p in model.named_parameters():
        if n in wanted:
            p.requires_grad_(flag)


# ---------------------------------------------------------------------------- summary
def summary(model: nn.Module) -> str:
    """A table of the top-level modules: type, parameter count, trainable count, status
    (``new``, ``frozen``, ``trainable``, ``partly trainable``, or ``-`` without parameters)."""
    rows = [("name", "type", "params", "trainable", "status")]
    total = trainable = 0
    new_prefixes = new_modules(model)

    def is_new(name: str) -> bool:
        return any(p == "" or name == p or name.startswith(p + ".") for p in new_prefixes)

    entries = list(model.named_children())
    direct = list(model.named_parameters(recurse=False))
    for name, child in entries + ([("(own parameters)", None)] if direct else []):
        ps = [p for _, p in direct] if child is None else list(child.parameters())
        n = sum(p.numel() for p in ps)
        t = sum(p.numel() for p in ps if p.requires_grad)
        total, trainable = total + n, trainable + t
        has_new = child is not None and (
            is_new(name) or any(is_new(f"{name}.{c}") for c, _ in child.named_modules() if c)
        )
        if child is not None and is_new(name):
            status = "new"
        elif not ps:
            status = "-"
        elif t == 0:
            status = "frozen"
        elif t == n:
            status = "trainable"
        else:
            status = "partly trainable"
        if has_new and status != "new":
            status += " (holds new)"
        rows.append(
            (name, "-" if child is None else type(child).__name__, f"{n:,}", f"{t:,}", status)
        )
    rows.append(("total", "", f"{total:,}", f"{trainable:,}", ""))
    widths = [max(len(r[i]) for r in rows) for i in range(5)]
    lines = []
    for i, r in enumerate(rows):
        lines.append(
            "  ".join(
                c.rjust(w) if j in (2, 3) else c.ljust(w) for j, (c, w) in enumerate(zip(r, widths))
            ).rstrip()
        )
        if i == 0 or i == len(rows) - 2:
            lines.append("  ".join("-" * w for w in widths))
    return "\n".join(lines)
