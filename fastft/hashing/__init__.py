"""Content hashes for cache keys: what objects and code compute with, by value.

- :mod:`~fastft.hashing.content`: :class:`ContentHasher`: its state, output and dispatch;
- :mod:`~fastft.hashing.values`: how tensors, arrays and containers are hashed;
- :mod:`~fastft.hashing.objects`: how ``nn.Module`` objects and other objects are hashed;
- :mod:`~fastft.hashing.code`: how functions, classes and the modules code reads are hashed;
- :mod:`~fastft.hashing.reads`: whose code is whose (library or user), and what code reads.
"""

from __future__ import annotations

from fastft.hashing._common import KEY_IGNORE
from fastft.hashing.content import ContentHasher, content_hash, first_difference
from fastft.hashing.values import tensor_digest

__all__ = ["ContentHasher", "content_hash", "tensor_digest", "first_difference", "KEY_IGNORE"]
