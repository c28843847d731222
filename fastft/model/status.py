"""Module bookkeeping shared by surgery and split: which modules are new, frozen or trainable.

A module added by surgery is marked *new* by an attribute on the module object itself
(``module._fastft_new = True``), not by its name: names move when later surgery wraps,
inserts or removes modules, the object does not. The mark is a plain bool in the module's
``__dict__``, so deepcopy, pickling and ``state_dict`` are unaffected.

Also here: the lookups surgery does (a module by name, with close names suggested when it
is unknown; its parent; its device), :func:`new_modules` (the current names of the modules
marked new) and :func:`summary` (a table of the top-level modules and their status).
"""

from __future__ import annotations

import contextlib
import difflib
import os
import sys
import warnings
from collections.abc import Iterable, Iterator

import torch
from torch import nn

from fastft.errors import SurgeryError

#: fastft's own folder: frames in it are skipped when a warning points at the user's line.
_PACKAGE_DIR = os.path.dirname(os.path.dirname(os.path.abspath(__file__))) + os.sep

NEW_ATTR = "_fastft_new"
FROZEN_STATS_ATTR = "_fastft_frozen_stats"  # set by fastft.model.blocks on BatchNorm layers

# Status of a module, from its parameters and marks (see classify).
NEW, FROZEN, TRAINABLE, MIXED = "new", "frozen", "trainable", "mixed"


def mark_new(module: nn.Module) -> nn.Module:
    """Record ``module`` (and so everything inside it) as added by surgery."""
    module.__dict__[NEW_ATTR] = True
    return module


def is_marked_new(module: nn.Module) -> bool:
    return bool(module.__dict__.get(NEW_ATTR, False))


def classify(root: nn.Module) -> dict[int, str]:
    """Status of every module under ``root``, keyed by ``id(module)``.

    - ``new``: marked new, or inside a module marked new;
    - ``frozen``: no parameter requires grad and nothing new inside (parameterless modules
      such as ReLU are frozen too: they have nothing to train);
    - ``trainable``: has parameters, all of them require grad, nothing new inside;
    - ``mixed``: anything else (a container holding frozen and trainable or new parts; e.g. a
      ``Sequential(Dropout, Linear)`` whose Linear was replaced: its Dropout stays frozen).
    """
    status: dict[int, str] = {}

    def visit(m: nn.Module, under_new: bool) -> bool:
        """Fill status for m's subtree; return whether it holds something new."""
        new = under_new or is_marked_new(m)
        has_new = any([visit(c, new) for c in m.children()])  # list: visit every child
        if new:
            status[id(m)] = NEW
            return True
        grads = [p.requires_grad for p in m.parameters()]
        if not any(grads) and not has_new:
            status[id(m)] = FROZEN
        elif grads and all(grads) and not has_new:
            status[id(m)] = TRAINABLE
        else:
            status[id(m)] = MIXED
        return has_new

    visit(root, False)
    return status


def eval_modules(root: nn.Module, status: dict[int, str] | None = None) -> list[nn.Module]:
    """Modules that must run in eval mode: frozen ones not inside a new or trainable module.

    A parameterless Dropout inside a new head trains with the head; a Dropout or BatchNorm
    among frozen layers uses its eval behaviour (no dropout, running statistics).
    """
    status = classify(root) if status is None else status
    out: list[nn.Module] = []

    def visit(m: nn.Module) -> None:
        s = status.get(id(m), FROZEN)
        if s in (NEW, TRAINABLE):
            # BatchNorm layers of an unfrozen block keep their running statistics (see
            # fastft.model.blocks): they run in eval mode although their weights train.
            out.extend(x for x in m.modules() if x.__dict__.get(FROZEN_STATS_ATTR))
            return
        if s == FROZEN:
            out.extend(m.modules())
            return
        for c in m.children():
            visit(c)

    visit(root)
    return out


def differs_in_train_mode(m: nn.Module) -> bool:
    """Whether ``m`` in train mode computes something else than in eval mode: dropout with
    ``p > 0``, BatchNorm that keeps running statistics, or a class that overrides ``train()``
    (a module of its own with a train-mode behaviour)."""
    if isinstance(m, nn.modules.dropout._DropoutNd):
        return m.p > 0
    if isinstance(m, nn.modules.batchnorm._BatchNorm):
        return m.track_running_stats and not m.__dict__.get(FROZEN_STATS_ATTR)
    return type(m).train is not nn.Module.train


def train_mode_offenders(root: nn.Module, status: dict[int, str] | None = None) -> list[str]:
    """Names of the frozen modules of ``root`` left in train mode whose output that changes
    (:func:`differs_in_train_mode`): fastft runs them in eval mode, which a user who left
    them in train mode may not expect. BatchNorm layers that keep their statistics in an
    unfrozen block (``unfreeze(train_bn=False)``) are as the user asked: not listed."""
    names = {id(m): n for n, m in root.named_modules()}
    return [
        names.get(id(m), "?")
        for m in eval_modules(root, status)
        if m.training and differs_in_train_mode(m)
    ]


