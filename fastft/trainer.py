"""FineTuner: the drop-in trainer that runs the frozen part once and trains the new layers.

``FineTuner(model, num_classes=5, hidden=[256])`` does the three operations of transfer
learning on ``model`` (in place): it replaces the output layer (or, for an encoder with no
classifier, appends one), puts the ``hidden`` layers before it, and freezes everything
that is not new. ``fit`` then splits the edited model at the frozen frontier, runs the
frozen prefix once per sample into a :class:`~fastft.FeatureCache`, and trains only the
tail on the cache: each epoch draws ``torch.randperm(N, generator=g)`` and gathers batches
of rows, with no DataLoader.

With ``cache_dtype="fp32"``, ``views=1`` and the same seed, the trained weights equal those
of a naive loop that runs the frozen layers (in eval mode, under no_grad) every epoch with
the same batch order and optimizer: that is the package's correctness oracle.
"""

from __future__ import annotations

import copy
import hashlib
import math
import sys
import time
import warnings
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable, Sequence

import torch
from torch import nn
from torch.utils.data import DataLoader
from tqdm.auto import tqdm

from fastft import data as fdata
from fastft import distributed as fdist
from fastft.model import surgery
from fastft.cache import FeatureCache
from fastft.cache.build import check_amp, check_views
from fastft.cache.fingerprint import dataset_part
from fastft.cache.layout import DTYPES
from fastft.checkpoint import load_checked, save_atomic
from fastft.hashing import ContentHasher, tensor_digest
from fastft.errors import FastFTError, FastFTValueError, NotFittedError, SurgeryError
from fastft.model.heads import build_head
from fastft.metrics import classification_metrics, multilabel_metrics
from fastft.objectives import LOSSES, check_labels, make_loss, prepare_targets
from fastft.ops.cuda import deferred_row_checks
from fastft.cache.derive import can_derive, derived_cache
from fastft._graph_step import GraphedStep, check_cuda_graph
from fastft.data.sources import as_source
from fastft.split import split
from fastft.model.blocks import param_groups, trained_blocks, unfreeze_blocks, unfrozen_blocks

OPTIMIZERS = ("adamw", "adam", "sgd")
SCHEDULERS = (None, "cosine", "onecycle")


@dataclass
class FitConfig:
    """Hyper-parameters of one ``fit`` (also what a checkpoint records)."""

    epochs: int = 10
    batch_size: int = 256
    lr: float = 1e-3
    optimizer: str = "adamw"
    weight_decay: float = 0.0
    momentum: float = 0.9
    scheduler: str | None = None
    loss: str = "ce"
    label_smoothing: float = 0.0
    class_weights: list[float] | None = None
    amp: str | None = None
    lr_decay: float | None = None
    cuda_graph: bool = False

    def validate(self) -> None:
        if int(self.epochs) < 1:
            raise FastFTValueError(f"epochs must be ≥ 1, got {self.epochs}.")
        if int(self.batch_size) <= 0:
            raise FastFTValueError(f"batch_size must be a positive integer, got {self.batch_size}.")
        if not (self.lr > 0 and math.isfinite(self.lr)):
            raise FastFTValueError(f"lr must be a finite number > 0, got {self.lr}.")
        if not (math.isfinite(self.weight_decay) and self.weight_decay >= 0):
            raise FastFTValueError(f"weight_decay must be a finite number ≥ 0, got {self.weight_decay}.")
        if not (math.isfinite(self.momentum) and 0 <= self.momentum < 1):
            raise FastFTValueError(f"momentum must be in [0, 1), got {self.momentum}.")
        if not (math.isfinite(self.label_smoothing) and 0 <= self.label_smoothing < 1):
            raise FastFTValueError(f"label_smoothing must be in [0, 1), got {self.label_smoothing}.")
        if self.class_weights is not None and not all(math.isfinite(w) and w >= 0 for w in self.class_weights):
            raise FastFTValueError(f"class_weights must be finite numbers ≥ 0, got {self.class_weights}.")
        if self.optimizer not in OPTIMIZERS:
            raise FastFTValueError(f"unknown optimizer {self.optimizer!r}; use one of {', '.join(OPTIMIZERS)}.")
        if self.scheduler not in SCHEDULERS:
            raise FastFTValueError(f"unknown scheduler {self.scheduler!r}; use None, 'cosine' or 'onecycle'.")
        if self.loss not in LOSSES:
            raise FastFTValueError(f"unknown loss {self.loss!r}; use one of {', '.join(LOSSES)}.")
        if self.amp not in (None, "bf16"):
            raise FastFTValueError(f"amp must be None or 'bf16', got {self.amp!r}.")
        if self.lr_decay is not None and not (self.lr_decay > 0 and math.isfinite(self.lr_decay)):
            raise FastFTValueError(f"lr_decay must be > 0 (e.g. 0.5 halves the rate per block going down), got {self.lr_decay}.")


@dataclass
class _HeadSpec:
    """How the new output layer was attached, so ``load`` can rebuild it without data."""

    mode: str  # "replace" (an existing head was swapped) or "append" (encoder + new head)
    name: str | None
    in_features: int
    output_key: str | None = None


class History(list):
    """Per-epoch records of a fit (a list of dicts) with a few conveniences."""

    def column(self, key: str) -> list[Any]:
        return [r.get(key) for r in self]

    @property
    def best(self) -> dict[str, Any] | None:
        key = "val_loss" if self and "val_loss" in self[-1] else "loss"
        return min(self, key=lambda r: r[key]) if self else None


@dataclass
class EarlyStopping:
    """Stop when ``monitor`` has not improved by ``min_delta`` for ``patience`` epochs."""

    patience: int = 3
    monitor: str = "val_loss"
    min_delta: float = 0.0
    restore_best: bool = True
    _best: float = field(default=math.inf, init=False)
    _bad: int = field(default=0, init=False)
    _state: dict | None = field(default=None, init=False)

    def step(self, record: dict, module: nn.Module) -> bool:
        """Record an epoch; True when training should stop."""
        if self.monitor not in record:
            raise FastFTValueError(
                f"early stopping monitors {self.monitor!r}, which this fit does not report "
                f"(it reports {', '.join(sorted(record))}); pass val= or monitor='loss'."
            )
        value = record[self.monitor]
        if value < self._best - self.min_delta:
            self._best, self._bad = value, 0
            if self.restore_best:
                self._state = copy.deepcopy(module.state_dict())
        else:
            self._bad += 1
        return self._bad >= self.patience

    def state_dict(self) -> dict:
        """What a checkpoint keeps, so that a resumed fit stops and restores as an uninterrupted one."""
        return {"best": self._best, "bad": self._bad, "state": self._state}

    def load_state_dict(self, state: dict) -> None:
        self._best, self._bad, self._state = float(state["best"]), int(state["bad"]), state["state"]


