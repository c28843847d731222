"""Several layers of a backbone from one forward pass: :class:`TapStack`.

``TapStack(backbone, taps, pooling)`` is a module whose forward runs ``backbone`` once on a
batch and returns a dict ``{tap name: [B, D_tap]}``: the output of each named layer, pooled
per sample. It is the frozen prefix the feature cache builds from, so one cache holds every
tap of a backbone (one stored array per tap) and later probes of the same backbone, data,
taps and pooling reuse it by content address.

Pooling reduces a layer's positions to one vector per sample:

- ``"cls"``: the first position of a ``[B, L, D]`` sequence (a CLS token);
- ``"mean"``: the mean over positions (``[B, L, D]``) or over the spatial axes of a
  channel-first map (``[B, C, H, W]``; ``[B, C, L]`` from a tapped Conv1d, BatchNorm1d or
  1-D pool, or a Sequential ending in one; any other 3-D output is read as ``[B, L, D]``);
- ``"masked_mean"``: the mean over the positions whose ``attention_mask`` (an entry of a
  dict input) is non-zero, as sentence-transformers pool;
- ``"auto"``: ``masked_mean`` when the input is a dict with an ``attention_mask``, else ``mean``.

A ``[B, D]`` output is kept as it is; a tuple output (a Hugging Face layer's
``(hidden_states, ...)``) counts by its first tensor, a dict output (a Hugging Face model's
``ModelOutput``, as when tapping ``bert`` inside a classifier) by its first tensor entry
(``last_hidden_state``).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import torch
from torch import nn

from fastft.errors import FastFTValueError
from fastft.model.blocks import find_blocks
from fastft.model.calling import call_model

__all__ = ["TapStack", "POOLINGS", "default_taps", "pool"]

POOLINGS = ("auto", "cls", "mean", "masked_mean")

#: Names (last part) of the modules that embed a backbone's input before its first block.
EMBEDDING_NAMES = ("embeddings", "patch_embed", "embed_tokens", "wte", "embed")


class _AllTapsSeen(Exception):
    """Raised by the last tap's hook: the layers after it need not run."""


def default_taps(backbone: nn.Module) -> list[str]:
    """The embedding module's output (when one is found by name) and every block's output.

    Blocks are those of :func:`fastft.model.blocks.find_blocks` (``encoder.layer.3`` of a
    BERT, ``blocks.11`` of a ViT, ``layer4.2`` of a ResNet).
    """
    blocks = [name for name, _ in find_blocks(backbone)]
    if not blocks:
        raise FastFTValueError(
            f"found no stack of blocks in {type(backbone).__name__}; name the layers to probe "
            "with taps=[module names] (see model.named_modules())."
        )
    first = blocks[0]
    for name, _ in backbone.named_modules():
        if name and name.rsplit(".", 1)[-1] in EMBEDDING_NAMES and not first.startswith(name):
            return [name, *blocks]
    return blocks


#: Modules whose 3-D output is a channel-first ``[B, C, L]`` map, not a ``[B, L, D]`` sequence.
CHANNEL_FIRST_1D = (
    nn.Conv1d,
    nn.ConvTranspose1d,
    nn.BatchNorm1d,
    nn.InstanceNorm1d,
    nn.MaxPool1d,
    nn.AvgPool1d,
    nn.AdaptiveAvgPool1d,
    nn.AdaptiveMaxPool1d,
)


def is_channel_first_1d(module: nn.Module) -> bool:
    """Whether ``module`` (or the last layer of a Sequential) is a 1-D conv, norm or pool."""
    while isinstance(module, nn.Sequential) and len(module):
        module = module[-1]
    return isinstance(module, CHANNEL_FIRST_1D)


def pool(
    x: Any, how: str, mask: torch.Tensor | None, name: str, channel_first: bool = False
) -> torch.Tensor:
    """One tap's output ``x`` pooled to ``[B, D]`` (see the module docstring);
    ``channel_first``: a 3-D output is a ``[B, C, L]`` map (a Conv1d's), pooled over L."""
    if isinstance(x, Mapping):  # a Hugging Face ModelOutput: its first entry
        x = next((v for v in x.values() if isinstance(v, torch.Tensor)), x)
    if isinstance(x, (tuple, list)) and x and isinstance(x[0], torch.Tensor):
        x = x[0]
    if not isinstance(x, torch.Tensor):
        raise FastFTValueError(
            f"tap {name!r} returned {type(x).__name__}, not a tensor; tap a module that "
            "returns a tensor (or a tuple or dict whose first item is one)."
        )
    if x.dim() == 2:
        return x
    channel_first = (channel_first and x.dim() == 3) or x.dim() >= 4
    if how == "auto":
        how = "masked_mean" if mask is not None and not channel_first else "mean"
    if channel_first:  # channel-first maps: positions are the spatial axes
        if how != "mean":
            raise FastFTValueError(
                f"tap {name!r} is a {x.dim()}-D map {tuple(x.shape)}: only pooling='mean' "
                "(or 'auto') applies to it."
            )
        return x.flatten(2).mean(dim=2)
    if x.dim() != 3:
        raise FastFTValueError(f"tap {name!r} has shape {tuple(x.shape)}: nothing to pool.")
    if how == "cls":
        return x[:, 0]
    if how == "mean":
        return x.mean(dim=1)
    if mask is None:
        raise FastFTValueError(
            "pooling='masked_mean' needs dict inputs with an 'attention_mask' entry."
        )
    if mask.shape[:2] != x.shape[:2]:
        raise FastFTValueError(
            f"tap {name!r}: attention_mask {tuple(mask.shape)} does not match its positions "
            f"{tuple(x.shape[:2])}."
        )
    m = mask.to(x.dtype).unsqueeze(-1)
    return (x * m).sum(dim=1) / m.sum(dim=1).clamp(min=1e-9)


