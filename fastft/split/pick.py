"""The last-token pick of decoder classifiers, moved in front of the head.

A Hugging Face ``*ForSequenceClassification`` decoder (GPT-2, Llama, ...) runs its output
layer ``score`` on every token and then keeps, per sample, the logits of the last token that
is not padding: ``logits[arange(B), last_non_pad]``, with ``last_non_pad`` the rightmost
position where ``input_ids != config.pad_token_id`` (the last position when the config has
no pad token). Caching the hidden states of every token for such a model would store ``T``
times what the head needs.

When the new head is *position-wise* (Linear layers, activations, dropout, LayerNorm: each
token's output depends on that token's features only), ``head(h)[b, t] == head(h[b, t])``,
so picking the token before the head gives the same logits. The split then caches one row
per sample, ``h[arange(B), last_non_pad]``, and the tail is the head alone. The pick rule is
the model's own (its ``config.pad_token_id`` and the ``input_ids``) and is checked on the
example batch: the head's per-token output at the picked positions must be exactly the
model's logits, and the split's parity check must hold.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch
from torch import nn

from fastft.split._common import CannotSplit

#: Layers that act on each position's features alone (the last axis).
_POSITIONWISE = (nn.Linear, nn.LayerNorm, nn.Identity, nn.modules.dropout._DropoutNd)


def positionwise(m: nn.Module) -> bool:
    """Whether ``m`` maps each position of a [..., features] tensor on its own."""
    if isinstance(m, nn.Sequential):
        return all(positionwise(c) for c in m)
    if isinstance(m, _POSITIONWISE):
        return True
    return type(m).__module__ == "torch.nn.modules.activation" and not any(
        True for _ in m.parameters()
    )


def last_token(input_ids: torch.Tensor, pad_token_id: int | None) -> torch.Tensor:
    """The position of each row's last non-pad token (Hugging Face's rule: the rightmost
    position whose id is not ``pad_token_id``; the last position without a pad token)."""
    length = input_ids.shape[-1]
    if pad_token_id is None:
        return torch.full(
            input_ids.shape[:1], length - 1, dtype=torch.long, device=input_ids.device
        )
    positions = torch.arange(length, device=input_ids.device, dtype=torch.int32)
    return (positions * (input_ids != pad_token_id).to(torch.int32)).argmax(-1)


class LastTokenPick(nn.Module):
    """``hidden[arange(B), last_token(input_ids, pad_token_id)]``: one row per sample."""

    def __init__(self, pad_token_id: int | None):
        super().__init__()
        self.pad_token_id = pad_token_id

    def forward(self, hidden: torch.Tensor, input_ids: torch.Tensor) -> torch.Tensor:
        rows = torch.arange(hidden.shape[0], device=hidden.device)
        return hidden[rows, last_token(input_ids, self.pad_token_id).to(hidden.device)]

    def extra_repr(self) -> str:
        return f"pad_token_id={self.pad_token_id}"


def plan(
    model: nn.Module, example: Any, chain: list[nn.Module], head_out: Any, logits: Any
) -> LastTokenPick | None:
    """The pick that turns the per-token ``head_out`` [B, T, C] into the model's ``logits``
    [B, C], when it is provably the same to pick before the head; :class:`CannotSplit`
    saying why when it is not; None when the shapes are not those of a pick at all."""
    if not (
        isinstance(head_out, torch.Tensor)
        and isinstance(logits, torch.Tensor)
        and head_out.dim() == 3
        and logits.dim() == 2
        and head_out.shape[0] == logits.shape[0]
        and head_out.shape[2] == logits.shape[1]
    ):
        return None  # not a per-token head's output reduced to one token
    config = getattr(model, "config", None)
    ids = example.get("input_ids") if isinstance(example, Mapping) else None
    if config is None or not hasattr(config, "pad_token_id") or not isinstance(ids, torch.Tensor):
        raise CannotSplit(
            "the model keeps one token's logits per sample, but fastft knows that rule only from "
            "config.pad_token_id and the input_ids (a Hugging Face decoder classifier)"
        )
    pick = LastTokenPick(config.pad_token_id)
    if not torch.equal(pick(head_out, ids), logits):
        raise CannotSplit(
            "the model's logits are not its per-token head's output at the last non-pad token "
            "of each sample"
        )
    bad = [type(m).__name__ for m in chain if not positionwise(m)]
    if bad:
        raise CannotSplit(
            f"the model picks the last token after its head, and the head ({', '.join(bad)}) is "
            "not position-wise (Linear, activations, dropout, LayerNorm), so picking before it "
            "would not be provably the same; use such a head"
        )
    return pick
