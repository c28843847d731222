"""``fastft train CONFIG``: a fine-tuning job described by a JSON (or YAML) file.

The config names factories by import path, so a batch job needs no Python of its own::

    {
      "model": "my_factories:pretrained_resnet",
      "model_kwargs": {},
      "data": "my_factories:splits",
      "data_kwargs": {},
      "surgery": {"remove_layers": ["layer4"]},
      "finetuner": {"num_classes": 10, "hidden": [256], "cache_dtype": "fp16"},
      "fit": {"epochs": 10, "batch_size": 256, "lr": 0.001,
              "early_stopping": {"patience": 3, "monitor": "val_loss"}},
      "output": "runs/resnet-cifar"
    }

- ``model``: ``module:function`` returning the ``nn.Module``, called with ``model_kwargs``.
- ``data``: ``module:function`` returning ``{"train": ..., "val": ..., "test": ...}`` (any
  form ``fit`` takes; ``val`` and ``test`` optional), called with ``data_kwargs``.
- ``surgery`` (optional): ``remove_layers``, ``freeze`` or ``unfreeze`` steps applied
  before :class:`~fastft.FineTuner`.
- ``finetuner``: keyword arguments of :class:`~fastft.FineTuner`; ``fit``: keyword arguments
  of :meth:`~fastft.FineTuner.fit`. ``early_stopping`` is a patience (an int) or the
  arguments of :class:`~fastft.EarlyStopping` as a dict. An unknown key is refused with
  the list of valid ones.
- ``output``: the folder the results are written to.

Modules are imported from the config file's folder first, then the current folder, then
the installed packages: ``my_factories.py`` next to the config needs no ``PYTHONPATH``.

**A job config is code.** The ``model`` and ``data`` entries name functions that fastft
imports and calls, with the config's keyword arguments: running a config runs whatever those
functions do, like running a Python script. Run only configs you trust.

It runs the same under ``fastft train`` and under ``torchrun`` (a process group is then
initialised from the environment, gloo on CPU and nccl on GPU, and training is
data-parallel); rank 0 writes ``model.pt`` (the exported model's state_dict),
``finetuner.pt`` (:meth:`FineTuner.save`), ``history.json`` and ``metrics.json``.
"""

from __future__ import annotations

import contextlib
import dataclasses
import difflib
import importlib
import inspect
import json
import os
import sys
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import torch

from fastft import distributed as fdist
from fastft.errors import FastFTValueError
from fastft.model import surgery
from fastft.train import EarlyStopping, FineTuner

KNOWN_KEYS = {
    "model",
    "model_kwargs",
    "data",
    "data_kwargs",
    "surgery",
    "finetuner",
    "fit",
    "output",
}


#: Keyword arguments that take Python objects (a module, a callable): not settable in a config.
PYTHON_ONLY = {"config", "callbacks", "head", "transform"}


class ConfigError(FastFTValueError):
    """The job config is missing a key, names something that cannot be imported, or is malformed."""


def _keywords(fn: Callable) -> list[str]:
    return sorted(
        p.name
        for p in inspect.signature(fn).parameters.values()
        if p.kind == p.KEYWORD_ONLY and p.name not in PYTHON_ONLY
    )


def valid_keys(section: str) -> list[str]:
    """The keys a config's ``finetuner`` or ``fit`` section may hold."""
    if section == "finetuner":
        return _keywords(FineTuner.__init__)
    if section == "fit":
        return _keywords(FineTuner.fit)
    return sorted(f.name for f in dataclasses.fields(EarlyStopping) if f.init)


def _check_keys(given: Any, section: str, where: str) -> None:
    if not isinstance(given, dict):
        raise ConfigError(f"{where} must be a mapping of settings, not {type(given).__name__}.")
    valid = valid_keys(section)
    unknown = sorted(set(given) - set(valid))
    if unknown:
        hints = [
            f"{k!r} (did you mean {close[0]!r}?)" if close else repr(k)
            for k in unknown
            for close in [difflib.get_close_matches(k, valid, n=1)]
        ]
        raise ConfigError(
            f"unknown {where} key{'s' if len(unknown) > 1 else ''} {', '.join(hints)}; "
            f"valid keys: {', '.join(valid)}."
        )


def check_config(config: dict) -> None:
    """ConfigError for a ``finetuner``, ``fit`` or ``early_stopping`` section with keys that
    are not arguments of FineTuner, fit or EarlyStopping (listing the valid keys)."""
    for key in ("model_kwargs", "data_kwargs", "surgery"):
        if not isinstance(config.get(key) or {}, dict):
            raise ConfigError(
                f"{key!r} must be a mapping of keyword arguments, not {type(config[key]).__name__}."
            )
    _check_keys(config.get("finetuner") or {}, "finetuner", "'finetuner'")
    fit = config.get("fit") or {}
    _check_keys(fit, "fit", "'fit'")
    stopping = fit.get("early_stopping")
    if isinstance(stopping, dict):
        _check_keys(stopping, "early_stopping", "'fit': 'early_stopping'")
    elif stopping is not None and (isinstance(stopping, bool) or not isinstance(stopping, int)):
        raise ConfigError(
            "'fit': 'early_stopping' is a patience (an int, e.g. 3) or a mapping of "
            f"EarlyStopping's arguments ({', '.join(valid_keys('early_stopping'))}), "
            f"not {type(stopping).__name__}."
        )


