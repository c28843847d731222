"""``fastft.probe``: compare backbones × layers × heads on one labelled dataset.

For each backbone, one frozen pass over the training set and one over the test set fill a
:class:`~fastft.FeatureCache` with every tap at once (a :class:`~fastft.probing.TapStack`
is the cached prefix, so a later probe of the same backbone, data, taps and pooling is a
cache hit and runs no backbone at all). Every head then trains on the cached features of
its tap, its hyper-parameters are chosen on a validation split of the training set, and the
test set is scored once per chosen configuration (see :mod:`fastft.probing.protocol`).
"""

from __future__ import annotations

import math
import time
import warnings
from collections.abc import Mapping, Sequence
from typing import Any

import torch
from torch import nn
from tqdm.auto import tqdm

from fastft.cache import FeatureCache
from fastft.errors import FastFTValueError
from fastft.probing.heads import Features, HeadResult, linear_heads
from fastft.probing.knn import TEMPERATURE, knn_head
from fastft.probing.logreg import logreg_head
from fastft.probing.protocol import Split, make_split
from fastft.probing.report import ProbeReport, ProbeRow
from fastft.probing.taps import TapStack

__all__ = ["probe", "HEADS", "DEFAULT_LRS", "DEFAULT_WEIGHT_DECAYS", "DEFAULT_CS", "DEFAULT_KS"]

HEADS = ("linear", "mlp", "logreg", "knn")
DEFAULT_LRS = (1e-3, 1e-2, 1e-1, 3e-1)
DEFAULT_WEIGHT_DECAYS = (0.0, 1e-3, 1e-2, 1e-1)
DEFAULT_CS = (0.01, 0.03, 0.1, 0.3, 1.0, 3.0, 10.0, 100.0)
DEFAULT_KS = (10, 20, 100, 200)


