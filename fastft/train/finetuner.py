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
:mod:`~fastft.train.facade` (the settings as attributes),
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
from fastft.train.caches import TunerCaches, example_of
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
from fastft.train.facade import INIT_SETTINGS, TunerAttributes, tuner_options
from fastft.train.fitting import Callback, StagedFit
from fastft.train.graph_step import check_cuda_graph
from fastft.train.settings import OLD_FIT_ORDER, OLD_INIT_ORDER, saved_config
from fastft.train.sweep import fit_many
from fastft.train.tuned import TunedModel


class FineTuner(TunerAttributes):
    """Fine-tune ``model`` by training only its new layers on cached frozen features.

    Args:
        model: the pretrained network, edited **in place** (pass a deep copy to keep the
            original). It takes a tensor or a dict (see :mod:`fastft.model.calling`).
        num_classes: size of the new output layer (default None: with no ``head`` either,
            the model is used as the caller edited it, e.g. with :mod:`fastft.surgery`).
        hidden: widths of new hidden layers before the output layer (default none;
            ``[256]`` → Linear+ReLU, then the output Linear).
        head: a ready-made module to use as the new output layer (instead of
            ``num_classes``; a tuner with one cannot use :meth:`save`).
        freeze: ``"auto"`` (default) freezes everything that is not new; a list of module
            names or glob patterns freezes those too; None leaves ``requires_grad`` as is.
        cache: the cache tier: ``"auto"`` (default: the fastest that fits ``max_memory``),
            ``"device"``, ``"host"`` or ``"disk"`` (kept in ``cache_dir``, reused by later runs).
        cache_dtype: storage dtype of the cached features: ``"fp16"`` (default), ``"bf16"``,
            ``"fp32"`` (exactly a naive loop's weights) or ``"int8"``.
        views: augmented views cached per sample (default 1; > 1 needs a random ``transform``).
        transform: a callable applied to each batch of inputs before the frozen part, when
            the cache is built (training caches only; default None).
        device: where training runs (default: CUDA when available, else CPU).
        seed: seeds the new layers' initialisation, the batch order and the transform's
            views (default 0).
        head_name: qualified name of the output layer to replace (default: found from the
            model's own contract or its layout).
        output_key: the entry fed to the new head for encoders that return a dict
            (default ``"sentence_embedding"``, SentenceTransformer's).
        activation, dropout: of the new hidden layers (default ``"relu"``, 0.0).
        pool: how the cache reduces sequence/spatial axes of the frozen output
            (``"none"`` keeps it whole, default; see :func:`fastft.ops.cache_write`).
        cache_dir: folder of disk caches (default ``$FASTFT_CACHE_DIR`` or
            ``~/.cache/fastft``); used with ``cache="disk"``, or when ``"auto"`` goes to disk.
        max_memory: bytes (or ``"2GB"``) the in-memory tiers may use before ``cache="auto"``
            goes to disk (default: half of the memory free at build time).
        extract_batch_size: batch size of the one frozen pass (default 256; a DataLoader's
            own batches are used as they are).
        extract_amp: the frozen pass's precision. ``"auto"`` (default): bf16 autocast where
            the device computes bf16 natively (CPUs with AVX512-BF16 or AMX, GPUs with bf16
            tensor cores), else fp32; ``"bf16"`` insists (refused where it would be
            emulated); None or ``"fp32"``: fp32. The features then carry bf16 rounding (a
            different cache key); ``FASTFT_EXTRACT_AMP=fp32`` makes ``"auto"`` mean fp32.
        transform_id: a name for what ``transform`` computes that fastft cannot hash (a file
            it reads, an object without readable state); without it such a transform's
            caches are never reused (see :meth:`FeatureCache.build`). Default None.
        verbose: progress bars on a terminal, one log line per epoch elsewhere (default
            True; see :mod:`fastft.train.progress`).
    """

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
        extract_amp: str | None = "auto",
        transform_id: str | None = None,
        verbose: bool = True,
    ):
        refuse_positional("FineTuner(model", OLD_INIT_ORDER, positional)
        given = locals()  # the keyword settings
        self.head_options, self.cache_options = tuner_options({k: given[k] for k in INIT_SETTINGS})
        device = self.cache_options.device
        self.caches = TunerCaches(self.cache_options)
        self.tuned = TunedModel(model, self.head_options, freeze=freeze, device=device)
        self.cache: FeatureCache | None = None  # the training cache of the current cut
        self.history = History()
        self.fit_config: FitConfig | None = None  # of the last fit (or the loaded one)
        self.fitted = False  # True once the new layers were trained or loaded
        self.input_ranks: dict[str, int] | None = None  # of the batch the model was split on

    # ------------------------------------------------------------------ the model
    def unfreeze(self, blocks: int, *, train_bn: bool = False) -> list[str]:
        """Make the top ``blocks`` blocks of the frozen part trainable and move the cut down to
        the input of the lowest one.

        Blocks are the children of the model's Sequential/ModuleList stacks (``encoder.layer``,
        ``layer4``, ``blocks``; see :func:`fastft.model.blocks.find_blocks`). The next ``fit``
        caches the frozen part below the new cut (``pool`` ``'none'``; reused by key) and
        trains the unfrozen blocks with the new layers (per-block rates: ``fit(lr_decay=)``).

        Args:
            blocks: how many top blocks are trainable, exactly (``0`` freezes them again).
            train_bn: let BatchNorm layers in those blocks update their running statistics
                (default False: they keep the pretrained ones).

        Returns:
            The names of the unfrozen blocks (``[]`` before an encoder's head is attached,
            which waits for data: they are unfrozen then).
        """
        names = self.tuned.unfreeze(blocks, train_bn=train_bn)
        self.cache = None
        return names

    def prepare(self, example_inputs: Any) -> None:
        """Attach the new layers and split the model; ``fit``, ``evaluate`` and ``predict`` do
        this themselves. The split is made again whenever the model changed since.

        Args:
            example_inputs: one small batch as the model takes it (an encoder's head is sized
                from what reaches it; the split is checked on it).
        """
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

        Args:
            data: the data, in any form ``fit`` takes.
            dataset_id: a name for the data's content, used by the key instead of a hash of
                every sample (see ``fit``); default None.
            evaluation: build the cache ``fit(val=data)`` and ``evaluate(data)`` use (one view,
                no transform) instead of the training cache (default False).
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
        """Train the new layers on the cached frozen features.

        The settings ``epochs`` … ``cuda_graph`` are :class:`FitConfig`'s, as keywords or as
        ``config=``. Calling ``fit`` again continues training: it goes on from the trained
        weights (with a fresh optimizer and a fresh early-stopping count) and numbers its
        epochs after the last fit's; ``ft.history`` holds every fit's epochs, the returned
        History this call's. To start over, build a new FineTuner on a fresh copy of the
        pretrained model.

        Args:
            train: ``(X, y)`` tensors, a map-style Dataset of ``(input, label)`` or a DataLoader
                (read with its own batch size, collate function, workers and sampler).
            val: validation data in the same forms (default None); adds ``val_loss``,
                ``val_accuracy``, ``val_macro_f1`` to each epoch's record.
            config: a :class:`FitConfig` (default None: FitConfig's defaults); a keyword that
                contradicts it is refused.
            epochs: epochs of the whole fit, every ``unfreeze`` stage included (default 10).
            batch_size: rows per step (default: a DataLoader's own, else 256).
            lr: learning rate (default 1e-3).
            optimizer: ``"adamw"`` (default), ``"adam"`` or ``"sgd"``.
            weight_decay: the optimizer's weight decay (default 0).
            momentum: SGD's momentum (default 0.9; torch's SGD has 0); refused with Adam(W).
            scheduler: None (constant lr, default), ``"cosine"`` or ``"onecycle"``, stepped
                per batch over the stage.
            loss: ``"ce"`` (default; integer labels), ``"bce"`` (multi-label) or ``"mse"``.
            label_smoothing: for ``"ce"`` (default 0).
            class_weights: per-class weights of the loss (default None).
            amp: ``"bf16"`` trains under bf16 autocast (default None: fp32).
            lr_decay: ``d`` gives each unfrozen block ``lr * d ** depth`` (depth 1 for the top
                block); default None (the same lr).
            cuda_graph: capture the step as a CUDA graph after three eager steps (CUDA only;
                the same batches as eager; not with a ``scheduler`` or torch.distributed).
            early_stopping: ``n`` stops after ``n`` epochs without improvement of
                ``val_loss`` (``loss`` without ``val``), or an :class:`EarlyStopping`.
            callbacks: ``cb(tuner, record)`` called after each epoch; ``False`` stops training.
            unfreeze: ``[(epoch, n), ...]`` calls :meth:`unfreeze` ``(n)`` before that 0-based
                epoch; e.g. ``epochs=8, unfreeze=[(5, 1)]``: 5 head epochs, then 3 with the
                top block. Each stage trains like a ``fit`` of its own on its cut's cache.
            checkpoint: a path written atomically after every epoch (default None).
            resume: go on from ``checkpoint`` to the same final weights as an uninterrupted
                run (weights, optimizer, history, early stopping, random state); a checkpoint
                of other settings, data or backbone is refused; none yet: a warning, and a
                fresh start. Default False.
            dataset_id: a name for ``train``'s content: the cache key uses it instead of
                reading every sample to hash it (without it each fit reads every item of a
                Dataset once, on a hit too). Pass it when loading items is slow and you know
                the data are unchanged; change it whenever they change (default None).

        Returns:
            The :class:`History` of this call: one dict per epoch with ``epoch``, ``loss``,
            ``lr``, ``seconds`` and the ``val_*`` metrics.
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

        Args:
            configs: one dict per head, with keys among ``lr``, ``weight_decay``, ``hidden``,
                ``seed``, ``dropout``.
            train: the training data, as for :meth:`fit`.
            **common: settings shared by every head: ``val``, ``epochs``, ``batch_size``,
                ``lr``, ``weight_decay``, ``optimizer``, ``scheduler``, ``loss``,
                ``label_smoothing``, ``class_weights``, ``amp``, ``momentum``, ``vectorize``,
                ``keep_best``, ``dataset_id``, ``cuda_graph`` (see
                :func:`fastft.train.sweep.fit_many`); a config's own ``lr`` or
                ``weight_decay`` overrides the shared one. Other keywords are refused.

        Returns:
            A :class:`SweepResult`; with ``keep_best`` (default) the best head is in the tuner.
        """
        return fit_many(self, configs, train, **common)

    # ------------------------------------------------------------------ evaluation
    def evaluate(self, data: Any, *, batch_size: int = 256) -> dict[str, float]:
        """Loss and metrics on ``data`` (accuracy, top-5 when C > 5, macro-F1 for 'ce').

        The frozen part runs once over ``data`` into a cache of its own (reused on later calls).

        Args:
            data: the data, in any form ``fit`` takes.
            batch_size: rows per forward of the new layers (default 256).
        """
        self._require_fitted("evaluate")
        cache = self.build_cache(data, evaluation=True)  # splits first after load() or unfreeze()
        cfg = eval_config(self.fit_config, batch_size)  # evaluate's batch size, the fit's loss
        return cache_metrics(self.tail, cache, cfg, device=self.device)

    def predict(self, x: Any, *, batch_size: int = 256) -> torch.Tensor:
        """Model outputs (logits) for a batch of inputs.

        Args:
            x: a batch as the model takes it (a tensor or a dict of tensors, batch first).
            batch_size: samples per forward (default 256).
        """
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
        """Write the new layers' weights, the configuration and the history (atomically).

        Args:
            path: the file to write; :meth:`load` reads it.
        """
        self._require_fitted("save")
        if self.head is not None:
            raise FastFTValueError(
                "save() rebuilds the head from its configuration; a custom head= module cannot be "
                "rebuilt. Save ft.export().state_dict() instead."
            )
        self.training_state().write(path)

    @classmethod
    def load(cls, path: str, model: nn.Module, **overrides) -> FineTuner:
        """Rebuild a FineTuner saved with :meth:`save` on a fresh copy of the original model.

        Args:
            path: the file :meth:`save` wrote.
            model: an unedited copy of the pretrained model the saved tuner started from.
            **overrides: FineTuner settings that replace the saved ones (``device``,
                ``cache_dir``, ``verbose``, ...).
        """
        saved = TrainingState.read(path)
        ft = cls(model, **{**saved.config, **overrides})
        ft.tuned.restore(saved, path)
        ft.history = History(saved.history)
        ft.fit_config = FitConfig(**saved.fit) if saved.fit else None
        ft.fitted = True
        return ft
