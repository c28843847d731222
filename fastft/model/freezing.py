"""Freezing and unfreezing: ``requires_grad`` set on the parameters chosen by name, glob
pattern or depth, leaving out on request the modules that surgery added (see
:func:`fastft.model.status.new_modules`).
"""

from __future__ import annotations

import fnmatch
from collections.abc import Iterable

from torch import nn

from fastft.errors import SurgeryError
from fastft.model.status import close_names, new_modules, suggest

__all__ = ["freeze", "unfreeze"]


def _new_param_names(model: nn.Module) -> set[str]:
    prefixes = new_modules(model)
    return {
        n
        for n, _ in model.named_parameters()
        if any(p == "" or n.startswith(p + ".") for p in prefixes)
    }


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
                f"pattern {pat!r} matches no parameter or module (a pattern matching nothing is an "
                "error, not a no-op); "
                + (
                    f"names close to it: {', '.join(map(repr, close))}."
                    if close
                    else "top-level names: "
                    f"{', '.join(sorted({m.split('.')[0] for m in modules}))}."
                )
            )
        chosen.update(hit)
    if depth is not None:
        if not isinstance(depth, int) or isinstance(depth, bool) or depth < 0:
            raise SurgeryError(f"depth must be a non-negative int, got {depth!r}.")
        tops = [k for k, m in model.named_children() if any(True for _ in m.parameters())]
        if depth > len(tops):
            raise SurgeryError(
                f"depth={depth} but the model has only {len(tops)} top-level modules with "
                f"parameters: {tops}."
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
    """Set ``requires_grad=False`` on a selection of parameters; return the names frozen.

    The selection is the union of what is given; everything when nothing is given.

    Args:
        model: the model, changed in place.
        names: modules or parameters by qualified name (one or several).
        patterns: glob patterns (``fnmatch``) matched against module and parameter names,
            e.g. ``"encoder.layer.[0-3]*"``.
        depth: the first ``depth`` top-level children that hold parameters.
        except_new: leave the modules recorded as new out of the selection (default False):
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
    """Set ``requires_grad=True`` on a selection of parameters; return the names unfrozen.

    Args:
        model: the model, changed in place.
        names, patterns, depth: the selection, as in :func:`freeze` (everything when
            nothing is given).
    """
    selected, _ = _select(model, names, patterns, depth)
    _set_requires_grad(model, selected, True)
    return selected


def _set_requires_grad(model: nn.Module, names: list[str], flag: bool) -> None:
    wanted = set(names)
    for n, p in model.named_parameters():
        if n in wanted:
            p.requires_grad_(flag)
