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

The work is done by one module each: :mod:`~fastft.train.settings` (checked, recorded),
:mod:`~fastft.train.tuned` (the edited model, its split and state),
:mod:`~fastft.train.caches`, :mod:`~fastft.train.fitting` (stages, checkpoints, resume),
:mod:`~fastft.train.engine` (the loop), :mod:`~fastft.train.evaluation`.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence
from typing import Any

import torch
from torch import nn

from fastft import data as fdata
from fastft import distributed as fdist
from fastft.cache import FeatureCache
from fastft.data.refusals import check_forward_inputs, explained_predict, input_ranks
from fastft.errors import FastFTValueError, NotFittedError
from fastft.train.caches import CacheOptions, TunerCaches, example_of
from fastft.train.checkpoint import TrainingState
from fastft.train.config import (
    FIT_SETTINGS,
    EarlyStopping,
    FitConfig,
    History,
    early_stopping_of,
    plan_stages,
    refuse_positional,
    resolve_fit_config,
)
from fastft.train.evaluation import cache_metrics, eval_config, predict
from fastft.train.fitting import Callback, StagedFit
from fastft.train.graph_step import check_cuda_graph
from fastft.train.settings import (
    OLD_FIT_ORDER,
    OLD_INIT_ORDER,
    Setting,
    check_cache_settings,
    check_head_settings,
    saved_config,
    training_device,
)
from fastft.train.sweep import fit_many
from fastft.train.tuned import HeadOptions, TunedModel


