"""Benchmark comparisons: probe every layer of several backbones from one frozen pass each.

``fastft.probe(backbones, train, test)`` caches every tap of a backbone in one frozen pass
(:mod:`~fastft.probing.taps`), fits linear, MLP, logistic-regression and kNN heads on the
cached features (:mod:`~fastft.probing.heads`, :mod:`~fastft.probing.logreg`,
:mod:`~fastft.probing.knn`) under an honest protocol (:mod:`~fastft.probing.protocol`), and
reports a table, a heatmap, JSON and CSV (:mod:`~fastft.probing.report`). ``fastft probe``
is the command (:mod:`~fastft.probing.cli`).

The package is ``fastft.probing`` because ``fastft.probe`` is the function.
"""

from __future__ import annotations

from fastft.probing.api import probe
from fastft.probing.report import ProbeReport, ProbeRow
from fastft.probing.taps import TapStack

__all__ = ["probe", "ProbeReport", "ProbeRow", "TapStack"]
