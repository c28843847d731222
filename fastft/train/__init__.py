"""Training on the cache: the FineTuner facade and the modules it drives.

- :mod:`~fastft.train.finetuner`: :class:`FineTuner`, the public trainer (a facade);
- :mod:`~fastft.train.settings`: FineTuner's settings, checked and recorded;
- :mod:`~fastft.train.facade`: FineTuner's settings as attributes, its options from keywords;
- :mod:`~fastft.train.tuned`: the edited model, its unfrozen blocks, split and state;
- :mod:`~fastft.train.caches`: the caches a tuner builds, with one set of settings;
- :mod:`~fastft.train.config`: :class:`FitConfig`, :class:`EarlyStopping`, :class:`History`, stages;
- :mod:`~fastft.train.fitting`: one fit: stages, checkpoints, resume;
- :mod:`~fastft.train.progress`: what a fit shows: the epochs bar, or one log line per epoch;
- :mod:`~fastft.train.engine`: the training loop (``fit`` and ``fit_many`` both drive it);
- :mod:`~fastft.train.graph_step`: CUDA-graph replay of the step;
- :mod:`~fastft.train.evaluation`, :mod:`~fastft.train.metrics`, :mod:`~fastft.train.objectives`;
- :mod:`~fastft.train.checkpoint`, :mod:`~fastft.train.resume`: saved tuners and checkpoints;
- :mod:`~fastft.train.sweep`: several heads trained in one pass (``fit_many``).
"""

from __future__ import annotations

from fastft.train.checkpoint import CheckpointError
from fastft.train.config import EarlyStopping, FitConfig, History
from fastft.train.finetuner import FineTuner
from fastft.train.sweep import SweepResult, fit_many

__all__ = [
    "CheckpointError",
    "EarlyStopping",
    "FineTuner",
    "FitConfig",
    "History",
    "SweepResult",
    "fit_many",
]