class FineTuner:
    """Fine-tune ``model`` by training only its new layers on cached frozen features.

    Args:
        model: the pretrained network. It is edited **in place** (pass a deep copy to keep
            the original). Takes a tensor or a dict (see :mod:`fastft.model.calling`).
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
        max_memory: bytes the in-memory tiers may use before ``"auto"`` goes to disk.
        extract_batch_size: batch size of the one frozen pass.
        extract_amp: ``'bf16'`` runs the frozen pass under bf16 autocast (on GPUs with bf16
            tensor cores; the cached features then carry bf16 rounding).
        transform_id: a name for what ``transform`` computes with that fastft cannot hash (a
            file it reads, an object without readable state); without it such a transform's
            caches are used once and never reused (see :meth:`FeatureCache.build`).
        verbose: progress bars and messages.
    """

    num_classes = Setting("head_options")
    hidden = Setting("head_options")
    head = Setting("head_options")
    head_name = Setting("head_options")
    output_key = Setting("head_options")
    activation = Setting("head_options")
    dropout = Setting("head_options")
    cache_tier = Setting("cache_options", "tier")
    cache_dtype = Setting("cache_options", "dtype")
    views = Setting("cache_options")
    transform = Setting("cache_options")
    transform_id = Setting("cache_options")
    pool = Setting("cache_options")
    cache_dir = Setting("cache_options")
    max_memory = Setting("cache_options")
    extract_batch_size = Setting("cache_options", "batch_size")
    extract_amp = Setting("cache_options", "amp")
    verbose = Setting("cache_options")

    def __init__(
        self,
        model: nn.Module,
        *positional: Any,
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
        refuse_positional("FineTuner(model", OLD_INIT_ORDER, positional)
        check_head_settings(num_classes, head)
        check_cache_settings(cache_dtype, views, transform, extract_amp)
        device = training_device(device)
        self.head_options = HeadOptions(
            num_classes=None if num_classes is None else int(num_classes),
            hidden=list(hidden or []),
            head=head,
            head_name=head_name,
            output_key=output_key,
            activation=activation,
            dropout=float(dropout),
            seed=int(seed),
        )
        self.cache_options = CacheOptions(
            tier=cache,
            dtype=cache_dtype,
            views=int(views),
            transform=transform,
            transform_id=transform_id,
            pool=pool,
            cache_dir=cache_dir,
            max_memory=max_memory,
            batch_size=int(extract_batch_size),
            amp=extract_amp,
            seed=int(seed),
            device=device,
            verbose=verbose,
        )
        self.caches = TunerCaches(self.cache_options)
        self.tuned = TunedModel(model, self.head_options, freeze=freeze, device=device)
        self.cache: FeatureCache | None = None  # the training cache of the current cut
        self.history = History()
        self.fit_config: FitConfig | None = None  # of the last fit (or the loaded one)
        self.fitted = False  # True once the new layers were trained or loaded
        self.input_ranks: dict[str, int] | None = None  # of the batch the model was split on

    # ------------------------------------------------------------------ the model
    @property
    def model(self) -> nn.Module:
        """The edited model (a new root module when a head was appended to an encoder)."""
        return self.tuned.model

    @property
    def prefix(self) -> nn.Module | None:
        """The frozen part of the current split (None before the first split)."""
        return self.tuned.prefix

    @property
    def tail(self) -> nn.Module | None:
        """The trainable part of the current split."""
        return self.tuned.tail

    @property
    def device(self) -> torch.device:
        return self.tuned.device

    @property
    def seed(self) -> int:
        """Seeds the new layers' initialisation and the batch order."""
        return self.cache_options.seed

    @seed.setter
    def seed(self, value: int) -> None:
        self.head_options.seed = self.cache_options.seed = int(value)

    @property
    def freeze(self) -> str | Sequence[str] | None:
        return self.tuned.freeze

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
        names = self.tuned.unfreeze(blocks, train_bn=train_bn)
        self.cache = None
        return names

    def prepare(self, example_inputs: Any) -> None:
        """Attach the new layers (an encoder's head needs ``example_inputs``: one batch as the
        model takes it) and split the model; ``fit``, ``evaluate`` and ``predict`` do this
        themselves. The split is made again whenever the model changed since."""
        before = self.tuned.split_version
        check_forward_inputs(self.model, example_inputs)
        self.tuned.split_for(example_inputs)
        if self.tuned.split_version != before:
            self.cache, self.input_ranks = None, input_ranks(example_inputs)

    # ------------------------------------------------------------------ caches
    def build_cache(
        self, data: Any, *, dataset_id: str | None = None, evaluation: bool = False
    ) -> FeatureCache:
        """Run the frozen part once over ``data`` (or reuse a matching cache) and return it.

        With ``evaluation=True`` the cache is the one ``fit(val=data)`` and ``evaluate(data)``
        use (one view, no transform), e.g. to build it ahead of training.
        """
        self.prepare(example_of(data))
        cache = self.caches.build(
            self.prefix,
            data,
            pool=self.tuned.cache_pool(self.pool),
            train=not evaluation,
            dataset_id=dataset_id,
        )
        if not evaluation:
            self.cache = cache
        return cache

    # ------------------------------------------------------------------ training
    def fit(
        self,
        train: Any,
        val: Any = None,
        *positional: Any,
        config: FitConfig | None = None,
        epochs: int | None = None,
        batch_size: int | None = None,
        lr: float | None = None,
        optimizer: str | None = None,
        weight_decay: float | None = None,
        momentum: float | None = None,
        scheduler: str | None = None,
        loss: str | None = None,
        label_smoothing: float | None = None,
        class_weights: Sequence[float] | None = None,
        amp: str | None = None,
        lr_decay: float | None = None,
        cuda_graph: bool | None = None,
        early_stopping: int | EarlyStopping | None = None,
        callbacks: Iterable[Callback] = (),
        unfreeze: Sequence[tuple[int, int]] | None = None,
        checkpoint: str | None = None,
        resume: bool = False,
        dataset_id: str | None = None,
    ) -> History:
        """Train the new layers on the cached frozen features; returns the :class:`History`.

        The training settings (``epochs`` … ``cuda_graph``) are those of :class:`FitConfig`,
        given as keywords or as ``config=FitConfig(...)``; unset ones take FitConfig's
        defaults (10 epochs, AdamW at lr 1e-3, loss ``'ce'``). ``batch_size`` defaults to a
        DataLoader's own (else 256). A DataLoader is read with its own batch size, collate
        function and workers for the one frozen pass, and its sampler decides which samples
        are cached (a subset stays a subset).

        The history has one dict per epoch: ``loss``, ``seconds``, ``lr`` and, with ``val``,
        ``val_loss`` / ``val_accuracy`` / ``val_macro_f1``. ``early_stopping=n`` stops after
        ``n`` epochs without improvement (or pass an :class:`EarlyStopping`); a callback
        ``cb(tuner, record)`` returning ``False`` stops training.

        ``checkpoint=path`` writes a checkpoint atomically after every epoch, and
        ``resume=True`` continues from it, giving the same final weights as an uninterrupted
        run (weights, optimizer, history, early-stopping state and torch's global random
        state); a checkpoint of a fit with other settings, data or backbone is refused. A fit
        that early stopping ended stays ended.

        Progressive unfreezing: ``unfreeze=[(epoch, n), ...]`` calls :meth:`unfreeze`
        ``(n)`` before that (0-based) epoch, e.g. ``epochs=8, unfreeze=[(5, 1)]`` trains the
        head for 5 epochs, then the top block with it for 3. Each stage is trained like a
        ``fit`` of its own epochs on the cache at its cut. ``lr_decay=d`` gives each unfrozen
        block ``lr * d ** depth`` (depth 1 for the top block).

        ``cuda_graph=True`` (CUDA only) captures the training step as a CUDA graph after three
        eager warm-up steps and replays it for every full batch: the same batches in the same
        order as eager training, one launch instead of dozens. It does not combine with a
        ``scheduler`` or with torch.distributed.
        """
        refuse_positional("fit(train, val", OLD_FIT_ORDER, positional)
        given = locals()  # the keyword settings: those named like FitConfig's fields
        cfg = resolve_fit_config(config, {k: given[k] for k in FIT_SETTINGS}, train)
        if cfg.cuda_graph:
            check_cuda_graph(self.device, cfg, fdist.rank_and_world()[1])
        stages = plan_stages(unfreeze, cfg.epochs)
        self.fit_config = cfg
        staged = StagedFit(
            self,
            cfg,
            stages,
            train=train,
            val=val,
            early_stopping=early_stopping_of(early_stopping, val is not None),
            callbacks=callbacks,
            checkpoint=checkpoint,
            dataset_id=dataset_id,
        )
        return staged.run(resume=resume)

    def fit_many(self, configs: Sequence[dict], train: Any, **common):
        """Train several heads (lr, width, weight decay, seed) in one pass over the cache.

        See :func:`fastft.train.sweep.fit_many`.
        """
        return fit_many(self, configs, train, **common)

    # ------------------------------------------------------------------ evaluation
    def evaluate(self, data: Any, *, batch_size: int = 256) -> dict[str, float]:
        """Loss and metrics on ``data`` (accuracy, top-5 when C > 5, macro-F1 for 'ce').

        The frozen part runs once over ``data`` into a cache of its own (reused on later calls).
        """
        self._require_fitted("evaluate")
        cache = self.build_cache(data, evaluation=True)  # splits first after load() or unfreeze()
        cfg = eval_config(self.fit_config, batch_size)  # evaluate's batch size, the fit's loss
        return cache_metrics(self.tail, cache, cfg, device=self.device)

    def predict(self, x: Any, *, batch_size: int = 256) -> torch.Tensor:
        """Model outputs (logits) for a batch of inputs ``x`` (a tensor or a dict of tensors)."""
        self._require_fitted("predict")
        with explained_predict(x, self.input_ranks):  # one sample: says to add a batch axis
            self.prepare(fdata.index_select(x, torch.arange(min(2, fdata.batch_length(x)))))
            return predict(self.prefix, self.tail, x, batch_size=batch_size, device=self.device)

    def export(self) -> nn.Module:
        """The edited model with the trained weights: a plain ``nn.Module`` in eval mode whose
        outputs equal :meth:`predict` and which needs no fastft to run."""
        self._require_fitted("export")
        return self.tuned.export()

    def _require_fitted(self, what: str) -> None:
        if not self.fitted:
            raise NotFittedError(f"call fit() before {what}(): the new layers are still untrained.")

    # ------------------------------------------------------------------ save / load
    def training_state(self) -> TrainingState:
        """What :meth:`save` writes (and every checkpoint starts with)."""
        config = saved_config(self.head_options, self.cache_options, self.freeze)
        return self.tuned.training_state(config, self.history, self.fit_config)

    def save(self, path: str) -> None:
        """Write the new layers' weights, the configuration and the history (atomically)."""
        self._require_fitted("save")
        if self.head is not None:
            raise FastFTValueError(
                "save() rebuilds the head from its configuration; a custom head= module cannot be "
                "rebuilt. Save ft.export().state_dict() instead."
            )
        self.training_state().write(path)

    @classmethod
    def load(cls, path: str, model: nn.Module, **overrides) -> FineTuner:
        """Rebuild a FineTuner saved with :meth:`save` on a fresh copy of the original model."""
        saved = TrainingState.read(path)
        ft = cls(model, **{**saved.config, **overrides})
        ft.tuned.restore(saved, path)
        ft.history = History(saved.history)
        ft.fit_config = FitConfig(**saved.fit) if saved.fit else None
        ft.fitted = True
        return ft