def probe(
    backbones: Mapping[str, nn.Module],
    train: Any,
    test: Any,
    *,
    taps: str | Sequence[str] | Mapping[str, str | Sequence[str]] = "blocks",
    pooling: str = "auto",
    concat_last: int | None = None,
    heads: str | Sequence[str] = HEADS,
    lrs: Sequence[float] = DEFAULT_LRS,
    weight_decays: Sequence[float] = DEFAULT_WEIGHT_DECAYS,
    epochs: int = 10,
    batch_size: int = 64,
    mlp_hidden: int = 256,
    Cs: Sequence[float] = DEFAULT_CS,
    ks: Sequence[int] = DEFAULT_KS,
    temperature: float = TEMPERATURE,
    val_fraction: float = 0.2,
    shots: int | None = None,
    seed: int = 0,
    cache: str = "disk",
    cache_dtype: str = "fp16",
    cache_dir: str | None = None,
    extract_batch_size: int = 64,
    dataset_id: str | None = None,
    device: str | torch.device | None = None,
    out: str | None = None,
    progress: bool = True,
) -> ProbeReport:
    """Probe every tap of every backbone with every head; one frozen pass per backbone.

    Args:
        backbones: ``{name: pretrained model}``; each is run frozen, in eval mode, on the
            inputs of ``train`` and ``test`` (a tensor or a dict of tensors per batch).
        train: the labelled training data, in any form fastft takes (``(X, y)`` tensors, a
            map-style Dataset of ``(input, label)``, a DataLoader). The validation rows are
            carved from it.
        test: the labelled test data, same forms; scored once per chosen configuration.
        taps: the layers to probe: ``"blocks"`` (the embedding output and every block's
            output, see :func:`fastft.probing.taps.default_taps`), a list of module names,
            or ``{backbone name: either}``.
        pooling: how a tap's positions become one vector: ``"auto"`` (masked mean with a
            dict input's ``attention_mask``, else mean), ``"cls"``, ``"mean"``,
            ``"masked_mean"``.
        concat_last: also probe the concatenation of the last ``n`` taps (DINOv2's "last
            4 blocks"), computed from the cache.
        heads: which head families: any of ``"linear"``, ``"mlp"``, ``"logreg"``, ``"knn"``
            (a list, or one name).
        lrs: the linear heads' learning rates (AdamW); the MLP heads use them too.
        weight_decays: the linear heads' weight decays; the grid is ``lrs × weight_decays``,
            all heads of a tap trained together. The MLP heads use the first one.
        epochs: epochs of the linear and MLP heads.
        batch_size: batch size of the linear and MLP heads.
        mlp_hidden: width of the MLP heads' hidden layer (Linear-ReLU-Linear).
        Cs: inverse regularisation strengths of the logistic regression (scikit-learn's C).
        ks: neighbour counts of the kNN classifier.
        temperature: the kNN votes' temperature: a neighbour weighs ``exp(similarity / T)``.
        val_fraction: fraction of each class of ``train`` held out to choose hyper-parameters.
        shots: with a number k, the heads fit on k rows per class, sampled (seeded) from the
            training rows that are not validation rows; None uses all of them.
        seed: seeds the validation split, the few-shot sample, the heads' initialisation and
            batch order.
        cache: the feature cache's tier: ``"disk"`` (default: the passes are reused by later
            probes, in this process or another), ``"auto"``, ``"device"`` or ``"host"`` (reused
            while this process holds them).
        cache_dtype: the cache's storage dtype: ``fp32``, ``bf16``, ``fp16`` or ``int8``.
        cache_dir: folder of disk caches (default ``$FASTFT_CACHE_DIR`` or ``~/.cache/fastft``).
        extract_batch_size: batch size of the frozen passes.
        dataset_id: a name for the data's content, so the cache key need not read every
            sample (``":train"`` and ``":test"`` are appended); change it when the data change.
        device: where the heads train (default CUDA when available, else CPU); the backbones
            run where their parameters are.
        out: a folder to write the report into (JSON, CSV, Markdown, heatmap PNG).
        progress: progress bars (on a terminal) for the frozen passes and the heads.

    Returns:
        A :class:`~fastft.probing.ProbeReport`: one row per backbone × layer × head.
    """
    t_start = time.perf_counter()
    if not backbones:
        raise FastFTValueError("probe needs at least one backbone: {name: model}.")
    heads = [heads] if isinstance(heads, str) else list(heads)
    _check_grids(heads, lrs=lrs, weight_decays=weight_decays, Cs=Cs, ks=ks)
    if not temperature > 0:
        raise FastFTValueError(f"temperature must be positive (DINO's is 0.07); got {temperature}.")
    device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    build = dict(
        dtype=cache_dtype,
        tier=cache,
        pool="none",
        batch_size=extract_batch_size,
        cache_dir=cache_dir,
        progress=progress,
        seed=seed,
    )
    rows: list[ProbeRow] = []
    info: dict[str, dict] = {}
    split: Split | None = None
    for name, backbone in backbones.items():
        stack = TapStack(backbone, _taps_for(taps, name), pooling)
        train_cache, train_pass = _pass(stack, train, build, dataset_id, "train")
        test_cache, test_pass = _pass(stack, test, build, dataset_id, "test")
        if train_cache.fingerprint == test_cache.fingerprint:
            warnings.warn(
                f"the test data are the training data (backbone {name!r} gives both the same "
                "cache): the test accuracies are not measured on held-out rows; pass a separate "
                "test set.",
                UserWarning,
                stacklevel=2,
            )
        y_train = _class_labels(train_cache, "train")
        y_test = _class_labels(test_cache, "test")
        if split is None:
            split = make_split(y_train, val_fraction=val_fraction, seed=seed, shots=shots)
        num_classes = int(max(y_train.max(), y_test.max())) + 1
        x_train = _all_rows(train_cache, device)
        x_test = _all_rows(test_cache, device)
        layers = list(stack.tap_list)
        if concat_last:
            if not 1 <= concat_last <= len(layers):
                raise FastFTValueError(
                    f"concat_last={concat_last}, but backbone {name!r} has {len(layers)} taps."
                )
            last = layers[-concat_last:]
            joined = f"concat(last {concat_last})"
            x_train[joined] = torch.cat([x_train[t] for t in last], dim=1)
            x_test[joined] = torch.cat([x_test[t] for t in last], dim=1)
            layers.append(joined)
        fit_rows, val_rows = split.fit.to(device), split.val.to(device)
        y_dev = y_train.to(device)
        bar = tqdm(
            total=len(layers) * len(heads), desc=f"probe {name}", disable=not progress, unit="head"
        )
        t_heads = time.perf_counter()
        for layer in layers:
            feats = Features(
                x_train[layer][fit_rows],
                y_dev[fit_rows],
                x_train[layer][val_rows],
                y_dev[val_rows],
                x_test[layer],
                y_test.to(device),
                num_classes,
            )
            for head in heads:
                bar.set_postfix_str(f"{layer} {head}")
                result = _run_head(
                    head,
                    feats,
                    lrs=lrs,
                    weight_decays=weight_decays,
                    epochs=epochs,
                    batch_size=batch_size,
                    mlp_hidden=mlp_hidden,
                    Cs=Cs,
                    ks=ks,
                    temperature=temperature,
                    seed=seed,
                    device=device,
                )
                rows.append(
                    ProbeRow(
                        name,
                        layer,
                        result.head,
                        result.chosen,
                        result.val_accuracy,
                        result.test_accuracy,
                        result.seconds,
                        result.grid,
                    )
                )
                bar.update()
        bar.close()
        info[name] = {
            "taps": list(stack.tap_list),
            "pooling": pooling,
            "train_pass": train_pass,
            "test_pass": test_pass,
            "frozen_seconds": train_pass["seconds"] + test_pass["seconds"],
            "heads_seconds": time.perf_counter() - t_heads,
        }
    assert split is not None
    protocol = split.describe()
    protocol.update({"n_train": len(y_train), "n_test": len(y_test)})
    report = ProbeReport(rows, protocol, info, time.perf_counter() - t_start)
    if out is not None:
        report.write(out)
    return report