def train_mode_message(offenders: list[str]) -> str:
    """The warning about frozen modules found in train mode (see :func:`train_mode_offenders`)."""
    shown = ", ".join(repr(n) for n in offenders[:4]) + (", ..." if len(offenders) > 4 else "")
    return (
        f"fastft runs the frozen layers in eval mode: {len(offenders)} frozen "
        f"dropout/BatchNorm module(s) were in train mode ({shown}); their eval behaviour is "
        "used (running statistics, no dropout). Call model.eval() before fastft to say that "
        "this is meant."
    )


@contextlib.contextmanager
def eval_mode(modules: Iterable[nn.Module]) -> Iterator[None]:
    """Put ``modules`` in eval mode for the block, then restore each one's own flag."""
    saved = [(m, m.training) for m in modules]
    try:
        for m, _ in saved:
            m.training = False
        yield
    finally:
        for m, flag in saved:
            m.training = flag


@contextlib.contextmanager
def all_eval(root: nn.Module) -> Iterator[None]:
    """The whole of ``root`` in eval mode for the block; every module's flag restored after."""
    with eval_mode(list(root.modules())):
        yield


def close_names(name: str, candidates: Iterable[str]) -> list[str]:
    """Up to four existing names closest to ``name``."""
    return difflib.get_close_matches(name, [c for c in candidates if c], n=4, cutoff=0.5)


def suggest(name: str, candidates: Iterable[str], what: str = "module") -> str:
    """'unknown module 'x'; did you mean ...?' with the closest existing names."""
    candidates = [c for c in candidates if c]
    close = close_names(name, candidates)
    if close:
        return f"unknown {what} {name!r}; did you mean {', '.join(repr(c) for c in close)}?"
    top = sorted({c.split(".")[0] for c in candidates})
    return f"unknown {what} {name!r}; top-level names are: {', '.join(top[:20]) or '(none)'}."


def get_module(model: nn.Module, name: str) -> nn.Module:
    """``model.get_submodule(name)`` with a SurgeryError that suggests close names."""
    if not isinstance(name, str) or not name:
        raise SurgeryError(
            f"a module name must be a non-empty string like 'encoder.layer.3', got {name!r}."
        )
    try:
        return model.get_submodule(name)
    except AttributeError:
        raise SurgeryError(suggest(name, (n for n, _ in model.named_modules()))) from None


def parent_of(model: nn.Module, name: str) -> tuple[nn.Module, str]:
    """(parent module, key in the parent) of the module called ``name``."""
    get_module(model, name)
    parent_name, _, key = name.rpartition(".")
    return (model.get_submodule(parent_name) if parent_name else model), key


# ---------------------------------------------------------------------------- new modules
def new_modules(model: nn.Module) -> list[str]:
    """Current qualified names of the modules added by surgery (outermost ones only, in
    ``named_modules`` order: an inserted ``Sequential`` is listed, not its children).

    Args:
        model: the edited model.
    """
    names: list[str] = []
    for name, m in model.named_modules():
        if is_marked_new(m) and not any(name.startswith(n + ".") or n == "" for n in names):
            names.append(name)
    return names


def device_of(module: nn.Module) -> torch.device | None:
    """The device of ``module``'s first parameter or buffer (None when it has neither)."""
    t = next(iter([*module.parameters(), *module.buffers()]), None)
    return None if t is None else t.device


def float_dtype_of(module: nn.Module) -> torch.dtype | None:
    """The dtype of ``module``'s first floating-point parameter or buffer (None without one):
    the dtype new layers put in it are made in (a ``.half()`` model gets fp16 layers)."""
    for t in [*module.parameters(), *module.buffers()]:
        if t.is_floating_point():
            return t.dtype
    return None


def place_like(new: nn.Module, *refs: nn.Module) -> nn.Module:
    """Move ``new`` to the device and floating dtype of the first of ``refs`` that has
    parameters or buffers (a replaced layer, then the model holding it); returns ``new``.
    Integer tensors (indices, counters) keep their dtype."""
    for ref in refs:
        device, dtype = device_of(ref), float_dtype_of(ref)
        if device is not None:
            new.to(device=device)
            if dtype is not None:
                new.to(dtype=dtype)
            break
    return new


# ---------------------------------------------------------------------------- warnings
def warn_user(message: str, category: type[Warning] = UserWarning) -> None:
    """``warnings.warn`` pointing at the first line outside fastft that led here (the user's
    ``fit(...)``), however deep inside fastft the warning is raised."""
    frame, level = sys._getframe(1), 2  # level 2: the function that called warn_user
    while frame is not None and frame.f_code.co_filename.startswith(_PACKAGE_DIR):
        frame, level = frame.f_back, level + 1
    warnings.warn(message, category, stacklevel=level)


# ---------------------------------------------------------------------------- summary
def summary(model: nn.Module) -> str:
    """A table of the top-level modules: type, parameter count, trainable count, status
    (``new``, ``frozen``, ``trainable``, ``partly trainable``, or ``-`` without parameters).

    Args:
        model: the model to describe.
    """
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