class FineTuner:
    """Fine-tune ``model`` by training only its new layers on cached frozen features.

    Args:
        model: the pretrained network. It is edited **in place** (pass a deep copy to keep
            the original). Called as ``model(x)`` with one tensor or a dict of tensors.
        num_classes: size of the new output layer. With ``None`` and no ``head``, the model
            is used as edited by the caller (e.g. with :mod:`fastft.surgery`).
        hidden: widths of new hidden layers put before the new output layer
            (``[256]`` → Linear+ReLU, then the output Linear).
        head: a ready-made module to use as the new output layer instead.
        freeze: ``"auto"`` freezes everything that is not new; a list of module names or
            glob patterns freezes those on top; ``None`` leaves ``requires_grad`` as is.
        cache: the cache tier: ``"auto"``, ``"device"``, ``"host"`` or ``"disk"``.
        cache_dtype: storage dtype of the cached features: fp32, bf16, fp16 or int8.
        views: augmented views per sample cached when ``transform`` is random.
        transform: a callable applied to each batch of inputs before the frozen part.
        device: where training runs (default: CUDA when available, else CPU).
        seed: seeds the new layers' initialisation and the batch order.
        head_name: qualified name of the output layer to replace, when not found automatically.
        output_key: for encoders returning a dict (SentenceTransformer), the entry fed to
            the new head.
        activation, dropout: of the new hidden layers.
        pool: how the cache reduces sequence/spatial axes of the frozen output
            (``"none"`` keeps it whole; see :func:`fastft.ops.cache_write`).
        cache_dir: folder of disk caches (default ``$FASTFT_CACHE_DIR`` or ``~/.cache/fastft``).
        extract_batch_size: batch size of the one frozen pass.
        extract_amp: ``'bf16'`` runs the frozen pass under bf16 autocast (on GPUs with bf16
            tensor cores; the cached features then carry bf16 rounding).
        transform_id: a name for what ``transform`` computes with that fastft cannot hash (a
            file it reads, an object without readable state); without it such a transform's
            caches are used once and never reused (see :meth:`FeatureCache.build`).
        verbose: progress bars and messages.
    """

    def __init__(
        self,
        model: nn.Module,
        num_classes: int | None = None,
        hidden: Sequence[int] | None = None,
        head: nn.Module | None = None,
        freeze: str | Sequence[str] | None = "auto",
        cache: str = "auto",
        cache_dtype: str = "fp16",
        views: int = 1,
        transform: Callable | None = None,
        device: str | torch.device | None = None,
        seed: int = 0,
        *,
        head_name: str | None = None,
        output_key: str = "sentence_embedding",
        activation: str = "relu",
        dropout: float = 0.0,
        pool: str = "none",
        cache_dir: str | None = None,
        max_memory: int | None = None,
        extract_batch_size: int = 256,
        extract_amp: str | None = None,
        transform_id: str | None = None,
        verbose: bool = True,
    ):
        if num_classes is not None and int(num_classes) < 2 and head is None:
            raise FastFTValueError(
                f"num_classes must be ≥ 2 for a classifier, got {num_classes}; for one regression "
                "output pass head=nn.Linear(in_features, 1) and loss='mse'."
            )
        if cache_dtype not in DTYPES:  # the canonical names only (dtype_name also takes aliases)
            raise FastFTValueError(f"unknown cache_dtype {cache_dtype!r}; use one of {', '.join(DTYPES)}.")
        check_views(views, transform)
        check_amp(extract_amp, "extract_amp")
        self.model = model
        self.num_classes = None if num_classes is None else int(num_classes)
        self.hidden = list(hidden or [])
        self.head = head
        self.freeze = freeze
        self.cache_tier = cache
        self.cache_dtype = cache_dtype
        self.views = int(views)
        self.transform = transform
        self.device = torch.device(device) if device is not None else _default_device()
        if self.device.type == "cuda" and not torch.cuda.is_available():
            raise FastFTValueError(
                f"device={str(device)!r} but PyTorch sees no CUDA device here (torch "
                f"{torch.__version__}); leave device unset to train on the CPU."
            )
        self.seed = int(seed)
        self.head_name = head_name
        self.output_key = output_key
        self.activation = activation
        self.dropout = float(dropout)
        self.pool = pool
        self.cache_dir = cache_dir
        self.max_memory = max_memory
        self.extract_batch_size = int(extract_batch_size)
        self.extract_amp = extract_amp
        self.transform_id = transform_id
        self.verbose = verbose

        self.prefix: nn.Module | None = None
        self.tail: nn.Module | None = None
        self.cache: FeatureCache | None = None
        self.history = History()
        self._head_spec: _HeadSpec | None = None
        self._edited = False
        self._fitted = False
        self._fit_config: FitConfig | None = None
        self._unfreeze: tuple[int, bool] | None = None  # (blocks, train_bn) of the last unfreeze()
        self._split_state: str | None = None  # the model as split (see _model_state)
        self._train_data_key: str | None = None  # the training data's part of the cache key
        # Heads of the usual layouts can be attached right away; encoders need a probe batch.
        if self.head is not None or self.num_classes is not None:
            try:
                self._edit(example=None)
            except _NeedsProbe:
                pass
        else:
            self._edit(example=None)

    # ------------------------------------------------------------------ surgery and split
    def _new_head(self, in_features: int) -> nn.Module:
        if self.head is not None:
            return self.head
        return build_head(
            in_features, self.num_classes, self.hidden,
            activation=self.activation, dropout=self.dropout, seed=self.seed,
        )

    def _edit(self, example: Any | None, spec: _HeadSpec | None = None) -> None:
        """Attach the new layers (once) and freeze what is not new."""
        if self._edited:
            return
        if self.head is not None or self.num_classes is not None:
            spec = spec or self._locate_head(example)
            new = self._new_head(spec.in_features)
            if spec.mode == "replace":
                surgery.replace_head(self.model, module=new, name=spec.name)
            else:
                self.model = surgery.append_head(self.model, [new], output_key=spec.output_key)
            self._head_spec = spec
        if self.freeze == "auto":
            surgery.freeze(self.model, except_new=True)
        elif self.freeze is not None:
            names = [self.freeze] if isinstance(self.freeze, str) else list(self.freeze)
            surgery.freeze(self.model, patterns=names)
        if not any(p.requires_grad for p in self.model.parameters()):
            raise SurgeryError(
                "nothing to train: every parameter is frozen. Pass num_classes= (a new output "
                "layer), hidden=, or unfreeze some layers with fastft.surgery.unfreeze."
            )
        self.model.to(self.device)
        self._edited = True
        if self._unfreeze is not None:
            try:
                unfreeze_blocks(self.model, self._unfreeze[0], train_bn=self._unfreeze[1])
            except FastFTError:
                self._unfreeze = None  # rejected: nothing is unfrozen, and nothing says so
                raise

    def _locate_head(self, example: Any | None) -> _HeadSpec:
        try:
            name, old = (self.head_name, self.model.get_submodule(self.head_name)) if self.head_name \
                else surgery.find_head(self.model)
        except (SurgeryError, AttributeError) as exc:
            if self.head_name:
                raise SurgeryError(f"head_name={self.head_name!r}: {exc}") from exc
            name, old = None, None
        if old is not None and getattr(old, "in_features", None) is not None:
            return _HeadSpec("replace", name, int(old.in_features))
        if old is not None and self.head is not None:
            return _HeadSpec("replace", name, -1)
        # No classifier to replace (an encoder): append a head after its output.
        if example is None:
            raise _NeedsProbe()
        self.model.eval()
        with torch.no_grad():
            out = self.model(fdata.to_device(example, _model_device(self.model)))
        key = None
        if isinstance(out, dict):
            if self.output_key not in out:
                raise SurgeryError(
                    f"the model returns a dict without {self.output_key!r} (keys: {', '.join(out)}); "
                    "pass output_key= naming the embedding to train on."
                )
            key, out = self.output_key, out[self.output_key]
        if not isinstance(out, torch.Tensor) or out.dim() != 2:
            raise SurgeryError(
                "no output layer found to replace, and the model's output is not a [batch, features] "
                f"tensor to append one to (got {type(out).__name__} {getattr(out, 'shape', '')}). "
                "Pass head_name= naming the layer to replace."
            )
        return _HeadSpec("append", None, int(out.shape[1]), key)

    def unfreeze(self, blocks: int, *, train_bn: bool = False) -> list[str]:
        """Make the top ``blocks`` blocks of the frozen part trainable (exactly those: ``0``
        freezes them again) and move the cut down to the input of the lowest one.

        Blocks are the children of the model's Sequential/ModuleList stacks (``encoder.layer``,
        ``layer4``, ``blocks``; see :func:`fastft.model.blocks.find_blocks`). The next ``fit``
        caches the frozen part below the new cut (whole sequences or feature maps, ``pool``
        ``'none'``; reused by fingerprint) and trains the unfrozen blocks with the new layers,
        with learning rates decayed per block when ``fit(lr_decay=...)`` is given.
        BatchNorm layers in the unfrozen blocks keep their running statistics unless
        ``train_bn=True``. Returns the names of the unfrozen blocks (``[]`` before the model is
        edited, when an encoder's head still waits for data: they are unfrozen then).
        """
        names: list[str] = []
        if self._edited:
            names = unfreeze_blocks(self.model, blocks, train_bn=train_bn)
        else:  # check the argument now; the blocks are unfrozen right after the edit
            if isinstance(blocks, bool) or not isinstance(blocks, int) or blocks < 0:
                raise FastFTValueError(f"blocks must be a non-negative integer, got {blocks!r}.")
        self._unfreeze = (blocks, bool(train_bn))  # only once accepted
        self.prefix = self.tail = None  # split again at the new cut
        self.cache = None
        return names

    @property
    def _cache_pool(self) -> str:
        # Below the top of the network the tail needs whole sequences / feature maps.
        return "none" if any(True for _ in unfrozen_blocks(self.model)) else self.pool

    def _prepare(self, example_inputs: Any) -> None:
        """Edit (if a probe was needed) and split the model at the frozen frontier; split
        again when the model changed since (a module replaced, a frozen attribute or weight
        changed, other parameters made trainable): a traced prefix holds the graph and the
        module objects of the moment it was made."""
        self._edit(example_inputs)
        if self.prefix is not None and self._split_state != self._model_state():
            self.prefix = self.tail = None
            self.cache = None
        if self.prefix is None:
            probe = fdata.to_device(example_inputs, self.device)
            self.prefix, self.tail = split(self.model, probe)
            self._split_state = self._model_state()

    def _model_state(self) -> str:
        """The model as the split sees it: everything but what trains, by value; which module
        and parameter objects it holds (a traced prefix holds the objects of its time) and
        which parameters train. Not the weights' values: the prefix shares the parameter
        tensors, so it computes with new values anyway (and the cache key sees them)."""
        modules, params = self.prefix.key_mask()
        hasher = ContentHasher(mask_modules=modules, mask_params=params, weights="layout", eval_mode=True)
        hasher.update(self.model, "the model")
        objects = [id(m) for m in self.model.modules()] + [id(p) for p in self.model.parameters()]
        trains = "".join("1" if p.requires_grad else "0" for p in self.model.parameters())
        return f"{hasher.hexdigest()}:{hash(tuple(objects))}:{trains}"

    # ------------------------------------------------------------------ caches
    def _build_settings(self) -> dict[str, Any]:
        """FeatureCache.build settings shared by every cache of this tuner."""
        return dict(dtype=self.cache_dtype, tier=self.cache_tier, pool=self._cache_pool,
                    batch_size=self.extract_batch_size, cache_dir=self.cache_dir, max_memory=self.max_memory,
                    progress=self.verbose, seed=self.seed, device=self.device, amp=self.extract_amp)

    def _build_cache(self, data: Any, *, train: bool, dataset_id: str | None = None) -> FeatureCache:
        return FeatureCache.build(
            self.prefix, data, views=self.views if train else 1, transform=self.transform if train else None,
            transform_id=self.transform_id if train else None, dataset_id=dataset_id, **self._build_settings(),
        )

    def _lowest_cut(self, train: Any, val: Any, stages: list, dataset_id: str | None) -> "_LowCut | None":
        """For an unfreeze schedule, build the caches (train, and val when given) at the
        deepest cut first; when it is a replay cut, the earlier stages' caches are computed
        from them (``fastft.cache.derive``) instead of by frozen passes over the data."""
        first = self._unfreeze[0] if self._unfreeze else 0
        deepest = max((n for _, _, n in stages if n is not None), default=0)
        if deepest <= first or self.views > 1:
            return None
        train_bn = self._unfreeze[1] if self._unfreeze else False
        self.unfreeze(deepest, train_bn=train_bn)
        try:
            self.build_cache(train, dataset_id=dataset_id)
            val_cache = None if val is None else self._build_cache(val, train=False)
            low = _LowCut(deepest, self.tail, self.cache, val_cache)
        finally:  # also when the deep cache cannot be built: the tuner is left as it was
            self.unfreeze(first, train_bn=train_bn)
        return low if can_derive(low.tail, low.cache) else None

    def _stage_caches(self, train: Any, val: Any, dataset_id: str | None,
                      low: "_LowCut | None") -> FeatureCache | None:
        """``self.cache`` for the current cut, and the val cache (returned): derived from
        ``low`` when the cut is above it, else built (or reused) from the data."""
        self._prepare(_example(train))
        current = self._unfreeze[0] if self._unfreeze else 0
        if low is not None and current < low.blocks:
            self.cache = derived_cache(self.prefix, low.tail, low.cache, **self._build_settings())
            if low.val_cache is not None:
                return derived_cache(self.prefix, low.tail, low.val_cache, **self._build_settings())
        else:
            self.build_cache(train, dataset_id=dataset_id)
        return self._build_cache(val, train=False) if val is not None else None

    def build_cache(self, data: Any, *, dataset_id: str | None = None, evaluation: bool = False) -> FeatureCache:
        """Run the frozen part once over ``data`` (or reuse a matching cache) and return it.

        With ``evaluation=True`` the cache is the one ``fit(val=data)`` and ``evaluate(data)``
        use (one view, no transform), e.g. to build it ahead of training.
        """
        self._prepare(_example(data))
        if evaluation:
            return self._build_cache(data, train=False, dataset_id=dataset_id)
        self.cache = self._build_cache(data, train=True, dataset_id=dataset_id)
        self._train_data_key = self.cache.parts["dataset"]
        return self.cache

    # ------------------------------------------------------------------ training
    def fit(
        self,
        train: Any,
        val: Any = None,
        epochs: int = 10,
        batch_size: int | None = None,
        lr: float = 1e-3,
        optimizer: str = "adamw",
        weight_decay: float = 0.0,
        scheduler: str | None = None,
        loss: str = "ce",
        label_smoothing: float = 0.0,
        class_weights: Sequence[float] | None = None,
        early_stopping: int | EarlyStopping | None = None,
        callbacks: Iterable[Callable[["FineTuner", dict], Any]] = (),
        amp: str | None = None,
        *,
        momentum: float = 0.9,
        lr_decay: float | None = None,
        unfreeze: Sequence[tuple[int, int]] | None = None,
        checkpoint: str | None = None,
        resume: bool = False,
        dataset_id: str | None = None,
        cuda_graph: bool = False,
    ) -> History:
        """Train the new layers for ``epochs`` epochs on the cached frozen features.

        ``batch_size``: of training (default: a DataLoader's own ``batch_size``, else 256). A
        DataLoader is read with its own batch size, collate function and workers for the one
        frozen pass, and its sampler decides which samples are cached (a subset stays a subset).

        Returns the :class:`History` (one dict per epoch: ``loss``, ``seconds``, ``lr`` and,
        with ``val``, ``val_loss`` / ``val_accuracy`` / ``val_macro_f1``). With
        ``checkpoint=path`` a checkpoint is written atomically after every epoch, and
        ``resume=True`` continues from it, giving the same final weights as an
        uninterrupted run: it restores the weights, optimizer, history, early-stopping state
        and torch's global random state (dropout draws from it), and refuses a checkpoint of
        a fit with other settings. A fit that early stopping ended stays ended. A callback
        returning ``False`` stops training.

        Progressive unfreezing: ``unfreeze=[(epoch, n), ...]`` calls :meth:`unfreeze`
        ``(n)`` before that (0-based) epoch, e.g. ``epochs=8, unfreeze=[(5, 1)]`` trains the
        head for 5 epochs, then the top block with it for 3. Each stage is trained like a
        ``fit`` of its own epochs (a fresh optimizer and scheduler, the batch order drawn from
        ``seed`` again) on the cache at its cut. ``lr_decay=d`` gives each unfrozen block
        ``lr * d ** depth`` (depth 1 for the top block), as optimizer parameter groups.
        A checkpointed schedule resumes like a single stage (same ``epochs`` and ``unfreeze``).

        ``cuda_graph=True`` (CUDA only) captures the training step (forward, backward and
        optimizer update) as a CUDA graph after three eager warm-up steps and replays it for
        every full batch: one launch instead of dozens, which is what bounds a small head's
        step on a GPU. It trains on the same batches in the same order as eager training;
        Adam/AdamW become ``capturable`` (step counters on the device), whose bias
        correction rounds in the last bits unlike the default's. It does not combine with
        a ``scheduler`` or with torch.distributed.
        """
        batch_size = _training_batch_size(train, batch_size)
        cfg = FitConfig(
            epochs=epochs, batch_size=batch_size, lr=lr, optimizer=optimizer,
            weight_decay=weight_decay, momentum=momentum, scheduler=scheduler, loss=loss,
            label_smoothing=label_smoothing,
            class_weights=None if class_weights is None else [float(w) for w in class_weights],
            amp=amp, lr_decay=lr_decay, cuda_graph=bool(cuda_graph),
        )
        cfg.validate()
        if cfg.cuda_graph:
            check_cuda_graph(self.device, cfg, fdist.rank_and_world()[1])
        stages = _stages(unfreeze, cfg.epochs)
        # A checkpoint says how many epochs of the whole fit were done: the stages finished
        # before the interruption are skipped, the one it hit goes on from there.
        resume_from = None
        if resume and checkpoint is not None and Path(checkpoint).is_file():
            resume_from = self._resumable_checkpoint(checkpoint, stages, cfg)
        if isinstance(early_stopping, int) and not isinstance(early_stopping, bool):
            early_stopping = EarlyStopping(patience=early_stopping, monitor="val_loss" if val is not None else "loss")
        self._fit_config = cfg
        low = self._lowest_cut(train, val, stages, dataset_id) if len(stages) > 1 else None
        for first_epoch, stage_epochs, blocks in stages:
            stage_resume = None  # the checkpoint, when this stage goes on from inside
            if blocks is not None:
                self.unfreeze(blocks, train_bn=self._unfreeze[1] if self._unfreeze else False)
            if resume_from is not None:
                done, end = resume_from["global_epochs_done"], first_epoch + stage_epochs
                finished = resume_from.get("early_stopped") or end >= cfg.epochs <= done
                if done >= end and not finished:
                    continue  # trained before the interruption
                # The data first (nothing of the checkpoint is taken on other data), then the
                # weights before this stage's cache is built: its frozen part may hold blocks
                # an earlier stage trained.
                self._check_resumed_data(resume_from, checkpoint, train, dataset_id)
                self._prepare(_example(train))
                self._restore_progress(resume_from, checkpoint)
                if early_stopping is not None and resume_from.get("early_stopping"):
                    early_stopping.load_state_dict(resume_from["early_stopping"])
                if finished:
                    break
                if done > first_epoch:  # inside this stage: its optimizer state too
                    stage_resume = resume_from
                resume_from = None
            if blocks is not None and early_stopping is not None and early_stopping._state is not None:
                # Blocks frozen until now hold what they held at the best epoch so far.
                for name, t in self._trainable_state().items():
                    early_stopping._state.setdefault(name, t)
            stop = self._fit_stage(
                train, val, FitConfig(**{**asdict(cfg), "epochs": stage_epochs}), first_epoch,
                early_stopping=early_stopping, callbacks=callbacks, checkpoint=checkpoint,
                resume_from=stage_resume, dataset_id=dataset_id, low=low, stages=stages,
            )
            if stop:
                break
        if early_stopping is not None and early_stopping.restore_best and early_stopping._state:
            self.model.load_state_dict(early_stopping._state, strict=False)
        self.tail.eval()
        return self.history

    def _fit_stage(self, train: Any, val: Any, cfg: FitConfig, first_epoch: int, *, early_stopping,
                   callbacks, checkpoint, resume_from: dict | None, dataset_id, low: "_LowCut | None" = None,
                   stages: list | None = None) -> bool:
        """Train ``cfg.epochs`` epochs at the current cut (from inside them when ``resume_from``
        is a checkpoint of this stage); True when training should stop."""
        val_cache = self._stage_caches(train, val, dataset_id, low)
        labels = self.cache.labels.to(self.device)
        n_out = self._num_outputs()
        check_labels(labels, cfg.loss, n_out)
        if val_cache is not None:  # before the first epoch, not after it
            check_labels(val_cache.labels, cfg.loss, n_out, what="val")

        engine = _Engine(self, cfg, [self.tail], n_rows=self.cache.num_rows)
        start_epoch = 0 if resume_from is None else self._restore(resume_from, checkpoint, engine)
        epochs_bar = tqdm(
            range(start_epoch, cfg.epochs), desc="fastft fit", unit="epoch",
            disable=not self.verbose or not sys.stderr.isatty(), leave=False,
        )
        try:
            for epoch in epochs_bar:
                t0 = time.perf_counter()
                losses = engine.run_epoch(self.cache, labels)
                record = {"epoch": first_epoch + epoch + 1, "loss": losses[0], "lr": engine.current_lrs()[0]}
                if self._unfreeze is not None and self._unfreeze[0]:
                    record["unfrozen_blocks"] = self._unfreeze[0]
                if val_cache is not None:
                    record.update({f"val_{k}": v for k, v in self._evaluate_cache(val_cache, cfg).items()})
                record["seconds"] = time.perf_counter() - t0
                self.history.append(record)
                self._fitted = True
                epochs_bar.set_postfix(loss=f"{record['loss']:.4f}")
                stop = any(cb(self, record) is False for cb in callbacks)
                early_stopped = early_stopping is not None and early_stopping.step(record, _TunerState(self))
                if checkpoint is not None:  # after the callbacks: what they draw is in its random state
                    self._checkpoint(checkpoint, engine, epoch + 1, first_epoch=first_epoch, stages=stages,
                                     early_stopping=early_stopping, early_stopped=early_stopped)
                if stop or early_stopped:
                    return True
            return False
        finally:
            engine.release_graph()

    def fit_many(self, configs: Sequence[dict], train: Any, **common):
        """Train several heads (lr, width, weight decay, seed) in one pass over the cache.

        See :func:`fastft.sweep.fit_many`.
        """
        from fastft.sweep import fit_many

        return fit_many(self, configs, train, **common)

    # ------------------------------------------------------------------ evaluation
    def _num_outputs(self) -> int:
        if self.num_classes is not None:
            return self.num_classes
        probe = self.cache.gather_shaped(torch.arange(1), out_dtype=torch.float32)
        self.tail.eval()
        with torch.no_grad():
            out = self.tail(*[t.to(self.device) for t in probe])
        return int(out.shape[-1]) if out.dim() > 1 else 1

    def _evaluate_cache(self, cache: FeatureCache, cfg: FitConfig) -> dict[str, float]:
        logits = self._logits_from_cache(cache, cfg.batch_size)
        labels = cache.labels.to(logits.device)
        return _metrics(logits, labels, cfg)

    def _logits_from_cache(self, cache: FeatureCache, batch_size: int) -> torch.Tensor:
        was_training = self.tail.training
        self.tail.eval()
        outs = []
        where = cache.index_device(self.device)  # rows made where they are read: no copy, no sync
        with torch.no_grad(), deferred_row_checks():  # rows in range by construction
            for start in range(0, cache.num_rows, batch_size):
                rows = torch.arange(start, min(start + batch_size, cache.num_rows), device=where)
                taps = cache.gather_shaped(rows, out_dtype=torch.float32, check_rows=False)
                outs.append(self.tail(*[t.to(self.device, non_blocking=True) for t in taps]).float())
        self.tail.train(was_training)
        return torch.cat(outs)

    def evaluate(self, data: Any, *, batch_size: int = 256) -> dict[str, float]:
        """Loss and metrics on ``data`` (accuracy, top-5 when C > 5, macro-F1 for 'ce').

        The frozen part runs once over ``data`` into a cache of its own (reused on later calls).
        """
        self._require_fitted("evaluate")
        self._prepare(_example(data))  # after load() or unfreeze() there is no split yet
        cache = self._build_cache(data, train=False)
        return self._evaluate_cache(cache, self._fit_config or FitConfig(batch_size=batch_size))

    def predict(self, x: Any, *, batch_size: int = 256) -> torch.Tensor:
        """Model outputs (logits) for a batch of inputs ``x`` (a tensor or a dict of tensors)."""
        self._require_fitted("predict")
        self._prepare(fdata.index_select(x, torch.arange(min(2, fdata.batch_length(x)))))
        self.prefix.eval()
        self.tail.eval()
        outs = []
        with torch.no_grad():
            n = fdata.batch_length(x)
            for start in range(0, n, batch_size):
                part = fdata.to_device(fdata.index_select(x, torch.arange(start, min(start + batch_size, n))), self.device)
                taps = self.prefix(part)
                taps = taps if isinstance(taps, tuple) else (taps,)
                outs.append(self.tail(*taps))
        return torch.cat(outs)

    def export(self) -> nn.Module:
        """The edited model with the trained weights: a plain ``nn.Module`` in eval mode whose
        outputs equal :meth:`predict` and which needs no fastft to run."""
        self._require_fitted("export")
        exported = copy.deepcopy(self.model).eval()
        for m in exported.modules():
            for mark in [k for k in m.__dict__ if k.startswith("_fastft_")]:
                del m.__dict__[mark]  # surgery / unfreeze bookkeeping
        return exported

    def _require_fitted(self, what: str) -> None:
        if not self._fitted:
            raise NotFittedError(f"call fit() before {what}(): the new layers are still untrained.")

    # ------------------------------------------------------------------ save / load
    def _config(self) -> dict[str, Any]:
        return {
            "num_classes": self.num_classes, "hidden": self.hidden, "freeze": self.freeze,
            "cache": self.cache_tier, "cache_dtype": self.cache_dtype, "views": self.views,
            "seed": self.seed, "head_name": self.head_name, "output_key": self.output_key,
            "activation": self.activation, "dropout": self.dropout, "pool": self.pool,
            "extract_amp": self.extract_amp,
        }

    def _trainable_state(self) -> dict[str, torch.Tensor]:
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

    def save(self, path: str) -> None:
        """Write the new layers' weights, the configuration and the history (atomically)."""
        self._require_fitted("save")
        if self.head is not None:
            raise FastFTValueError(
                "save() rebuilds the head from its configuration; a custom head= module cannot be "
                "rebuilt. Save ft.export().state_dict() instead."
            )
        save_atomic({
            "config": self._config(),
            "head": None if self._head_spec is None else asdict(self._head_spec),
            "state": self._trainable_state(),
            "history": list(self.history),
            "fit": None if self._fit_config is None else asdict(self._fit_config),
            "unfreeze": self._unfreeze,
        }, path)

    @classmethod
    def load(cls, path: str, model: nn.Module, **overrides) -> "FineTuner":
        """Rebuild a FineTuner saved with :meth:`save` on a fresh copy of the original model."""
        obj = load_checked(path)
        ft = cls(model, **{**obj["config"], **overrides})
        if obj.get("unfreeze"):
            blocks, train_bn = obj["unfreeze"]
            ft.unfreeze(blocks, train_bn=train_bn)
        if not ft._edited:  # an encoder: the head is appended from the recorded spec, no probe
            ft._edit(example=None, spec=_HeadSpec(**obj["head"]))
        ft._load_state(obj["state"], path)
        ft.history = History(obj.get("history") or [])
        ft._fit_config = FitConfig(**obj["fit"]) if obj.get("fit") else None
        ft._fitted = True
        return ft

    def _load_state(self, state: dict[str, torch.Tensor], origin: str) -> None:
        own = self.model.state_dict()
        unknown = sorted(set(state) - set(own))
        if unknown:
            raise SurgeryError(
                f"{origin} holds weights for {', '.join(unknown[:5])} which the edited model does not "
                "have: load it with the same base model and configuration it was saved with."
            )
        for name, t in state.items():
            if own[name].shape != t.shape:
                raise SurgeryError(f"{origin}: {name} has shape {tuple(t.shape)}, the model expects {tuple(own[name].shape)}.")
        self.model.load_state_dict(state, strict=False)

    def _checkpoint(self, path: str, engine: "_Engine", epochs_done: int, *, first_epoch: int = 0,
                    stages: list | None = None, early_stopping: EarlyStopping | None = None,
                    early_stopped: bool = False) -> None:
        state = self._trainable_state()
        save_atomic({
            # What the fit trained on, so that a resume on other data or another backbone is refused.
            "data_key": self._train_data_key,
            "backbone": self._backbone_digest(state),
            "global_epochs_done": first_epoch + epochs_done,  # of the whole fit (epochs_done: of the stage)
            "rng": _rng_state(self.device),  # dropout in the trained layers draws from it
            "schedule": [list(st) for st in stages] if stages and len(stages) > 1 else None,
            "early_stopping": None if early_stopping is None else early_stopping.state_dict(),
            "early_stopped": bool(early_stopped),
            "config": self._config(),
            "head": None if self._head_spec is None else asdict(self._head_spec),
            "state": state,
            "history": list(self.history),
            "fit": asdict(self._fit_config),
            "epochs_done": epochs_done,
            "engine": engine.state_dict(),
            "unfreeze": self._unfreeze,
        }, path)

    def _restore(self, obj: dict, path: str, engine: "_Engine") -> int:
        """Resume inside a stage from checkpoint ``obj`` (read from ``path`` by
        :meth:`_resumable_checkpoint`): weights, optimizer, random state; the epochs done."""
        saved, now = (obj.get("unfreeze") or (0, False))[0], (self._unfreeze or (0, False))[0]
        if saved != now:
            raise FastFTValueError(
                f"{path} was written with {saved} unfrozen block(s) but this tuner has {now}: call "
                f"ft.unfreeze({saved}) before fit(..., resume=True), as before the interrupted fit."
            )
        self._restore_progress(obj, path)
        engine.load_state_dict(obj["engine"])
        return int(obj["epochs_done"])

    def _restore_progress(self, obj: dict, path: str) -> None:
        """The trained weights, history and random state of a checkpoint (not its optimizer)."""
        self._load_state(obj["state"], path)
        if obj.get("rng") is not None:
            _set_rng_state(obj["rng"], self.device)
        self.history = History(obj.get("history") or [])
        self._fitted = True

    def _backbone_digest(self, trainable: dict[str, torch.Tensor]) -> str:
        """Digest of every tensor of the model that a checkpoint does not hold (the frozen
        backbone as the fit found it)."""
        h = hashlib.sha256()
        for name, t in self.model.state_dict().items():
            if name not in trainable:
                h.update(name.encode() + tensor_digest(t))
        return h.hexdigest()

    def _check_resumed_data(self, obj: dict, path: str, train: Any, dataset_id: str | None) -> None:
        """FastFTValueError when the checkpoint was written by a fit on other training data
        (their key is computed here: one more read of a Dataset, paid only by a resume)."""
        saved = obj.get("data_key")
        if saved is None:
            return
        if dataset_part(as_source(train), dataset_id, self.extract_batch_size)[0] != saved:
            raise FastFTValueError(
                f"{path} was written by a fit on other training data than the data given now: resuming would "
                "continue that fit on these data. Resume with the same data (and dataset_id=), or start a new fit "
                "(another checkpoint= path, or resume=False)."
            )

    def _resumable_checkpoint(self, path: str, stages: list, cfg: FitConfig) -> dict:
        """A training checkpoint, checked to come from a fit like this one (same settings,
        schedule, backbone; the data are checked once their cache is built)."""
        obj = load_checked(path)
        if "engine" not in obj:
            raise FastFTValueError(f"{path} is a saved model, not a training checkpoint; resume needs a checkpoint= file.")
        if obj.get("backbone") is not None and obj["backbone"] != self._backbone_digest(obj["state"]):
            raise FastFTValueError(
                f"{path} was written by a fit of another backbone: the frozen weights of this model differ from "
                "those the checkpoint was trained on. Resume with the same pretrained model (a fresh copy of it), "
                "or start a new fit."
            )
        saved, now = obj.get("schedule"), [list(st) for st in stages] if len(stages) > 1 else None
        if saved != now:
            raise FastFTValueError(
                f"{path} was written by a fit with stages {saved or 'none (no unfreeze=)'} (first epoch, "
                f"epochs, blocks), this fit has {now or 'none (no unfreeze=)'}: resume with the same "
                "epochs= and unfreeze= as the interrupted fit."
            )
        # cuda_graph changes how steps run, not what they compute; epochs may grow (one stage)
        # unless a scheduler planned the learning rate over the epochs the fit was given.
        fit = obj.get("fit") or {}
        if cfg.scheduler is not None and fit.get("epochs") not in (None, cfg.epochs):
            raise FastFTValueError(
                f"{path} was written by a fit of epochs={fit['epochs']} with scheduler={cfg.scheduler!r}, whose "
                f"learning rate is planned over those {fit['epochs']} epochs: it cannot continue exactly for "
                f"epochs={cfg.epochs}. Resume with epochs={fit['epochs']}, or start a new fit."
            )
        differ = [k for k, v in asdict(cfg).items() if k not in ("epochs", "cuda_graph") and k in fit and fit[k] != v]
        if differ:
            raise FastFTValueError(
                f"{path} was written by a fit with {', '.join(f'{k}={fit[k]!r}' for k in differ)}; this fit "
                f"has {', '.join(f'{k}={getattr(cfg, k)!r}' for k in differ)}: resume with the same settings."
            )
        saved_bn = bool((obj.get("unfreeze") or (0, False))[1])
        if saved_bn != bool(self._unfreeze[1] if self._unfreeze else False):
            raise FastFTValueError(
                f"{path} was written with train_bn={saved_bn}: call ft.unfreeze(..., train_bn={saved_bn}) "
                "before fit(..., resume=True), as before the interrupted fit."
            )
        obj.setdefault("global_epochs_done", obj["epochs_done"])  # checkpoints from before schedules
        return obj


