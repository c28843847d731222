"""The two parts of a split model: the frozen prefix (run once per sample, cached) and the
trainable tail (trained on the cache)."""

from __future__ import annotations

import re
from collections.abc import Mapping
from typing import Any

import torch
from torch import nn

from fastft.model.calling import logits_of, structured_output
from fastft.model.status import eval_mode, eval_modules

_ADDRESS = re.compile(r" at 0x[0-9a-fA-F]+")


def shallow(x: Any) -> Any:
    # Some encoders (SentenceTransformer) add their outputs to the input dict: never let them
    # write into the caller's batch.
    return dict(x) if isinstance(x, Mapping) else x


class FrozenPrefix(nn.Module):
    """The frozen part of a split model: ``prefix(x)`` returns a tuple of tap tensors.

    Made by :func:`fastft.split`. Always runs in eval mode and under ``torch.no_grad()``;
    ``train(mode)`` changes only its own flag. Its parameters are exactly the frozen ones it
    uses.

    Args:
        body: the module that computes the taps from the model's inputs.
        tap_names: one name per tap (batch in dim 0 of each), kept as ``tap_names``.
        method: the split method that made it (``"fx"``, ``"hook"`` or ``"replay"``).
        signature: text of the frozen structure and the cut, for the cache key (see
            :meth:`signature`; memory addresses are removed).
        key_mask: the modules and parameters trainable at the split, left out of the cache
            key (see :meth:`key_mask`); default none.
    """

    _fastft_prefix = True  # asked for its signature() and key_mask() by the cache key

    def __init__(
        self,
        body: nn.Module,
        tap_names: list[str],
        method: str,
        signature: str,
        key_mask: tuple[list[nn.Module], list[nn.Parameter]] = ([], []),
    ):
        super().__init__()
        self.body = body
        self.tap_names = list(tap_names)
        self.method = method
        self._signature = _ADDRESS.sub("", signature)
        # Plain lists (not registered): the trainable modules run after the cut, in the tail.
        self.__dict__["_key_mask"] = (list(key_mask[0]), list(key_mask[1]))

    def signature(self) -> str:
        """Deterministic text of the frozen structure and the cut (graph code or module
        reprs, tap names): changes with either, never with parameter values or addresses."""
        return self._signature

    def key_mask(self) -> tuple[list[nn.Module], list[nn.Parameter]]:
        """The modules and parameters that were trainable when the model was split: they run
        after the cut, so the cache key leaves them out (training them does not change the
        features). Everything else the prefix can reach counts, frozen or not."""
        return self.__dict__["_key_mask"]

    def _eval_targets(self) -> list[nn.Module]:
        targets = getattr(self.body, "eval_targets", None)
        return targets() if callable(targets) else list(self.body.modules())

    def train(self, mode: bool = True) -> FrozenPrefix:
        self.training = mode
        for m in self._eval_targets():
            m.training = False
        return self

    def forward(self, x: Any) -> tuple[torch.Tensor, ...]:
        with torch.no_grad(), eval_mode(self._eval_targets()):
            return tuple(self.body(shallow(x)))

    def extra_repr(self) -> str:
        return f"method={self.method!r}, taps={self.tap_names}"


class TrainableTail(nn.Module):
    """The trainable part of a split model: ``tail(*taps)`` returns the model's output, or
    its logits when the model returns them inside a structure (a ``ModelOutput``, a dataclass
    or dict with ``logits``, a tuple; see :func:`fastft.model.calling.logits_of`).

    Made by :func:`fastft.split`. Holds the new and unfrozen modules (shared with the model,
    not copied) and any frozen modules that run after them; those stay in eval mode and
    frozen even under ``tail.train()``.

    Args:
        body: the module that computes the output from the taps.
        tap_names: the names of the taps it takes, in order (the prefix's).
        method: the split method that made it (``"fx"``, ``"hook"`` or ``"replay"``).
    """

    def __init__(self, body: nn.Module, tap_names: list[str], method: str):
        super().__init__()
        self.body = body
        self.tap_names = list(tap_names)
        self.method = method

    def frozen_modules(self) -> list[nn.Module]:
        """Modules of the tail kept in eval mode (frozen, not inside a trainable module)."""
        # Recomputed only when the tail's modules or requires_grad flags change (a sweep swaps
        # heads in place): classifying every module on every training step would cost more
        # than a small head's forward.
        key = (
            tuple(map(id, self.body.modules())),
            tuple(p.requires_grad for p in self.body.parameters()),
        )
        cached = self.__dict__.get("_frozen_cache")
        if cached is None or cached[0] != key:
            cached = (key, [m for m in eval_modules(self.body) if m is not self.body])
            self.__dict__["_frozen_cache"] = cached
        return cached[1]

    def train(self, mode: bool = True) -> TrainableTail:
        super().train(mode)
        for m in self.frozen_modules():
            m.training = False
        return self

    def forward(self, *taps: torch.Tensor) -> Any:
        with eval_mode(self.frozen_modules()):
            out = self.body(*taps)
        # A ModelOutput, dataclass, dict with logits or tuple: training reads the logits.
        return logits_of(out) if structured_output(out) else out

    def extra_repr(self) -> str:
        return f"method={self.method!r}, taps={self.tap_names}"
