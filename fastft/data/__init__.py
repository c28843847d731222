"""Dataset adapters: every accepted form of training data seen as batches of (inputs, labels).

fastft accepts ``(X, y)`` tensors (``X`` may be a dict of tensors, e.g. tokenizer output), any
map-style :class:`torch.utils.data.Dataset` returning ``(input, label)`` pairs, and a
:class:`torch.utils.data.DataLoader` (used as is). Inputs are a tensor or a dict of tensors
throughout; these helpers select, move and hash them without caring which.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterator, Mapping
from typing import Any

import numpy as np
import torch
from torch.utils.data import (
    DataLoader,
    Dataset,
    IterableDataset,
    SequentialSampler,
    default_collate,
)

from fastft.errors import DataError

Inputs = Any  # a tensor or a dict of tensors

__all__ = [
    "as_batches",
    "iter_range",
    "dataset_length",
    "batch_length",
    "index_select",
    "to_device",
    "sample_hash",
    "all_labels",
    "is_ordered",
]


# ---------------------------------------------------------------------------- shapes of data
def is_tensor_pair(data: Any) -> bool:
    """True for ``(X, y)``: X a tensor or a dict of tensors, y a tensor."""
    return (
        isinstance(data, (tuple, list))
        and len(data) == 2
        and isinstance(data[1], torch.Tensor)
        and (isinstance(data[0], torch.Tensor) or isinstance(data[0], Mapping))
    )


def batch_length(inputs: Inputs) -> int:
    """Number of samples in a batch of inputs (a tensor or a dict of tensors of equal length)."""
    if isinstance(inputs, torch.Tensor):
        if inputs.dim() == 0:
            raise DataError("inputs must have a batch dimension; got a 0-d tensor.")
        return int(inputs.shape[0])
    if isinstance(inputs, Mapping):
        if not inputs:
            raise DataError("inputs is an empty dict; it needs at least one tensor.")
        lengths = {}
        for key, value in inputs.items():
            if not isinstance(value, torch.Tensor):
                raise DataError(
                    f"inputs[{key!r}] is a {type(value).__name__}; dict inputs must hold tensors "
                    "only."
                )
            lengths[key] = int(value.shape[0]) if value.dim() else -1
        if len(set(lengths.values())) != 1:
            raise DataError(f"the tensors of the inputs dict have different lengths: {lengths}.")
        return next(iter(lengths.values()))
    raise DataError(f"inputs must be a tensor or a dict of tensors, got {type(inputs).__name__}.")


def _check_pair(data: tuple) -> int:
    X, y = data
    n, m = batch_length(X), int(y.shape[0]) if y.dim() else -1
    if n != m:
        raise DataError(f"X has {n} samples but y has {m}; they must have the same length.")
    if n == 0:
        raise DataError("the dataset is empty: X and y have no samples.")
    return n


def dataset_length(data: Any) -> int:
    """Number of samples in ``data`` ((X, y) tensors, a sized Dataset or a DataLoader).

    Raises DataError for an empty dataset, mismatched X/y lengths, or data whose length
    cannot be known (an IterableDataset without ``__len__``).
    """
    if is_tensor_pair(data):
        return _check_pair(data)
    if isinstance(data, DataLoader):
        try:
            n = len(data.dataset)
        except TypeError:
            raise DataError(
                "the DataLoader's dataset has no length; fastft needs to know the number of "
                "samples. Give the dataset a __len__ or pass a map-style Dataset or (X, y) tensors."
            ) from None
        if data.drop_last and data.batch_size:
            n = (n // data.batch_size) * data.batch_size
    elif isinstance(data, Dataset) or hasattr(data, "__getitem__") and hasattr(data, "__len__"):
        try:
            n = len(data)
        except TypeError:
            raise DataError(f"{type(data).__name__} has no length; give it a __len__.") from None
    else:
        raise DataError(
            f"unsupported data of type {type(data).__name__}: pass (X, y) tensors, a map-style "
            "Dataset returning (input, label), or a DataLoader."
        )
    if n == 0:
        raise DataError("the dataset is empty: there is nothing to run the model on.")
    return n


def is_ordered(data: Any) -> bool:
    """True when iterating ``data`` yields the same samples in the same order every time
    (False only for a DataLoader whose sampler shuffles)."""
    if isinstance(data, DataLoader):
        return isinstance(data.dataset, IterableDataset) or isinstance(
            data.sampler, SequentialSampler
        )
    return True


# ---------------------------------------------------------------------------- batches
def index_select(inputs: Inputs, idx: torch.Tensor) -> Inputs:
    """Rows ``idx`` of a tensor or of every tensor of a dict of tensors."""
    if isinstance(inputs, torch.Tensor):
        return inputs[idx]
    if isinstance(inputs, Mapping):
        return {k: v[idx] if isinstance(v, torch.Tensor) else v for k, v in inputs.items()}
    raise DataError(f"inputs must be a tensor or a dict of tensors, got {type(inputs).__name__}.")


def to_device(
    inputs: Inputs, device: torch.device | str | None, non_blocking: bool | None = None
) -> Inputs:
    """``inputs`` (tensor, dict, or list/tuple of those) moved to ``device``; no copy when
    already there. Pinned host tensors move asynchronously unless ``non_blocking=False``."""
    if device is None:
        return inputs
    if isinstance(inputs, torch.Tensor):
        return inputs.to(
            device, non_blocking=inputs.is_pinned() if non_blocking is None else non_blocking
        )
    if isinstance(inputs, Mapping):
        return {k: to_device(v, device, non_blocking) for k, v in inputs.items()}
    if isinstance(inputs, (tuple, list)):
        return type(inputs)(to_device(v, device, non_blocking) for v in inputs)
    return inputs


def as_pair(batch: Any, where: str) -> tuple[Inputs, torch.Tensor]:
    """A batch checked to be ``(inputs, labels)``, labels made a tensor. A dict batch with one
    ``label`` or ``labels`` entry (a Hugging Face data collator's) is split into the two."""
    if isinstance(batch, Mapping):
        keys = [k for k in ("label", "labels") if k in batch]
        if len(keys) == 1:
            batch = ({k: v for k, v in batch.items() if k != keys[0]}, batch[keys[0]])
    if not (isinstance(batch, (tuple, list)) and len(batch) == 2):
        raise DataError(
            f"{where} must yield (input, label) pairs; got {type(batch).__name__}"
            + (f" of length {len(batch)}" if isinstance(batch, (tuple, list)) else "")
            + ". Wrap your dataset so each item is (input, label)."
        )
    inputs, labels = batch
    if not isinstance(labels, torch.Tensor):
        try:
            labels = torch.as_tensor(labels)
        except Exception as exc:
            raise DataError(
                f"{where}: labels of type {type(labels).__name__} cannot become a tensor."
            ) from exc
    batch_length(inputs)  # validates tensor-or-dict
    return inputs, labels


def collate(items: list) -> tuple[Inputs, torch.Tensor]:
    """Stack ``(input, label)`` items (inputs tensors or dicts of tensors) into one batch."""
    for item in items[:1]:
        if not (isinstance(item, (tuple, list)) and len(item) == 2):
            as_pair(item, "the dataset")
    try:
        return default_collate(items)
    except Exception as exc:
        raise DataError(f"could not stack dataset items into a batch: {exc}") from exc


def as_batches(
    data: Any, batch_size: int, *, num_workers: int = 0, shuffle: bool = False
) -> Iterator[tuple[Inputs, torch.Tensor]]:
    """Iterate ``data`` as ``(inputs, labels)`` batches of at most ``batch_size`` samples.

    - ``(X, y)`` tensors (``X`` a tensor or dict of tensors): slices (views, no copy) in
      order, or ``randperm`` batches with ``shuffle=True``; ``num_workers`` is not needed.
    - a map-style ``Dataset`` of ``(input, label)`` items: a DataLoader with ``num_workers``
      workers that stacks tensors and dicts of tensors.
    - a ``DataLoader``: used as is (its own batch size, order and workers).

    Raises DataError for an empty dataset, mismatched lengths, or items that are not pairs.
    """
    if batch_size < 1:
        raise DataError(f"batch_size must be >= 1, got {batch_size}.")
    if is_tensor_pair(data):
        n = _check_pair(data)
        X, y = data
        order = torch.randperm(n) if shuffle else None
        for start in range(0, n, batch_size):
            if order is None:
                sl = slice(start, min(start + batch_size, n))
                yield (
                    (X[sl] if isinstance(X, torch.Tensor) else {k: v[sl] for k, v in X.items()}),
                    y[sl],
                )
            else:
                idx = order[start : start + batch_size]
                yield index_select(X, idx), y[idx]
        return
    if isinstance(data, DataLoader):
        loader = data
    else:
        dataset_length(data)  # DataError when empty or unsized
        loader = DataLoader(
            data,
            batch_size=batch_size,
            shuffle=shuffle,
            num_workers=num_workers,
            collate_fn=collate,
        )
    for batch in loader:
        yield as_pair(batch, "the DataLoader" if loader is data else "the dataset")


def iter_range(
    data: Any, start: int, end: int, batch_size: int, *, num_workers: int = 0
) -> Iterator[tuple[Inputs, torch.Tensor]]:
    """Batches of samples ``start..end-1`` in dataset order, as ``(inputs, labels)``
    (a DataLoader is read through its dataset, with its collate function and workers)."""
    if is_tensor_pair(data):
        X, y = data
        for s in range(start, end, batch_size):
            sl = slice(s, min(s + batch_size, end))
            yield (
                (X[sl] if isinstance(X, torch.Tensor) else {k: v[sl] for k, v in X.items()}),
                y[sl],
            )
        return
    loader_fn = collate
    dataset = data
    if isinstance(data, DataLoader):
        dataset, loader_fn, num_workers = data.dataset, data.collate_fn, data.num_workers
    batches = [list(range(s, min(s + batch_size, end))) for s in range(start, end, batch_size)]
    # A DataLoader draws its workers' base seed from the global generator unless given its
    # own: reading a dataset in order must not change the user's random stream (dropout
    # masks of the training that follows would differ from a run without fastft).
    quiet_rng = torch.Generator().manual_seed(0)
    for batch in DataLoader(
        dataset,
        batch_sampler=batches,
        num_workers=num_workers,
        collate_fn=loader_fn,
        generator=quiet_rng,
    ):
        yield as_pair(batch, "the dataset")


def all_labels(data: Any, batch_size: int = 1024) -> torch.Tensor:
    """Every label of ``data``, in dataset order."""
    if is_tensor_pair(data):
        return data[1]
    return torch.cat([y for _, y in iter_range(data, 0, dataset_length(data), batch_size)])


# ---------------------------------------------------------------------------- content hash
def tensor_digest(t: torch.Tensor) -> bytes:
    """sha256 of a tensor's dtype, shape and bytes.

    Not memoised on purpose: a change made through ``tensor.data`` does not bump the
    version counter, so a memo could return the hash of old content and reuse a stale
    cache. Hashing runs at about 2 GB/s.
    """
    h = hashlib.sha256(f"{t.dtype}|{tuple(t.shape)}|".encode())
    flat = t.detach().reshape(-1)
    if flat.numel():
        data = flat.cpu().contiguous().view(torch.uint8).numpy()
        h.update(memoryview(data))
    return h.digest()


def _update(h: hashlib._Hash, obj: Any) -> None:
    """Feed a sample (tensors, arrays, numbers, strings, containers) into ``h``."""
    if isinstance(obj, torch.Tensor):
        h.update(b"T" + tensor_digest(obj))
    elif isinstance(obj, np.ndarray):
        h.update(f"A{obj.dtype}{obj.shape}".encode() + np.ascontiguousarray(obj).tobytes())
    elif isinstance(obj, Mapping):
        h.update(b"{")
        for key in sorted(obj, key=str):
            h.update(repr(key).encode())
            _update(h, obj[key])
        h.update(b"}")
    elif isinstance(obj, (tuple, list)):
        h.update(f"[{len(obj)}".encode())
        for item in obj:
            _update(h, item)
    elif isinstance(obj, (bytes, bytearray)):
        h.update(b"B" + bytes(obj))
    else:  # numbers, strings, None; objects with tobytes() (PIL images) by their bytes too
        h.update(("O" + type(obj).__name__ + repr(obj)).encode())
        tobytes = getattr(obj, "tobytes", None)
        if callable(tobytes):
            h.update(tobytes())


def sample_hash(data: Any) -> str:
    """Content hash (hex) of every sample and label in ``data``, for cache fingerprints.

    Cost: for ``(X, y)`` tensors, one sha256 pass over their bytes (about 2 GB/s). For a
    Dataset, every item is loaded once (``dataset[i]``) and hashed, so it costs a full pass of
    data loading; for a DataLoader the hash is over its dataset's items (whatever its
    sampler's order), or over its batches when the dataset is iterable. Pass ``dataset_id=``
    to the cache to skip this pass.
    """
    h = hashlib.sha256()
    if is_tensor_pair(data):
        _check_pair(data)
        _update(h, list(data))
        return h.hexdigest()
    n = dataset_length(data)
    source = (
        data.dataset
        if isinstance(data, DataLoader) and not isinstance(data.dataset, IterableDataset)
        else data
    )
    h.update(f"n={n}".encode())
    if isinstance(source, DataLoader):
        for batch in source:
            _update(h, batch)
    else:
        for i in range(len(source)):
            _update(h, source[i])
    return h.hexdigest()
