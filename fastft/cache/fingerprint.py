"""The content address of a feature cache: what a cache hit promises.

A hit means the cached features equal what the frozen prefix would compute now. The key is
therefore recomputed at every build from everything that determines the features, each
part hashed on its own and kept in the manifest so that fastft can say *which* part changed:

==========  ===================================================================================
part        what it covers
==========  ===================================================================================
format      the cache format version
structure   the cut: split method, graph code (fx) or cut module (hooks), tap names
modules     every frozen module by value: class and its code (the user's by bytecode, libraries
            by name and version), every attribute (hyper-parameters, plain tensors, configs),
            forward hooks, parameter and buffer names and shapes; the trainable modules after
            the cut are left out (training them does not change the features)
weights     the content of every frozen parameter and buffer
dataset     the samples: every input and label by content (for a DataLoader, its sampler's
            samples after its collate function), or ``dataset_id``
sample      (a map-style Dataset or DataLoader without ``dataset_id``) the length and a few
            samples: a cheap key that finds the caches the data may have; when there is none
            the data are hashed while the cache is built (one read of each sample), else one
            hashing pass decides (a hit reads each sample once and runs no prefix)
transform   the transform by value (as modules), the seed and the batch size it is applied to
views       the number of augmented views
dtype       the storage dtype (and bf16 autocast of the prefix)
numerics    the kind of device the prefix runs on and torch's global numeric settings: default
            dtype, float32 matmul precision, TF32 and reduced-precision flags, deterministic
            algorithms
pool        the pooling (and the mask key of ``masked_mean``)
==========  ===================================================================================

What the key cannot see soundly (an open file, a transform that calls ``open()``, an object
without readable state) makes the key *opaque*: the cache is built for this use only and
never reused, with one warning that says how to get reuse (``transform_id=``,
``dataset_id=``, or making the model's attribute hashable). See
:mod:`fastft.hashing` for how objects are hashed.
"""

from __future__ import annotations

import hashlib
import inspect
import re
import uuid
import warnings
from collections.abc import Callable
from dataclasses import dataclass, field

import torch
from torch import nn

from fastft.cache.disk import FORMAT_VERSION
from fastft.data.source_base import Source
from fastft.errors import CacheError, CacheReuseWarning, FastFTValueError
from fastft.hashing import ContentHasher, first_difference

#: The parts of a fingerprint, in the order they are reported when they change.
PARTS = (
    "format",
    "structure",
    "modules",
    "weights",
    "dataset",
    "transform",
    "views",
    "dtype",
    "numerics",
    "pool",
)

#: How each part is named when it changed ("rebuilt: the frozen weights changed").
PART_NAMES = {
    "format": "the cache format",
    "structure": "the cut (split method, graph or cut module, taps)",
    "modules": "the frozen modules' code or attributes",
    "weights": "the frozen weights",
    "dataset": "the data",
    "transform": "the transform (its code, state, seed or batch size)",
    "views": "the number of views",
    "dtype": "the storage dtype or the frozen pass's precision (extract_amp)",
    "numerics": (
        "the device kind or torch's numeric settings (default dtype, matmul precision, TF32, "
        "deterministic algorithms) or length-aware batching"
    ),
    "pool": "the pooling",
}

_ADDRESS = re.compile(r" at 0x[0-9a-fA-F]+")


def _sha(text: str | bytes) -> str:
    return hashlib.sha256(text if isinstance(text, bytes) else text.encode()).hexdigest()


@dataclass
class CacheKey:
    """The key of one build: its parts, the fingerprint they give, what could not be seen
    (``opaque``: then the fingerprint is unique to this build and never reused) and the
    data's labels when reading the key gave them (a reused cache must hold the same)."""

    parts: dict[str, str]
    opaque: list[str] = field(default_factory=list)
    labels: torch.Tensor | None = None
    fingerprint: str = ""
    trace: list = field(
        default_factory=list, repr=False
    )  # of the prefix's modules, see warn_if_self_changing
    transform_digest: str = ""  # the transform as hashed, see warn_if_transform_changed
    #: The data's part is not computed yet (a single-pass build: see :func:`make_key`); the
    #: fingerprint is then only a name for the build, and :func:`lookup` finds the caches it
    #: may be.
    pending: bool = False

    def __post_init__(self) -> None:
        if not self.reusable and "once" not in self.parts:
            self.parts["once"] = uuid.uuid4().hex  # a fingerprint no later build can have
        if not self.fingerprint:
            self.fingerprint = combine(self.parts)

    @property
    def reusable(self) -> bool:
        return not self.opaque


