"""The model a FineTuner edits: its new layers, unfrozen blocks, split and trained state.

:class:`TunedModel` does the three edits once (attach the new head, freeze what is not new),
unfreezes blocks on request, and keeps the split into frozen prefix and trainable tail in
step with the model: a traced prefix holds the graph and the module objects of the moment it
was made, so any later change to the model makes it split again.
"""

from __future__ import annotations

import copy
import hashlib
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from fastft import data as fdata
from fastft.errors import FastFTError, FastFTValueError, SurgeryError
from fastft.hashing import ContentHasher, tensor_digest
from fastft.model import surgery
from fastft.model.attach import (
    HeadSpec,
    NeedsProbe,
    apply_freeze,
    attach_head,
    current_head,
    head_outputs,
    locate_head,
    path_of,
    probe_width,
    sync_label_config,
)
from fastft.model.blocks import trained_blocks, unfreeze_blocks, unfrozen_blocks
from fastft.model.calling import dtype_mismatch
from fastft.model.heads import as_conv1x1, build_head
from fastft.model.status import (
    mark_new,
    place_like,
    train_mode_message,
    train_mode_offenders,
    warn_user,
)
from fastft.split import FrozenPrefix, TrainableTail, split
from fastft.train.checkpoint import TrainingState

if TYPE_CHECKING:
    from fastft.train.config import FitConfig


@dataclass
class HeadOptions:
    """What the new layers are: FineTuner's ``num_classes``, ``hidden``, ``head`` and friends."""

    num_classes: int | None = None
    hidden: Sequence[int] = ()
    head: nn.Module | None = None  # a ready-made output layer instead of one built here
    head_name: str | None = None
    output_key: str = "sentence_embedding"
    activation: str = "relu"
    dropout: float = 0.0
    seed: int = 0

    @property
    def adds_head(self) -> bool:
        return self.head is not None or self.num_classes is not None

    def build(
        self,
        in_features: int,
        *,
        hidden: Sequence[int] | None = None,
        dropout: float | None = None,
        seed: int | None = None,
    ) -> nn.Module:
        """The new output layer (with its hidden layers) for ``in_features`` inputs; a sweep
        overrides ``hidden``, ``dropout`` and ``seed``."""
        if self.head is not None:
            return self.head
        return build_head(
            in_features,
            self.num_classes,
            list(self.hidden if hidden is None else hidden),
            activation=self.activation,
            dropout=self.dropout if dropout is None else dropout,
            seed=self.seed if seed is None else seed,
        )