def _check_grids(heads: list[str], **grids: Sequence[float]) -> None:
    """Refuse unknown heads, and an empty grid that a chosen head would sweep."""
    unknown = [h for h in heads if h not in HEADS]
    if unknown or not heads:
        raise FastFTValueError(f"heads must be among {', '.join(HEADS)}; got {list(heads)}.")
    needs = {"linear": ("lrs", "weight_decays"), "mlp": ("lrs", "weight_decays")}
    needs.update(logreg=("Cs",), knn=("ks",))
    for head in heads:
        for grid in needs[head]:
            if not list(grids[grid]):
                raise FastFTValueError(
                    f"{grid} is empty, but the {head} heads sweep it; give it at least one "
                    f"value or leave {head!r} out of heads."
                )
    bad = [wd for wd in grids["weight_decays"] if not 0 <= float(wd) < math.inf]
    if bad and {"linear", "mlp"} & set(heads):
        raise FastFTValueError(f"weight decays must be finite and >= 0; got {bad}.")


def _class_labels(cache: FeatureCache, part: str) -> torch.Tensor:
    """The cache's labels as class indices; refuses what is not a class index."""
    y = cache.labels.reshape(-1).cpu()
    if y.is_floating_point() and not bool((y == y.round()).all()):
        raise FastFTValueError(
            f"the {part} labels are not whole numbers; probe classifies, so labels are class "
            "indices 0..C-1."
        )
    y = y.long()
    if len(y) and int(y.min()) < 0:
        raise FastFTValueError(
            f"the {part} labels include {int(y.min())}; labels are class indices 0..C-1 "
            "(map them first, e.g. with torch.unique(y, return_inverse=True))."
        )
    return y


def _taps_for(taps: Any, name: str) -> Any:
    if isinstance(taps, Mapping):
        if name not in taps:
            raise FastFTValueError(f"taps is a dict but names no taps for backbone {name!r}.")
        return taps[name]
    return taps


def _pass(
    stack: TapStack, data: Any, build: dict, dataset_id: str | None, part: str
) -> tuple[FeatureCache, dict]:
    """The cache of every tap over ``data`` (one frozen pass, or a hit), and what it cost."""
    t0 = time.perf_counter()
    cache = FeatureCache.build(
        stack, data, dataset_id=None if dataset_id is None else f"{dataset_id}:{part}", **build
    )
    return cache, {
        "seconds": time.perf_counter() - t0,
        "hit": bool(cache.telemetry.get("hit", False)),
        "prefix_seconds": float(cache.telemetry.get("prefix_seconds", 0.0)),  # in the backbone
        "reason": str(cache.telemetry.get("reason", "")),
        "fingerprint": cache.fingerprint,
        "tier": cache.tier,
        "rows": cache.num_rows,
    }


def _all_rows(cache: FeatureCache, device: torch.device) -> dict[str, torch.Tensor]:
    """Every row of every tap, as fp32 on ``device``."""
    cache.check_all()
    rows = torch.arange(cache.num_rows)
    return {t.name: x.to(device) for t, x in zip(cache.taps, cache.gather(rows))}


def _run_head(head: str, feats: Features, **s: Any) -> HeadResult:
    if head == "linear":
        return linear_heads(
            feats,
            lrs=s["lrs"],
            weight_decays=s["weight_decays"],
            epochs=s["epochs"],
            batch_size=s["batch_size"],
            seed=s["seed"],
            device=s["device"],
        )
    if head == "mlp":
        return linear_heads(
            feats,
            lrs=s["lrs"],
            weight_decays=list(s["weight_decays"])[:1],
            hidden=[s["mlp_hidden"]],
            epochs=s["epochs"],
            batch_size=s["batch_size"],
            seed=s["seed"],
            device=s["device"],
            name="mlp",
        )
    if head == "logreg":
        return logreg_head(feats, Cs=s["Cs"])
    return knn_head(feats, ks=s["ks"], temperature=s["temperature"])