def structure_key(prefix: nn.Module) -> str:
    """The prefix's graph, structure and cut: its ``signature()`` when it has one (a split's
    prefix), else nothing more than "a module" (the modules part covers what it is made of)."""
    # Only fastft's own prefixes are asked (a user's module may have anything called signature).
    text = str(prefix.signature()) if getattr(type(prefix), "_fastft_prefix", False) else "a module"
    return _sha(_ADDRESS.sub("", text))


def prefix_parts(prefix: nn.Module) -> tuple[dict[str, str], list[str], list]:
    """``({structure, modules, weights}, opaque, trace)`` of a frozen prefix, read now.

    A prefix that knows which modules of its model run only after its cut (a
    :class:`~fastft.FrozenPrefix`: ``key_mask()``) leaves them out."""
    hasher = _prefix_hasher(prefix, weights="apart")
    return (
        {
            "structure": structure_key(prefix),
            "modules": hasher.hexdigest(),
            "weights": hasher.weights_hexdigest(),
        },
        hasher.opaque,
        hasher.trace,
    )


def _prefix_hasher(prefix: nn.Module, weights: str) -> ContentHasher:
    """The prefix hashed by value (it runs in eval mode; what runs after its cut left out),
    with torch's global module hooks, which every module calls."""
    mask = prefix.key_mask() if getattr(type(prefix), "_fastft_prefix", False) else ((), ())
    hasher = ContentHasher(
        mask_modules=mask[0], mask_params=mask[1], weights=weights, eval_mode=True, trace=True
    )
    hasher.update(prefix, "the frozen model")
    module_hooks = torch.nn.modules.module
    global_hooks = [
        list(getattr(module_hooks, name, {}).values())
        for name in ("_global_forward_pre_hooks", "_global_forward_hooks")
    ]
    if any(global_hooks):
        hasher.update(global_hooks, "torch's global module hooks")
    return hasher


def numerics(device: torch.device | str = "cpu") -> str:
    """What changes a forward's bits beyond the objects: the kind of device it runs on and
    torch's global numeric settings."""
    settings = {
        "device": torch.device(device).type,
        "default_dtype": torch.get_default_dtype(),
        "matmul": torch.get_float32_matmul_precision(),
        "deterministic": torch.are_deterministic_algorithms_enabled(),
        "mkldnn": torch.backends.mkldnn.enabled,
    }
    cuda = torch.backends.cuda.matmul
    for flag in (
        "allow_tf32",
        "allow_fp16_reduced_precision_reduction",
        "allow_bf16_reduced_precision_reduction",
    ):
        settings[f"cuda.{flag}"] = getattr(cuda, flag, None)
    settings["cudnn.allow_tf32"] = torch.backends.cudnn.allow_tf32
    return ",".join(f"{k}={v}" for k, v in settings.items())


def warn_if_self_changing(prefix: nn.Module, key: CacheKey) -> None:
    """After a build: warn when running the prefix changed its own modules (a call counter, an
    attention map kept on ``self``): the next build's key differs, so the cache is never reused."""
    # Attributes only (a module that changed its weights in eval mode would be rarer still):
    # one walk without reading the weights again.
    hasher = _prefix_hasher(prefix, weights="layout")
    if hasher.hexdigest() == key.parts["modules"]:
        return
    where = first_difference(key.trace, hasher.trace) or "an attribute"
    owner, _, attr = where.rpartition(".")
    warnings.warn(
        f"fastft: running the frozen layers changed {where!r}, so the next build's key will differ "
        "and this cache will not be reused. If that attribute does not change what the module "
        "computes (a counter, an output kept for display), list it on its module: "
        f"fastft_key_ignore = ({attr!r},); else keep such state outside the frozen layers.",
        CacheReuseWarning,
        stacklevel=4,
    )


