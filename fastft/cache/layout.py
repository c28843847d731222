"""The layout of a cache: storage dtypes and their names, tiers, the taps, and the tensors that
hold cached rows.

A tap's rows live in one contiguous ``[R, D]`` tensor (R = samples × views) in the storage
dtype, plus ``scales[R]`` (float32) for int8. The tensor sits in accelerator memory
(``device`` tier), host memory (``host``, pinned when CUDA is in use) or a memory-mapped
file (``disk``, see :mod:`fastft.cache.disk`); the ops read and write all three alike.
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass

import torch

from fastft.errors import CacheCorruptError, CacheTooLargeError, FastFTValueError

# ---------------------------------------------------------------------------- dtypes
#: Storage dtype names and their torch dtypes.
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16, "int8": torch.int8}
_ALIASES = {
    "float32": "fp32",
    "float": "fp32",
    "bfloat16": "bf16",
    "float16": "fp16",
    "half": "fp16",
}
TIERS = ("auto", "device", "host", "disk")

#: Share of the currently free memory that ``tier="auto"`` may use when no ``max_memory`` is given
#: (the rest stays for the model, the tail's training and the rest of the system).
AUTO_FRACTION = 0.5


def dtype_name(dtype: str | torch.dtype) -> str:
    """Canonical name (fp32, bf16, fp16, int8) of a storage dtype given by name or torch dtype."""
    if isinstance(dtype, torch.dtype):
        for name, value in DTYPES.items():
            if value == dtype:
                return name
    else:
        name = _ALIASES.get(str(dtype).lower(), str(dtype).lower())
        if name in DTYPES:
            return name
    raise FastFTValueError(f"unknown cache dtype {dtype!r}; use one of {', '.join(DTYPES)}.")


def dtype_str(dtype: torch.dtype) -> str:
    """A torch dtype's name in manifests: ``float32``, ``int64``."""
    return str(dtype).removeprefix("torch.")


#: Every dtype a manifest may name, by name: read from this table, never looked up on the
#: torch module with a string taken from a file.
_TORCH_DTYPES = {
    str(v).removeprefix("torch."): v for v in vars(torch).values() if isinstance(v, torch.dtype)
}


def str_dtype(name: str) -> torch.dtype:
    """The torch dtype a manifest names (looked up in a table, never on the torch module)."""
    dtype = _TORCH_DTYPES.get(name) if isinstance(name, str) else None
    if dtype is None:
        raise CacheCorruptError(f"the manifest names an unknown dtype {name!r}.")
    return dtype


def row_bytes(dim: int, dtype: torch.dtype) -> int:
    """Bytes one cached row takes (its scale included for int8)."""
    return dim * torch.empty((), dtype=dtype).element_size() + (4 if dtype == torch.int8 else 0)


_UNITS = {
    "": 1,
    "b": 1,
    "k": 1e3,
    "kb": 1e3,
    "m": 1e6,
    "mb": 1e6,
    "g": 1e9,
    "gb": 1e9,
    "kib": 2**10,
    "mib": 2**20,
    "gib": 2**30,
    "t": 1e12,
    "tb": 1e12,
    "tib": 2**40,
}


def parse_bytes(size: int | float | str | None) -> int | None:
    """``max_memory`` as bytes: a number, or a string like ``"512MB"`` / ``"2GiB"``."""
    if size is None or isinstance(size, (int, float)):
        return None if size is None else int(size)
    match = re.fullmatch(r"\s*(\d+(?:\.\d*)?|\.\d+)\s*([a-zA-Z]*)\s*", size)
    if not match or match.group(2).lower() not in _UNITS:
        raise FastFTValueError(
            f"cannot read max_memory={size!r}; use bytes or e.g. '512MB', '2GiB'."
        )
    return int(float(match.group(1)) * _UNITS[match.group(2).lower()])


def free_host_memory() -> int:
    """Bytes of host memory available now (MemAvailable on Linux)."""
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")


