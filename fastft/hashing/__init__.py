"""Content hashes for cache keys: what objects and code compute with, by value.

- :mod:`~fastft.hashing.content`: :class:`ContentHasher` (values, objects, modules);
- :mod:`~fastft.hashing.code`: how functions, classes and the modules code reads are hashed;
- :mod:`~fastft.hashing.reads`: whose code is whose (library or user), and what code reads.
"""

from __future__ import annotations

from fastft.hashing._common import KEY_IGNORE
from fastft.hashing.content import ContentHasher, content_hash, first_difference, tensor_digest

__all__ = ["ContentHasher", "content_hash", "tensor_digest", "first_difference", "KEY_IGNORE"]
