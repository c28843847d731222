"""Code shared by the tests: test modules import from here, never from each other.

``tests/`` is on ``sys.path`` under pytest (rootdir-relative ``prepend`` import mode, as
``tests/`` has no ``__init__.py``), so a test writes ``from helpers.models import make_mlp``,
both under ``python -m pytest tests`` and when pytest runs a single file.

- :mod:`helpers.models` — small models with random weights, and the real MiniLM or a skip.
- :mod:`helpers.data` — seeded inputs and labels for those models; ``Rows``, a Dataset.
- :mod:`helpers.naive_reference` — naive frozen fine-tuning written from the README alone
  (imports nothing from fastft): the weight oracle of the ``test_oracle_*`` files.
- :mod:`helpers.oracle` — a naive loop over a model fastft edited (the older trainer oracle).
- :mod:`helpers.caches` — cache builds and the checks of what a cache holds.
- :mod:`helpers.ops` — the native kernel tests' parameters, inputs and acceptance rule.
- :mod:`helpers.spawned` — for tests that spawn worker processes.
- :mod:`helpers.jobfactories` — factories named by the job configs of ``test_jobs``.
- :mod:`helpers.native` — whether the native (and CUDA) kernels must be there.
- :mod:`helpers.ports` — a free TCP port for torchrun.
- :mod:`helpers.timing` — clocks the bench tests check reported times against.
- :mod:`helpers.compat_models`, :mod:`helpers.compat_table` — the library models of the
  compatibility suite and the table of families generated from it.
"""