def pinned_reserve(nbytes: int) -> int:
    """Bytes torch's pinned host allocator (CachingHostAllocator) reserves for one
    ``nbytes`` allocation: the size rounded up to the next power of two (0 for 0)."""
    return 0 if nbytes <= 0 else 1 << (int(nbytes) - 1).bit_length()


def pinned_overhead(rows: int, taps: list[TapInfo]) -> int:
    """Extra bytes the pinned host tier takes over the rows' size: each tap's data and
    scales are pinned allocations of their own (see :func:`allocate`), each rounded up to a
    power of two, so up to twice the exact size."""
    extra = 0
    for t in taps:
        sizes = [rows * t.dim * torch.empty((), dtype=t.dtype).element_size()]
        sizes += [rows * 4] if t.dtype == torch.int8 else []
        extra += sum(pinned_reserve(n) - n for n in sizes)
    return extra


def choose_tier(
    tier: str,
    nbytes: int,
    device: torch.device,
    max_memory: int | None,
    dtype: torch.dtype | None = None,
    pin_extra: int = 0,
) -> str:
    """The tier a cache of ``nbytes`` goes to: ``tier`` itself unless it is ``auto``, which
    picks the fastest tier that fits ``max_memory`` (default: a share of free memory).
    ``dtype`` (the storage dtype) lets a refusal name the sizes in smaller dtypes.
    ``pin_extra`` (:func:`pinned_overhead`) is what the host tier takes beyond ``nbytes``
    when it is pinned (a CUDA ``device``): the budget counts the memory really reserved."""
    if tier not in TIERS:
        raise FastFTValueError(f"unknown cache tier {tier!r}; use one of {', '.join(TIERS)}.")
    host_nbytes = nbytes + (pin_extra if device.type == "cuda" else 0)
    if tier in ("device", "host"):
        _check_fits(tier, host_nbytes if tier == "host" else nbytes, device, max_memory, dtype)
    if tier != "auto":
        return tier
    if device.type == "cuda":
        budget = (  # pragma: cuda
            max_memory
            if max_memory is not None
            else int(torch.cuda.mem_get_info(device)[0] * AUTO_FRACTION)
        )
        if nbytes <= budget:
            return "device"  # pragma: cuda
    budget = max_memory if max_memory is not None else int(free_host_memory() * AUTO_FRACTION)
    return "host" if host_nbytes <= budget else "disk"


def format_gib(nbytes: float) -> str:
    """``nbytes`` in GiB with three significant digits (``'1.5 GiB'``; ``'0.000123 GiB'`` for a
    small cache, which two fixed decimals would call ``0.00 GiB``)."""
    gib = nbytes / 2**30
    return f"{gib:.3g} GiB" if gib >= 1e-3 else f"{gib:.6f} GiB"


def _smaller_dtypes(nbytes: int, dtype: torch.dtype | None) -> str:
    """The cache_dtype option of a refusal: the dtypes smaller than ``dtype`` with the size
    they give."""
    widths = {"fp32": 4, "bf16": 2, "fp16": 2, "int8": 1}  # int8 rows also carry a 4-byte scale
    if dtype is None:
        return "a smaller cache_dtype (fp16/bf16 store 2 bytes a value, int8 1, fp32 4)"
    current = widths[dtype_name(dtype)]
    options = [(name, w) for name, w in widths.items() if w < current and name != "bf16"]
    if not options:
        return "no smaller cache_dtype (int8 is the smallest)"
    sizes = ", ".join(f"{name} about {format_gib(nbytes * w / current)}" for name, w in options)
    return f"a smaller cache_dtype ({sizes})"