class TunedModel:
    """A model being fine-tuned: edited once, unfrozen on request, split on demand."""

    def __init__(
        self,
        model: nn.Module,
        options: HeadOptions,
        *,
        freeze: str | Sequence[str] | None,
        device: torch.device,
    ):
        self.model = model
        self.options = options
        self.freeze = freeze
        self.device = device
        self.head_spec: HeadSpec | None = None
        self.edited = False
        self.sized = False  # the new head's width checked against what reaches it
        self.unfreeze_request: tuple[int, bool] | None = None  # (blocks, train_bn) last accepted
        self.prefix: FrozenPrefix | None = None
        self.tail: TrainableTail | None = None
        self.split_version = 0  # counts splits: caches and state built on an older one are stale
        self._split_state: str | None = None
        self.said_train_mode = False  # warned about frozen modules left in train mode
        # Heads of the usual layouts are attached right away; an encoder's waits for data.
        try:
            self.edit(example=None)
        except NeedsProbe:
            pass

    # ------------------------------------------------------------------ unfreezing
    @property
    def unfrozen_blocks(self) -> int:
        """Blocks the last accepted :meth:`unfreeze` asked for (0 when none)."""
        return self.unfreeze_request[0] if self.unfreeze_request else 0

    @property
    def train_bn(self) -> bool:
        return self.unfreeze_request[1] if self.unfreeze_request else False

    def unfreeze(self, blocks: int, *, train_bn: bool = False) -> list[str]:
        """Unfreeze the top ``blocks`` blocks (now, or right after the edit when the head still
        waits for data); the next :meth:`split_for` splits at the new cut."""
        names: list[str] = []
        if self.edited:
            names = unfreeze_blocks(self.model, blocks, train_bn=train_bn)
        elif isinstance(blocks, bool) or not isinstance(blocks, int) or blocks < 0:
            raise FastFTValueError(f"blocks must be a non-negative integer, got {blocks!r}.")
        self.unfreeze_request = (blocks, bool(train_bn))  # only once accepted
        self.forget_split()
        return names

    # ------------------------------------------------------------------ editing
    def edit(self, example: Any | None, spec: HeadSpec | None = None) -> None:
        """Attach the new layers (once) and freeze what is not new. ``example`` is a batch
        for an encoder's probe; ``spec`` a recorded placement (a saved tuner: no probe)."""
        if self.edited:
            return
        if self.options.adds_head:
            spec = spec or locate_head(
                self.model,
                head_name=self.options.head_name,
                custom_head=self.options.head is not None,
                output_key=self.options.output_key,
                example=example,
            )
            self.model = attach_head(self.model, spec, self.heads_for(spec))
            self.head_spec = spec
            sync_label_config(self.model, head_outputs(current_head(self.model, spec)))
        apply_freeze(self.model, self.freeze)
        self.model.to(self.device)
        self.edited = True
        if self.unfreeze_request is not None:
            try:
                unfreeze_blocks(self.model, self.unfrozen_blocks, train_bn=self.train_bn)
            except FastFTError:
                self.unfreeze_request = None  # rejected: nothing is unfrozen, and nothing says so
                raise

    def heads_for(self, spec: HeadSpec, **overrides) -> list[nn.Module]:
        """The new output layer(s) for ``spec``: one, or one per head of a distilled model
        (the others seeded ``seed + i``); 1x1 convolutions for a 1x1-conv classifier."""
        heads = []
        for i in range(1 + len(spec.also)):
            seed = overrides.get("seed", self.options.seed) + i
            head = self.options.build(spec.in_features, **{**overrides, "seed": seed})
            if i and self.options.head is not None:
                head = copy.deepcopy(head)  # a custom head= module: the same layer, twice
            if spec.kind == "conv" and self.options.head is None:
                head = as_conv1x1(head, spec.conv_dims)
            heads.append(head)
        return heads

    def size_head(self, example: Any) -> None:
        """Before the first split: measure what reaches the new head on ``example`` and, when
        surgery below it changed the width (a removed stage, an inserted layer), build the
        new layers for that width instead; a ``head=`` module that does not fit is an error."""
        spec = self.head_spec
        if self.sized or spec is None or spec.mode != "replace":
            self.sized = True
            return
        head = current_head(self.model, spec)
        width = probe_width(self.model, spec, head, example)
        self.sized = True
        if width == spec.in_features:
            return
        if self.options.head is not None:
            first = next((m for m in head.modules() if isinstance(m, nn.Linear)), None)
            if first is not None and first.in_features != width:
                raise SurgeryError(
                    f"the layers before {spec.name!r} now give {width} features, but the head= "
                    f"module takes {first.in_features}: build it for {width} inputs."
                )
            return
        spec.in_features = width
        self.model = attach_head(self.model, spec, self.heads_for(spec))
        self.model.to(self.device)

    def cache_pool(self, pool: str) -> str:
        """The pool of the cache at the current cut: below the top of the network the tail
        needs whole sequences / feature maps."""
        return "none" if any(True for _ in unfrozen_blocks(self.model)) else pool

    # ------------------------------------------------------------------ split
    def split_for(self, example: Any) -> None:
        """Edit (if a probe was needed) and split the model at the frozen frontier; split
        again when the model changed since (a module replaced, a frozen attribute or weight
        changed, other parameters made trainable)."""
        self.edit(example)
        self.size_head(example)
        if self.prefix is not None and self._split_state != self._model_state():
            self.forget_split()
        if self.prefix is None:
            self._say_train_mode()
            try:
                self.prefix, self.tail = split(
                    self.model, fdata.to_device(example, self.device), warn_train_mode=False
                )
            except Exception as exc:  # data of another dtype than the model: say which
                clash = dtype_mismatch(exc, example, self.model)
                if clash is not None:
                    raise clash from exc
                raise
            self._split_state = self._model_state()
            self.split_version += 1

    def _say_train_mode(self) -> None:
        """Warn once per tuner when frozen modules whose output depends on the mode were left
        in train mode (fastft runs them in eval mode)."""
        if not self.said_train_mode:
            offenders = train_mode_offenders(self.model)
            if offenders:
                self.said_train_mode = True
                warn_user(train_mode_message(offenders))

    def forget_split(self) -> None:
        self.prefix = self.tail = None

    def _model_state(self) -> str:
        """The model as the split sees it: everything but what trains, by value; which module
        and parameter objects it holds (a traced prefix holds the objects of its time) and
        which parameters train. Not the weights' values: the prefix shares the parameter
        tensors, so it computes with new values anyway (and the cache key sees them)."""
        modules, params = self.prefix.key_mask()
        hasher = ContentHasher(
            mask_modules=modules, mask_params=params, weights="layout", eval_mode=True
        )
        hasher.update(self.model, "the model")
        objects = [id(m) for m in self.model.modules()] + [id(p) for p in self.model.parameters()]
        trains = "".join("1" if p.requires_grad else "0" for p in self.model.parameters())
        return f"{hasher.hexdigest()}:{hash(tuple(objects))}:{trains}"

    # ------------------------------------------------------------------ heads (sweeps)
    def new_head(self, **overrides) -> nn.Module:
        """A fresh output layer like the attached one (``hidden``, ``dropout``, ``seed``
        overridden)."""
        if self.options.head is not None:
            raise FastFTValueError(
                "fit_many builds heads from num_classes/hidden; it cannot sweep a custom "
                "head= module."
            )
        if self.head_spec is None:
            raise FastFTValueError(
                "fit_many needs a FineTuner that attached a new head (pass num_classes=)."
            )
        if self.head_spec.also:
            raise FastFTValueError(
                "fit_many sweeps one output layer; this model has several (a distillation "
                f"head: {', '.join([self.head_spec.name, *self.head_spec.also])}). Use fit()."
            )
        return place_like(self.heads_for(self.head_spec, **overrides)[0], self.model)

    def tail_with_head(self, head: nn.Module) -> nn.Module:
        """A copy of the tail whose new head is ``head`` (the frozen rest is copied by value)."""
        where = path_of(self.tail, current_head(self.model, self.head_spec))
        tail = copy.deepcopy(self.tail)
        tail.set_submodule(where, head)
        return tail

    def install_head(self, head: nn.Module) -> None:
        """Make ``head`` the model's (and the tail's) new output layer."""
        old = current_head(self.model, self.head_spec)
        self.model.set_submodule(path_of(self.model, old), head)
        self.tail.set_submodule(path_of(self.tail, old), head)
        mark_new(head)

    # ------------------------------------------------------------------ state
    def trainable_state(self) -> dict[str, torch.Tensor]:
        """Parameters that train plus every tensor of the new modules and unfrozen blocks
        (their buffers too: BatchNorm statistics trained with ``train_bn=True``)."""
        new = set(surgery.new_modules(self.model))
        names = {id(m): n for n, m in self.model.named_modules()}
        new |= {names[id(block)] for block in trained_blocks(self.model)}  # unfrozen now or before
        state = {}
        for name, t in self.model.state_dict().items():
            owner = name.rsplit(".", 1)[0]
            if any(owner == m or owner.startswith(m + ".") for m in new):
                state[name] = t.detach().cpu().clone()
        for name, p in self.model.named_parameters():
            if p.requires_grad:
                state[name] = p.detach().cpu().clone()
        return state

    def load_state(self, state: dict[str, torch.Tensor], origin: str) -> None:
        """Load trained weights, refusing names or shapes the edited model does not have."""
        own = self.model.state_dict()
        unknown = sorted(set(state) - set(own))
        if unknown:
            raise SurgeryError(
                f"{origin} holds weights for {', '.join(unknown[:5])} which the edited model does "
                "not have: load it with the same base model and configuration it was saved with."
            )
        for name, t in state.items():
            if own[name].shape != t.shape:
                raise SurgeryError(
                    f"{origin}: {name} has shape {tuple(t.shape)}, the model expects "
                    f"{tuple(own[name].shape)}."
                )
        self.model.load_state_dict(state, strict=False)

    def training_state(
        self, config: dict[str, Any], history: list[dict], fit: FitConfig | None
    ) -> TrainingState:
        """A saved tuner of this model: its settings ``config``, the new head's placement, the
        trained state and unfrozen blocks, the ``history`` and the settings of the last ``fit``."""
        return TrainingState(
            config=config,
            head=None if self.head_spec is None else asdict(self.head_spec),
            state=self.trainable_state(),
            history=list(history),
            fit=None if fit is None else asdict(fit),
            unfreeze=self.unfreeze_request,
        )

    def restore(self, saved: TrainingState, origin: str) -> None:
        """Redo a saved tuner's edits on this (fresh) model and load its trained weights."""
        if saved.unfreeze:
            self.unfreeze(saved.unfrozen_blocks, train_bn=saved.train_bn)
        if not self.edited:  # an encoder: the head is appended from the recorded spec, no probe
            self.edit(example=None, spec=HeadSpec(**saved.head))
        elif saved.head and self.head_spec is not None:
            spec = HeadSpec(**saved.head)
            if spec.mode == "replace" and spec.in_features != self.head_spec.in_features:
                self.head_spec = spec  # sized from the cut when saved: rebuild that width
                self.model = attach_head(self.model, spec, self.heads_for(spec))
                self.model.to(self.device)
        self.sized = True  # the saved width is the one the trained weights have
        self.load_state(saved.state, origin)

    def backbone_digest(self, trainable: dict[str, torch.Tensor]) -> str:
        """Digest of every tensor of the model not in ``trainable`` (the frozen backbone)."""
        h = hashlib.sha256()
        for name, t in self.model.state_dict().items():
            if name not in trainable:
                h.update(name.encode() + tensor_digest(t))
        return h.hexdigest()

    def export(self) -> nn.Module:
        """A deep copy of the edited model in eval mode, without fastft's bookkeeping marks."""
        exported = copy.deepcopy(self.model).eval()
        for m in exported.modules():
            for mark in [k for k in m.__dict__ if k.startswith("_fastft_")]:
                del m.__dict__[mark]  # surgery / unfreeze bookkeeping
        return exported
