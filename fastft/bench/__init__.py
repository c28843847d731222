"""What ``fastft demo`` and ``fastft bench`` run: naive fine-tuning against fastft, measured.

- :mod:`~fastft.bench.tasks`: the tasks (MiniLM on BBC News, a digits CNN) and shared measures;
- :mod:`~fastft.bench.e2e`: ``fastft bench``, end to end over cache dtypes and tiers;
- :mod:`~fastft.bench.unfreeze`: ``fastft bench --unfreeze``, progressive unfreezing;
- :mod:`~fastft.bench.demo`: ``fastft demo``, the user-facing comparison and its report.
"""