def transform_part(
    transform: Callable | None, transform_id: str | None, seed: int, batch_size: int
) -> tuple[str, list[str], str]:
    """``(part, opaque, digest)`` of a transform: by value, with the seed its randomness is
    drawn from and the batch size it is applied to (a per-batch transform's output depends on
    it). ``transform_id`` vouches for what fastft cannot see in it (its opaque parts)."""
    if transform is None:
        if transform_id is not None:
            raise FastFTValueError("transform_id= names a transform, but no transform= was given.")
        return "none", [], ""
    hasher = ContentHasher().update(transform, "the transform")
    named = "" if transform_id is None else f"id:{transform_id}|"
    opaque = [] if transform_id is not None else hasher.opaque
    return f"{named}{hasher.hexdigest()},seed={seed},batch={batch_size}", opaque, hasher.hexdigest()


def dataset_part(
    source: Source, dataset_id: str | None, batch_size: int = 256, num_workers: int = 0
) -> tuple[str, torch.Tensor | None, list[str]]:
    """``(part, labels, opaque)`` of the data: every sample by content (one read of the data),
    or ``dataset_id`` (no read; the labels of ``(X, y)`` tensors still count, they are at hand)."""
    if dataset_id is not None:
        text, labels = f"id:{dataset_id}:n={source.n}", getattr(source, "y", None)
        if labels is not None:
            text += ":labels=" + ContentHasher().update(labels).hexdigest()
        return _sha(text), labels, []
    found = source.content_key(batch_size, num_workers)
    return _sha(found.digest), found.labels, [f"the data: {o}" for o in found.opaque]


#: The data's part of a key whose data are hashed while the cache is built.
PENDING = "pending: hashed while building"


def make_key(
    prefix: nn.Module,
    source: Source,
    *,
    dataset_id: str | None,
    transform: Callable | None,
    transform_id: str | None,
    views: int,
    seed: int,
    batch_size: int,
    num_workers: int,
    dtype: str,
    pool: str,
    mask_key: str,
    amp: str | None = None,
    device: torch.device | str = "cpu",
    defer_data: bool = False,
    length_sorted: bool = False,
) -> CacheKey:
    """The :class:`CacheKey` of a build (reads every sample once unless ``dataset_id`` is given;
    see the module docstring for what each part covers).

    ``defer_data`` (for a ``single_pass`` source without ``dataset_id``): read only a few
    samples now; the key is ``pending``, its ``sample`` part (the data's length and those
    samples) finds the caches it may match (:func:`lookup`), and the data's part is computed
    by :func:`complete_key` (one hashing pass) or, while the cache is built, by
    :func:`finish_key`. ``length_sorted``: batches visit the samples by length and are cut
    to their longest (:mod:`~fastft.cache.lengths`): the same rows up to rounding, and a
    visit order an interrupted build must resume in."""
    parts, opaque, trace = prefix_parts(prefix)
    pending = defer_data and dataset_id is None and source.single_pass
    sample, data_opaque = source.probe_key(batch_size) if pending else (None, [])
    pending = sample is not None
    if pending:
        dataset, labels, parts["sample"] = PENDING, None, sample
        data_opaque = [f"the data: {o}" for o in data_opaque]
    else:
        dataset, labels, data_opaque = dataset_part(source, dataset_id, batch_size, num_workers)
    opaque += data_opaque
    t_part, t_opaque, t_digest = transform_part(
        transform, transform_id, seed, source.chunk_size or batch_size
    )
    opaque += t_opaque
    parts.update(
        {
            "format": str(FORMAT_VERSION),
            "dataset": dataset,
            "transform": t_part,
            "views": f"views={views}",
            "dtype": dtype + (f",prefix under {amp} autocast" if amp else ""),
            "numerics": numerics(device) + (",length-sorted batches" if length_sorted else ""),
            "pool": pool + (f":{mask_key}" if pool == "masked_mean" else ""),
        }
    )
    return CacheKey(parts, opaque, labels, trace=trace, transform_digest=t_digest, pending=pending)


def lookup(parts: dict[str, str]) -> str:
    """What a pending key and the complete keys it may become share: every part but the data's
    (``sample``, the length and a few samples, is among them)."""
    return combine({k: v for k, v in parts.items() if k not in ("dataset", "once")})


