"""Which precision the frozen pass runs in: ``extract_amp`` resolved against the device.

bf16 autocast pays only where the hardware computes in bf16: GPUs with bf16 tensor cores
(compute capability 8.0 and later) and CPUs with AVX512-BF16 or AMX. Elsewhere autocast
emulates bf16 by converting every operand and runs slower than fp32, so an explicit
``'bf16'`` there is refused and ``'auto'`` keeps fp32.

CPU support is read from the kernel's CPU flags (``/proc/cpuinfo``): torch's own
``mkldnn_bf16`` check is true on any AVX512 CPU, native bf16 or not.

``FASTFT_EXTRACT_AMP`` (``fp32``, ``bf16`` or ``auto``) sets what ``'auto'`` means in a
process: ``fp32`` pins every default pass to fp32 (fastft's own test suite does, so that its
oracle comparisons stay exact on any machine).
"""

from __future__ import annotations

import functools
import os
import platform
from pathlib import Path

import torch

from fastft.errors import FastFTValueError

__all__ = ["AMP_CHOICES", "check_amp", "native_bf16", "resolve_amp"]

#: What ``extract_amp`` takes: None or 'fp32' (no autocast), 'bf16', 'auto'.
AMP_CHOICES = (None, "fp32", "bf16", "auto")

# CPU flags (Linux x86 /proc/cpuinfo "flags", aarch64 "Features") of native bf16 arithmetic.
_CPU_BF16_FLAGS = {"amx_bf16": "AMX-BF16", "avx512_bf16": "AVX512-BF16", "bf16": "Arm BF16"}


def check_amp(amp: str | None, name: str = "amp") -> None:
    """FastFTValueError unless ``amp`` is one of :data:`AMP_CHOICES` (``name``: the argument,
    in the message)."""
    if amp not in AMP_CHOICES:
        raise FastFTValueError(
            f"{name} must be None or 'fp32' (the frozen pass in fp32), 'bf16' (under bf16 "
            f"autocast) or 'auto' (bf16 where the device computes it natively), got {amp!r}."
        )


@functools.lru_cache(maxsize=1)
def _cpu_flags() -> frozenset[str]:
    try:
        text = Path("/proc/cpuinfo").read_text(errors="replace")
    except OSError:
        return frozenset()
    for line in text.splitlines():
        key, _, value = line.partition(":")
        if key.strip() in ("flags", "Features"):
            return frozenset(value.split())
    return frozenset()


def native_bf16(device: torch.device | str) -> tuple[bool, str]:
    """(whether ``device`` computes bf16 natively, what was found, in words)."""
    device = torch.device(device)
    if device.type == "cuda":  # pragma: cuda
        major, minor = torch.cuda.get_device_capability(device)
        name = torch.cuda.get_device_name(device)
        if major >= 8:
            return True, f"{name} (compute capability {major}.{minor}) has bf16 tensor cores"
        return False, f"{name} (compute capability {major}.{minor}) has no bf16 tensor cores"
    if device.type == "cpu":
        found = [label for flag, label in _CPU_BF16_FLAGS.items() if flag in _cpu_flags()]
        if found:
            return True, f"this CPU has {found[0]}"
        return False, (
            f"this CPU ({platform.machine() or 'unknown'}) reports no AVX512-BF16, AMX-BF16 or "
            "Arm BF16 instructions: bf16 autocast would be emulated and slower than fp32"
        )
    return False, f"bf16 extraction is not measured on {device.type} devices"


def resolve_amp(
    amp: str | None, device: torch.device | str, name: str = "extract_amp"
) -> str | None:
    """The autocast the frozen pass runs under on ``device``: 'bf16' or None (fp32).

    ``'auto'`` is bf16 where :func:`native_bf16`, else fp32; ``'bf16'`` where it would be
    emulated is a FastFTValueError that says so.
    """
    check_amp(amp, name)
    if amp == "auto":
        pinned = os.environ.get("FASTFT_EXTRACT_AMP", "auto").strip().lower() or "auto"
        if pinned not in ("fp32", "bf16", "auto"):
            raise FastFTValueError(
                f"the environment variable FASTFT_EXTRACT_AMP must be 'fp32', 'bf16' or 'auto' "
                f"(what extract_amp='auto' means), got {pinned!r}: set one of these or unset it."
            )
        amp = pinned
    if amp in (None, "fp32"):
        return None
    native, why = native_bf16(device)
    if amp == "auto":
        return "bf16" if native else None
    if not native:
        raise FastFTValueError(
            f"{name}='bf16' on {torch.device(device)}: {why}. Leave {name} at 'auto' (bf16 only "
            "where it is native) or pass None for fp32."
        )
    return "bf16"