class TapStack(nn.Module):
    """Run ``backbone`` once per batch and return each tap's pooled output.

    Args:
        backbone: the pretrained network; called with a tensor or a dict of tensors as
            fastft calls models (see :mod:`fastft.model.calling`).
        taps: qualified module names whose outputs are kept (``"blocks"``: see
            :func:`default_taps`).
        pooling: one of :data:`POOLINGS` (see the module docstring).
        mask_key: the entry of a dict input that holds the attention mask.

    The forward hooks live only for the duration of a call, and the backbone stops as soon as
    every tap has been seen (the layers above the highest tap do not run), except in the
    first call: it runs to the end, to refuse a tap that runs more than once per forward.
    """

    #: Not part of what the stack computes (the cache key leaves it out).
    fastft_key_ignore = ("_runs_checked",)

    def __init__(
        self,
        backbone: nn.Module,
        taps: str | Sequence[str] = "blocks",
        pooling: str = "auto",
        mask_key: str = "attention_mask",
    ):
        super().__init__()
        if pooling not in POOLINGS:
            raise FastFTValueError(
                f"pooling must be one of {', '.join(POOLINGS)}; got {pooling!r}."
            )
        names = default_taps(backbone) if isinstance(taps, str) and taps == "blocks" else taps
        if isinstance(names, str):
            raise FastFTValueError(
                f"taps must be 'blocks' or a list of module names; got {taps!r}."
            )
        modules = dict(backbone.named_modules())
        missing = [n for n in names if n not in modules]
        if missing or not names:
            raise FastFTValueError(
                f"no module named {', '.join(map(repr, missing)) or 'at all'} in "
                f"{type(backbone).__name__}; taps are names from model.named_modules()."
            )
        if len(set(names)) != len(names):
            raise FastFTValueError(f"taps names a module twice: {list(names)}.")
        self.backbone = backbone
        self.tap_list = tuple(str(n) for n in names)
        self.pooling = str(pooling)
        self.mask_key = str(mask_key)
        self.channel_first = tuple(n for n in self.tap_list if is_channel_first_1d(modules[n]))
        self._runs_checked = False  # see forward: the first call runs the whole backbone

    def forward(self, inputs: Any) -> dict[str, torch.Tensor]:
        """``{tap name: [B, D]}`` from one call of the backbone.

        Args:
            inputs: one batch as the backbone takes it (a tensor or a dict of tensors).
        """
        mask = inputs.get(self.mask_key) if isinstance(inputs, Mapping) else None
        modules = dict(self.backbone.named_modules())
        seen: dict[str, torch.Tensor] = {}
        runs = dict.fromkeys(self.tap_list, 0)
        stop_early = self._runs_checked  # the first call counts every tap's runs to the end

        def hook_for(name: str):
            def hook(module, args, output):
                runs[name] += 1
                if name not in seen:
                    seen[name] = pool(output, self.pooling, mask, name, name in self.channel_first)
                if stop_early and len(seen) == len(self.tap_list):
                    raise _AllTapsSeen

            return hook

        handles = [modules[n].register_forward_hook(hook_for(n)) for n in self.tap_list]
        try:
            call_model(self.backbone, inputs)
        except _AllTapsSeen:
            pass
        except Exception:
            if stop_early or len(seen) != len(self.tap_list):
                raise
            # the first call ran on past the taps, and what is above them failed (a head that
            # wants labels, say): the taps are complete, and later calls stop before it
        finally:
            for h in handles:
                h.remove()
        again = {n: k for n, k in runs.items() if k > 1}
        if again:
            raise FastFTValueError(
                f"taps {again} run more than once in one forward (times shown): a module whose "
                "weights are shared across depths (ALBERT's layer) has no single output to "
                "probe; tap modules that run once (see model.named_modules())."
            )
        self._runs_checked = True
        if len(seen) != len(self.tap_list):
            never = [n for n in self.tap_list if n not in seen]
            raise FastFTValueError(
                f"taps {never} never ran in the backbone's forward; tap modules that the "
                "forward calls."
            )
        return {n: seen[n] for n in self.tap_list}