def _completed(key: CacheKey, dataset: str, labels, data_opaque: list[str]) -> CacheKey:
    parts = dict(key.parts, dataset=dataset)
    opaque = key.opaque + [o for o in data_opaque if o not in key.opaque]
    if not opaque:
        parts.pop("once", None)
    return CacheKey(parts, opaque, labels, trace=key.trace, transform_digest=key.transform_digest)


def complete_key(key: CacheKey, source: Source, batch_size: int, num_workers: int) -> CacheKey:
    """A pending key completed by one hashing pass over the data (the samples read for the
    pending key must read the same again)."""
    dataset, labels, data_opaque = dataset_part(source, None, batch_size, num_workers)
    return _completed(key, dataset, labels, data_opaque)


def finish_key(key: CacheKey, source: Source) -> CacheKey:
    """A pending key completed from the digests recorded while its cache was built (every
    sample read once); CacheError when some sample was never read."""
    found = source.recorded_key()
    if found is None:
        raise CacheError(
            f"{source.description}: the build did not read every sample; the cache was not "
            "completed."
        )
    return _completed(key, _sha(found.digest), None, [f"the data: {o}" for o in found.opaque])


def warn_not_reusable(key: CacheKey) -> None:
    """The one warning of a build whose key is opaque: what was not seen and how to get reuse."""
    where = "; ".join(key.opaque[:3]) + (
        f" (and {len(key.opaque) - 3} more)" if len(key.opaque) > 3 else ""
    )
    how = []
    if any(o.startswith("the transform") for o in key.opaque):
        how.append(
            "pass transform_id='...' naming what the transform does (change it when what the "
            "transform reads changes)"
        )
    if any(o.startswith("the data") for o in key.opaque):
        how.append("pass dataset_id='...' naming the data (change it when the data change)")
    if any(o.startswith("the frozen model") for o in key.opaque):
        how.append(
            "make that attribute of the frozen model a tensor, number, string or a container of "
            "those (or a registered buffer), or delete it; a method that never runs when the model "
            "computes (a training step, an export) can be listed in its class's fastft_key_ignore "
            "= ('name',)"
        )
    warnings.warn(
        "fastft: this feature cache is built for this use only and will not be reused, because "
        f"its key cannot see everything that determines the features: {where}. To reuse it: "
        f"{'; or '.join(how)}.",
        CacheReuseWarning,
        stacklevel=4,
    )


def warn_if_transform_changed(transform: Callable | None, key: CacheKey) -> None:
    """After a build: warn when running the transform changed its own state (a random
    generator of its own): the next build's key differs, so its caches are never reused."""
    if (
        transform is None
        or ContentHasher().update(transform, "the transform").hexdigest() == key.transform_digest
    ):
        return
    warnings.warn(
        "fastft: running the transform changed its own state (a random generator it holds?), so "
        "the next build's key will differ and its caches will never be reused. Draw randomness "
        "from torch's global generator or from the generator= keyword fastft passes (both seeded "
        "per chunk), not from a generator the transform keeps.",
        CacheReuseWarning,
        stacklevel=4,
    )


def accepts_generator(fn: Callable) -> bool:
    """True when ``fn`` takes a ``generator=`` keyword (then it gets the per-chunk generator)."""
    try:
        return "generator" in inspect.signature(fn).parameters
    except (TypeError, ValueError):
        return False


def combine(parts: dict[str, str]) -> str:
    """The fingerprint (40 hex characters) of a set of parts."""
    order = [k for k in PARTS if k in parts] + sorted(set(parts) - set(PARTS))
    return _sha("\n".join(f"{k}={parts[k]}" for k in order))[:40]


def changed_parts(old: dict[str, str], new: dict[str, str]) -> list[str]:
    """Names of the parts that differ between two keys, in :data:`PARTS` order (a pending
    key's data part is not compared: its ``sample`` part stands for it)."""

    def differs(k: str) -> bool:
        if k == "dataset" and new.get(k) == PENDING:  # its "sample" part stands for it
            return old.get("sample") != new.get("sample")
        return old.get(k) != new.get(k)

    return [k for k in PARTS if differs(k)]


def describe_changes(changed: list[str]) -> str:
    """``'the frozen weights and the data'`` for a list of part names."""
    names = [PART_NAMES.get(k, k) for k in changed]
    return names[0] if len(names) == 1 else ", ".join(names[:-1]) + " and " + names[-1]
