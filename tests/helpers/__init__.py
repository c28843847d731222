"""Code shared by the tests: test modules import from here, never from each other.

``tests/`` is on ``sys.path`` under pytest (rootdir-relative ``prepend`` import mode, as
``tests/`` has no ``__init__.py``), so a test writes ``from helpers.models import make_mlp``,
both under ``python -m pytest tests`` and when pytest runs a single file.

- :mod:`helpers.models` — small models with random weights, and the real MiniLM or a skip.
- :mod:`helpers.data` — seeded inputs and labels for those models; ``Rows``, a Dataset.
- :mod:`helpers.oracle` — naive frozen fine-tuning in plain PyTorch, the correctness oracle.
- :mod:`helpers.caches` — cache builds and the checks of what a cache holds.
- :mod:`helpers.ops` — the native kernel tests' parameters, inputs and acceptance rule.
- :mod:`helpers.spawned` — for tests that spawn worker processes.
- :mod:`helpers.jobfactories` — factories named by the job configs of ``test_jobs``.
"""
