"""fastft: fine-tune pretrained networks by running the frozen layers once per sample.

Replace the output layer, add or remove hidden layers, freeze what did not change: fastft
runs the frozen part once, caches its output, and trains only the new layers on the cache.
"""

from __future__ import annotations

from fastft import data, ops
from fastft._native import build_info, has_cuda, has_native
from fastft.cache import FeatureCache
from fastft.errors import *  # noqa: F401,F403
from fastft.errors import __all__ as _error_names
from fastft.model import surgery
from fastft.model.freezing import freeze, unfreeze  # also fastft.surgery.freeze, .unfreeze
from fastft.probing import ProbeReport, TapStack, probe
from fastft.split import FrozenPrefix, TrainableTail, split
from fastft.train import CheckpointError, EarlyStopping, FineTuner, FitConfig, History, SweepResult

__version__ = "0.1.0"

__all__ = [
    "__version__",
    "build_info",
    "has_cuda",
    "has_native",
    "ops",
    "FeatureCache",
    "surgery",
    "freeze",
    "unfreeze",
    "split",
    "FrozenPrefix",
    "TrainableTail",
    "data",
    "FineTuner",
    "FitConfig",
    "EarlyStopping",
    "CheckpointError",
    "History",
    "SweepResult",
    "probe",
    "ProbeReport",
    "TapStack",
    *_error_names,
]