def _check_fits(
    tier: str,
    nbytes: int,
    device: torch.device,
    max_memory: int | None,
    dtype: torch.dtype | None = None,
) -> None:
    """Refuse an in-memory cache larger than ``max_memory`` (or than the memory free now)
    before any work is done, naming its size and what would fit."""
    if tier == "device" and device.type == "cuda":
        free, where = torch.cuda.mem_get_info(device)[0], f"free memory on {device}"  # pragma: cuda
    else:
        free, where = free_host_memory(), "free host memory"
    budget, what = (max_memory, "max_memory") if max_memory is not None else (free, where)
    if nbytes <= budget:
        return
    raise CacheTooLargeError(
        f"the cache needs {format_gib(nbytes)} in the {tier} tier ({int(nbytes):,} bytes) but "
        f"{what} is {format_gib(budget)} ({int(budget):,} bytes). Options: cache='disk' "
        "(memory-mapped; any size the disk holds), cache='auto' (picks what fits), "
        f"{_smaller_dtypes(nbytes, dtype)}, or fewer samples/views; a cut at a block's input "
        "caches whole sequences/feature maps, so unfreezing fewer blocks also helps."
    )


@dataclass
class TapStorage:
    """Rows of one tap: ``data[R, D]`` in the storage dtype and ``scales[R]`` (empty unless
    int8)."""

    data: torch.Tensor
    scales: torch.Tensor

    @property
    def nbytes(self) -> int:
        return self.data.numel() * self.data.element_size() + self.scales.numel() * 4


def allocate(
    rows: int, dim: int, dtype: torch.dtype, device: torch.device, pin: bool
) -> TapStorage:
    """Zeroed in-memory storage for ``rows`` rows of ``dim`` features."""
    data = torch.zeros((rows, dim), dtype=dtype, device=device, pin_memory=pin)
    n_scales = rows if dtype == torch.int8 else 0
    scales = torch.zeros(n_scales, dtype=torch.float32, device=device, pin_memory=pin)
    return TapStorage(data, scales)


def memory_device(tier: str, device: torch.device) -> tuple[torch.device, bool]:
    """(where the storage of an in-memory tier lives, whether it is pinned)."""
    if tier == "device":
        return device, False
    return torch.device("cpu"), device.type == "cuda"


# ---------------------------------------------------------------------------- taps
@dataclass(frozen=True)
class TapInfo:
    """One cached frontier activation (a tap), as ``cache.taps`` lists them.

    Attributes:
        name: the tap's name (the frontier node or module it comes from).
        dim: the row width D.
        shape: the per-sample shape the tail expects (the activation's own shape with
            ``pool='none'``, ``(D,)`` otherwise).
        dtype: the storage dtype.
        pool: how its positions were reduced (``none``, ``mean``, ...).
        source_dtype: set for a non-float tap (an attention mask, token ids the tail needs):
            stored exactly in fp32 whatever the cache dtype and gathered back in this dtype
            (default None).
    """

    name: str
    dim: int
    shape: tuple[int, ...]
    dtype: torch.dtype
    pool: str
    source_dtype: torch.dtype | None = None

    def to_json(self) -> dict:
        """The tap as a manifest records it (:meth:`from_json` reads it back)."""
        d = {
            "name": self.name,
            "dim": self.dim,
            "shape": list(self.shape),
            "dtype": dtype_str(self.dtype),
            "pool": self.pool,
        }
        if self.source_dtype is not None:
            d["source_dtype"] = str(self.source_dtype).removeprefix("torch.")
        return d

    @classmethod
    def from_json(cls, d: dict) -> TapInfo:
        """The tap a manifest records.

        Args:
            d: a dict :meth:`to_json` wrote.
        """
        source = d.get("source_dtype")
        return cls(
            d["name"],
            int(d["dim"]),
            tuple(d["shape"]),
            str_dtype(d["dtype"]),
            d["pool"],
            None if source is None else exact_dtype(source),
        )


def exact_dtype(name: str) -> torch.dtype:
    """The integer or bool dtype a manifest names for a non-float tap."""
    dtype = _TORCH_DTYPES.get(name) if isinstance(name, str) else None
    if dtype is None or dtype.is_floating_point:
        raise CacheCorruptError(
            f"the manifest names an unknown source dtype {name!r} for a non-float tap."
        )
    return dtype