def fit_arguments(config: dict) -> dict[str, Any]:
    """The config's ``fit`` section as keyword arguments of ``fit`` (``early_stopping`` given
    as a mapping made an :class:`~fastft.EarlyStopping`)."""
    fit = dict(config.get("fit") or {})
    if isinstance(fit.get("early_stopping"), dict):
        fit["early_stopping"] = EarlyStopping(**fit["early_stopping"])
    return fit


@contextlib.contextmanager
def import_path(config_path: str | os.PathLike) -> Iterator[None]:
    """Factories importable from the config file's folder, then the current folder (the
    entries are put first on ``sys.path`` while the job runs)."""
    entries = [str(Path(config_path).resolve().parent), os.getcwd()]
    sys.path[0:0] = entries
    try:
        yield
    finally:
        for entry in entries:
            with contextlib.suppress(ValueError):
                sys.path.remove(entry)


def run_file(path: str | os.PathLike) -> dict[str, Any]:
    """Load the config at ``path`` and run it, importing factories from its folder first,
    then from the current folder (what ``fastft train`` does)."""
    config = load_config(path)
    with import_path(path):
        return run(config)


def load_config(path: str | os.PathLike) -> dict:
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"no config file at {path}.")
    text = path.read_text()
    if path.suffix in (".yaml", ".yml"):
        try:
            import yaml
        except ImportError as exc:
            raise ConfigError(
                "a YAML config needs PyYAML (`pip install pyyaml`), or write the config as JSON."
            ) from exc
        config = yaml.safe_load(text)
    else:
        try:
            config = json.loads(text)
        except json.JSONDecodeError as exc:
            raise ConfigError(f"{path} is not valid JSON: {exc}") from exc
    if not isinstance(config, dict):
        raise ConfigError(f"{path} must hold a mapping of settings, not {type(config).__name__}.")
    unknown = set(config) - KNOWN_KEYS
    if unknown:
        raise ConfigError(f"unknown config keys {sorted(unknown)}; known: {sorted(KNOWN_KEYS)}.")
    for key in ("model", "data", "output"):
        if key not in config:
            raise ConfigError(f"the config needs {key!r} (see `fastft train --help`).")
    check_config(config)
    return config


def resolve(spec: str) -> Callable:
    """``package.module:function`` → the function."""
    if not isinstance(spec, str) or ":" not in spec:
        raise ConfigError(f"{spec!r} must be 'package.module:function'.")
    module_name, attr = spec.split(":", 1)
    try:
        module = importlib.import_module(module_name)
    except ImportError as exc:
        raise ConfigError(f"cannot import {module_name!r} for {spec!r}: {exc}") from exc
    try:
        fn = getattr(module, attr)
    except AttributeError as exc:
        raise ConfigError(f"{module_name!r} has no {attr!r} (from {spec!r}).") from exc
    if not callable(fn):
        raise ConfigError(f"{spec!r} is not callable.")
    return fn


def _init_process_group() -> bool:
    """Join the torchrun process group when launched by torchrun; True if this call made it."""
    if int(os.environ.get("WORLD_SIZE", "1")) <= 1 or torch.distributed.is_initialized():
        return False
    backend = "nccl" if torch.cuda.is_available() else "gloo"
    if backend == "nccl":
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))  # pragma: cuda
    torch.distributed.init_process_group(backend)
    return True


def run(config: dict) -> dict[str, Any]:
    """Run a job; returns the metrics written (rank 0) or computed (other ranks)."""
    check_config(config)
    made_group = _init_process_group()
    try:
        model = resolve(config["model"])(**config.get("model_kwargs", {}))
        splits = resolve(config["data"])(**config.get("data_kwargs", {}))
        if not isinstance(splits, dict) or "train" not in splits:
            raise ConfigError(
                f"{config['data']!r} must return a dict with 'train' "
                "(and optionally 'val', 'test')."
            )
        if set(splits) - {"train", "val", "test"}:
            raise ConfigError(
                f"{config['data']!r} returned splits {sorted(splits)}; a job uses 'train', "
                "'val' and 'test' only: rename the others (e.g. 'validation' to 'val')."
            )
        for name, args in (config.get("surgery") or {}).items():
            if name not in ("remove_layers", "freeze", "unfreeze"):
                raise ConfigError(
                    f"surgery step {name!r} is not supported in configs "
                    "(remove_layers, freeze, unfreeze)."
                )
            fn = getattr(surgery, name)
            fn(model, **args) if isinstance(args, dict) else fn(model, args)
        ft = FineTuner(model, **config.get("finetuner", {}))
        ft.fit(splits["train"], val=splits.get("val"), **fit_arguments(config))
        metrics = {"train_loss": ft.history[-1]["loss"]}
        if splits.get("test") is not None:
            metrics.update({f"test_{k}": v for k, v in ft.evaluate(splits["test"]).items()})
        rank, _ = fdist.rank_and_world()
        if rank == 0:
            out = Path(config["output"])
            out.mkdir(parents=True, exist_ok=True)
            torch.save(ft.export().state_dict(), out / "model.pt")
            if ft.head is None:
                ft.save(str(out / "finetuner.pt"))
            (out / "history.json").write_text(json.dumps(list(ft.history), indent=2))
            (out / "metrics.json").write_text(json.dumps(metrics, indent=2))
        fdist.barrier()
        return metrics
    finally:
        if made_group:
            torch.distributed.destroy_process_group()