class _TunerState:
    """What early stopping keeps of an epoch: the trainable state under the model's names, so
    that it restores into the model whichever stage (and tail) it was taken in."""

    def __init__(self, ft: "FineTuner"):
        self.ft = ft

    def state_dict(self) -> dict[str, torch.Tensor]:
        return self.ft._trainable_state()


@dataclass
class _LowCut:
    """The deepest cut of an unfreeze schedule: blocks unfrozen there, its tail and caches."""

    blocks: int
    tail: nn.Module
    cache: FeatureCache
    val_cache: FeatureCache | None = None


class _NeedsProbe(Exception):
    """Internal: attaching the head needs one forward pass over real inputs."""


class _Engine:
    """The training loop on the cache, for one or several tails sharing every batch."""

    def __init__(self, ft: FineTuner, cfg: FitConfig, tails: list[nn.Module], *, n_rows: int,
                 per_tail: list[dict] | None = None):
        self.ft, self.cfg, self.tails = ft, cfg, tails
        self.device = ft.device
        per_tail = per_tail or [{} for _ in tails]
        self.loss_fn = make_loss(cfg.loss, label_smoothing=cfg.label_smoothing,
                                 class_weights=cfg.class_weights).to(self.device)
        groups = []
        for tail, extra in zip(tails, per_tail):
            # One group per tail, or with lr_decay one per unfrozen block besides the new layers.
            groups += param_groups(tail, extra.get("lr", cfg.lr), cfg.lr_decay,
                                   extra.get("weight_decay", cfg.weight_decay))
        self.optimizer = _make_optimizer(cfg, groups, capturable=cfg.cuda_graph)
        self.steps_per_epoch = math.ceil(n_rows / cfg.batch_size)
        self.scheduler = _make_scheduler(cfg, self.optimizer, self.steps_per_epoch)
        self.generator = torch.Generator().manual_seed(ft.seed)
        self.n_rows = n_rows
        # Under torch.distributed each tail trains inside DistributedDataParallel.
        self.modules = [fdist.wrap(t, self.device) for t in tails]
        # Sweeps replace this with a vectorized forward over heads of the same shape.
        self.forward_all = lambda taps: [m(*taps) for m in self.modules]
        self._world = fdist.rank_and_world()[1]
        self._share = 1.0  # this rank's share of the current global batch (see run_epoch)
        self.graphed = GraphedStep(self._step, self.device) if cfg.cuda_graph else None

    def release_graph(self) -> None:
        """Let a CUDA graph's memory pool go: the graph and the .grad tensors captured in it."""
        if self.graphed is not None:
            self.graphed = None
            self.optimizer.zero_grad(set_to_none=True)

    def current_lrs(self) -> list[float]:
        return [g["lr"] for g in self.optimizer.param_groups]

    def run_epoch(self, cache: FeatureCache, labels: torch.Tensor) -> list[float]:
        """One epoch over the cache; returns the mean training loss of each tail."""
        cfg = self.cfg
        # The order is drawn on the CPU generator (the same on every device, so the oracle and
        # resumed runs see the same batches) and moved to the training device once per epoch:
        # no index copy and no host synchronisation per step.
        order = torch.randperm(self.n_rows, generator=self.generator)
        view = None
        if cache.num_views > 1:  # one augmented view per sample per epoch
            view = torch.randint(cache.num_views, (self.n_rows,), generator=self.generator)
        # The order goes where the cache is read (the device; the CPU for a disk cache) and
        # where the labels are, each once per epoch.
        where = cache.index_device(self.device)
        perm = order.to(where, non_blocking=True)
        view = None if view is None else view.to(where, non_blocking=True)
        label_perm = perm if labels.device == perm.device else order.to(labels.device, non_blocking=True)
        for t in self.tails:
            t.train()
        totals = torch.zeros(len(self.tails), dtype=torch.float64, device=self.device)
        out_dtype = torch.bfloat16 if cfg.amp == "bf16" else torch.float32
        # The rows are a permutation of the cache's own: their range checks would only cost
        # a host synchronisation per step on CUDA (the kernels still check what they read).
        with deferred_row_checks():
            for start in range(0, self.n_rows, cfg.batch_size):
                global_rows = perm[start:start + cfg.batch_size]
                rows = fdist.local_rows(global_rows)  # all of them on a single process
                taps = cache.gather_shaped(rows, view=None if view is None else view[rows], out_dtype=out_dtype,
                                           check_rows=False)
                taps = [t.to(self.device, non_blocking=True) for t in taps]
                y = labels[fdist.local_rows(label_perm[start:start + cfg.batch_size])]
                # Each rank's mean is weighted by its share of the global batch; DDP then averages
                # over ranks, which gives exactly the gradient of the global batch mean.
                self._share = rows.numel() * self._world / global_rows.numel()
                step_losses = self.graphed(taps, y) if self.graphed is not None else self._step(taps, y)
                if self.scheduler is not None:
                    self.scheduler.step()
                totals += step_losses.double() * rows.numel()
        return (fdist.all_reduce_sum(totals) / self.n_rows).cpu().tolist()

    def _step(self, taps: list[torch.Tensor], y: torch.Tensor) -> torch.Tensor:
        """One optimizer step on a batch; returns each tail's loss (detached, fp32).

        No host synchronisation, so that it can be captured as a CUDA graph.
        """
        self.optimizer.zero_grad(set_to_none=True)
        # cache_enabled=False: autocast's weight-cast cache must not outlive a graph capture.
        with torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=self.cfg.amp == "bf16",
                            cache_enabled=False):
            step_losses = [self._loss(out, y) for out in self.forward_all(taps)]
        total = torch.stack(step_losses).sum() if len(step_losses) > 1 else step_losses[0]
        (total * self._share if self._world > 1 else total).backward()
        self.optimizer.step()
        return torch.stack([l.detach().float() for l in step_losses])

    def _loss(self, out: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        out = out.float()
        return self.loss_fn(out, prepare_targets(y, self.cfg.loss, out))

    def state_dict(self) -> dict:
        return {
            "optimizer": self.optimizer.state_dict(),
            "scheduler": None if self.scheduler is None else self.scheduler.state_dict(),
            "generator": self.generator.get_state(),
        }

    def load_state_dict(self, state: dict) -> None:
        self.optimizer.load_state_dict(state["optimizer"])
        if "capturable" in self.optimizer.defaults:
            # The groups come back as they were saved: make them what this fit needs (a fit
            # resumed with or without cuda_graph), Adam's step counters on the matching side.
            capturable = self.cfg.cuda_graph
            for group in self.optimizer.param_groups:
                group["capturable"] = capturable
                for p in group["params"]:
                    st = self.optimizer.state.get(p, {})
                    if "step" in st:
                        st["step"] = st["step"].to(device=p.device if capturable else "cpu", dtype=torch.float32)
        if self.scheduler is not None and state["scheduler"] is not None:
            self.scheduler.load_state_dict(state["scheduler"])
        self.generator.set_state(state["generator"])


def _make_optimizer(cfg: FitConfig, groups: list[dict], *, capturable: bool = False) -> torch.optim.Optimizer:
    # capturable: Adam's step counters on the device, so that a CUDA graph can replay the step.
    if cfg.optimizer == "adamw":
        return torch.optim.AdamW(groups, lr=cfg.lr, weight_decay=cfg.weight_decay, capturable=capturable)
    if cfg.optimizer == "adam":
        return torch.optim.Adam(groups, lr=cfg.lr, weight_decay=cfg.weight_decay, capturable=capturable)
    return torch.optim.SGD(groups, lr=cfg.lr, momentum=cfg.momentum, weight_decay=cfg.weight_decay)


def _make_scheduler(cfg: FitConfig, optimizer, steps_per_epoch: int):
    total = cfg.epochs * steps_per_epoch
    if cfg.scheduler == "cosine":
        return torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=total)
    if cfg.scheduler == "onecycle":
        return torch.optim.lr_scheduler.OneCycleLR(
            optimizer, max_lr=[g["lr"] for g in optimizer.param_groups], total_steps=total)
    return None


