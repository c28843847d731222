"""A Hugging Face ``datasets.Dataset`` as a map-style dataset of ``(inputs, label)`` items.

Recognised by its shape, not imported: an object with ``column_names``, ``features`` and
``with_format`` (the ``datasets`` library need not be installed for fastft). One column holds
the labels (``label`` or ``labels``); the inputs are the other columns whose values are
numbers or arrays of numbers (token ids, masks, pixel values), as a dict of tensors; text
columns and other non-numeric columns are left out, as the model cannot take them. Torch
format or not, the values become tensors. Sequences must have one length per column across
a batch: pad when tokenizing (``padding="max_length"``), or pass a ``DataLoader`` whose
``collate_fn`` pads (``DataCollatorWithPadding``; a batch that is a dict with a ``labels``
entry is split into inputs and labels).
"""

from __future__ import annotations

import numbers
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import torch
from torch.utils.data import Dataset

from fastft.errors import DataError

__all__ = ["HFDataset", "is_hf_dataset", "LABEL_KEYS"]

#: Names of the label column, in the order they are looked for.
LABEL_KEYS = ("label", "labels")


def is_hf_dataset(data: Any) -> bool:
    """Whether ``data`` looks like a ``datasets.Dataset`` (duck-typed)."""
    return (
        not isinstance(data, Dataset)
        and hasattr(data, "column_names")
        and hasattr(data, "features")
        and callable(getattr(data, "with_format", None))
        and hasattr(data, "__getitem__")
        and hasattr(data, "__len__")
    )


def _numeric(value: Any) -> bool:
    if isinstance(value, torch.Tensor):
        return not value.is_complex()
    if isinstance(value, np.ndarray):
        return value.dtype.kind in "biuf"
    if isinstance(value, bool | numbers.Number):
        return True
    if isinstance(value, Sequence) and not isinstance(value, str | bytes):
        return len(value) > 0 and all(_numeric(v) for v in value[:4])
    return False


def _tensor(value: Any) -> torch.Tensor:
    return value if isinstance(value, torch.Tensor) else torch.as_tensor(np.asarray(value))


class HFDataset(Dataset):
    """``(dict of input tensors, label tensor)`` items of a ``datasets.Dataset``."""

    def __init__(self, data: Any):
        self.data = data
        columns = list(data.column_names)
        labels = [k for k in LABEL_KEYS if k in columns]
        if not labels:
            raise DataError(
                f"the Hugging Face dataset has no 'label' or 'labels' column (columns: "
                f"{', '.join(columns)}); rename the label column to 'label'."
            )
        self.label = labels[0]
        if len(data) == 0:
            raise DataError("the Hugging Face dataset is empty: there is nothing to run on.")
        first = data[0]
        self.inputs = [k for k in columns if k not in LABEL_KEYS and _numeric(first.get(k))]
        if not self.inputs:
            raise DataError(
                "the Hugging Face dataset has no numeric input column besides the labels "
                f"(columns: {', '.join(columns)}); tokenize the text first (dataset.map with a "
                "tokenizer) so that input_ids and attention_mask are columns."
            )

    def __len__(self) -> int:
        return len(self.data)

    def _item(self, row: Mapping) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
        return {k: _tensor(row[k]) for k in self.inputs}, _tensor(row[self.label])

    def __getitem__(self, i: int) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
        return self._item(self.data[int(i)])

    def __getitems__(self, rows: list[int]) -> list[tuple[dict[str, torch.Tensor], torch.Tensor]]:
        # One columnar read per batch (datasets reads Arrow in column chunks).
        batch = self.data[[int(i) for i in rows]]
        items = [
            self._item({k: batch[k][j] for k in (*self.inputs, self.label)})
            for j in range(len(rows))
        ]
        for k in self.inputs:
            shapes = {tuple(x[k].shape) for x, _ in items}
            if len(shapes) > 1:
                raise DataError(
                    f"column {k!r} of the Hugging Face dataset has rows of different shapes "
                    f"({', '.join(map(str, sorted(shapes)[:3]))}) in one batch: pad when "
                    "tokenizing (padding='max_length'), or pass a DataLoader whose collate_fn "
                    "pads (transformers.DataCollatorWithPadding)."
                )
        return items
