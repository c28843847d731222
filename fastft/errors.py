"""Exceptions raised by fastft.

Every error fastft raises on purpose is a :class:`FastFTError`, so callers can catch the
whole family with one ``except``. The subclasses also derive from the matching builtin
(``ValueError``, ``IndexError``, ...) so code written against plain PyTorch keeps working.
Messages say what went wrong *and* what to do about it.
"""

from __future__ import annotations


class FastFTError(Exception):
    """Base class of every error fastft raises deliberately."""


class FastFTValueError(FastFTError, ValueError):
    """An argument has the wrong value, dtype or shape."""


class FastFTIndexError(FastFTError, IndexError):
    """A row or sample index is out of range (or repeated where it must be unique)."""


class CallFormError(FastFTError, TypeError):
    """A public function was called in a form it no longer takes (settings passed by position);
    the message names the keyword form to use."""


class NativeUnavailableError(FastFTError, RuntimeError):
    """A native kernel was requested explicitly but ``fastft._C`` is not usable."""


class NativeMismatchError(NativeUnavailableError):
    """``fastft._C`` was built from other sources than this Python code (its codes differ)."""


class SurgeryError(FastFTError, ValueError):
    """A layer-surgery request cannot be carried out (unknown name, shapes that no longer fit)."""


class SplitError(FastFTError, RuntimeError):
    """The edited model cannot be split into a frozen prefix and a trainable tail."""


class DataError(FastFTError, ValueError):
    """A dataset, label or input is unusable (empty, wrong dtype, NaN features, ...)."""


class CacheError(FastFTError, RuntimeError):
    """A feature cache cannot be built, opened or read."""


class CacheCorruptError(CacheError):
    """A cache on disk failed a size or checksum check; it is never read as features."""


class CacheLockedError(CacheError):
    """Another process holds the build lock of this cache for longer than we may wait."""


class CacheTooLargeError(CacheError, MemoryError):
    """An in-memory cache would not fit the memory allowed; the message names the options."""


class NotFittedError(FastFTError, RuntimeError):
    """A trained head is needed (predict, evaluate, export) but ``fit`` has not run."""


class CacheReuseWarning(UserWarning):
    """A feature cache's key cannot see everything that determines its features, so the cache
    is used once and never reused; the message says what was not seen and how to get reuse."""


__all__ = [
    "FastFTError",
    "FastFTValueError",
    "FastFTIndexError",
    "CallFormError",
    "NativeUnavailableError",
    "NativeMismatchError",
    "SurgeryError",
    "SplitError",
    "DataError",
    "CacheError",
    "CacheCorruptError",
    "CacheLockedError",
    "CacheTooLargeError",
    "NotFittedError",
    "CacheReuseWarning",
]