def _metrics(logits: torch.Tensor, labels: torch.Tensor, cfg: FitConfig) -> dict[str, float]:
    loss_fn = make_loss(cfg.loss, label_smoothing=cfg.label_smoothing, class_weights=cfg.class_weights)
    loss = loss_fn.to(logits.device)(logits, prepare_targets(labels, cfg.loss, logits)).item()
    if cfg.loss == "ce":
        return {"loss": loss, **classification_metrics(logits, labels.long())}
    if cfg.loss == "bce":
        return {"loss": loss, **multilabel_metrics(logits, labels)}
    return {"loss": loss}


def _rng_state(device: torch.device) -> dict:
    state = {"cpu": torch.get_rng_state()}
    if device.type == "cuda":
        state["cuda"] = torch.cuda.get_rng_state(device)
    return state


def _set_rng_state(state: dict, device: torch.device) -> None:
    torch.set_rng_state(state["cpu"])
    if device.type == "cuda" and "cuda" in state:
        torch.cuda.set_rng_state(state["cuda"], device)


def _default_device() -> torch.device:
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def _model_device(model: nn.Module) -> torch.device:
    for p in model.parameters():
        return p.device
    return torch.device("cpu")


def _stages(schedule: Sequence[tuple[int, int]] | None, epochs: int) -> list[tuple[int, int, int | None]]:
    """``(first epoch, epochs, blocks to unfreeze first or None)`` of each stage of a fit."""
    if not schedule:
        return [(0, epochs, None)]
    try:
        steps = [(int(e), int(n)) for e, n in schedule]
    except (TypeError, ValueError):
        raise FastFTValueError(f"unfreeze= takes (epoch, blocks) pairs like [(5, 1), (8, 2)], got {schedule!r}.") from None
    epochs_at = [e for e, _ in steps]
    if epochs_at != sorted(set(epochs_at)) or epochs_at[0] < 0 or epochs_at[-1] >= epochs:
        raise FastFTValueError(
            f"unfreeze= epochs must increase strictly and lie in 0..{epochs - 1} (the fit has {epochs} "
            f"epochs), got {epochs_at}."
        )
    stages = [] if epochs_at[0] == 0 else [(0, epochs_at[0], None)]
    bounds = epochs_at + [epochs]
    stages += [(e, bounds[i + 1] - e, n) for i, (e, n) in enumerate(steps)]
    return stages


def _example(data: Any, n: int = 2) -> Any:
    """Two samples of ``data`` for probing and the split's parity check (enough to check the
    batch axis; each probe is a frozen forward, paid before the cache is built). The global
    random stream is left as it was (dropout in unfrozen blocks draws from it)."""
    return as_source(data).example(n)


def _training_batch_size(train: Any, batch_size: int | None) -> int:
    """fit's batch size: the one given, else a DataLoader's own, else 256; a DataLoader whose
    batch size differs from the one given is told that it only reads the samples."""
    loader = train.batch_size if isinstance(train, DataLoader) else None
    if batch_size is None:
        return loader or 256
    if loader is not None and loader != batch_size:
        warnings.warn(
            f"fit(batch_size={batch_size}) trains in batches of {batch_size}; the DataLoader's batch_size={loader} "
            "only reads the samples for the one frozen pass. Leave fit's batch_size unset to train with the "
            "DataLoader's.", UserWarning, stacklevel=3)
    return batch_size
