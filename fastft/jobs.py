"""``fastft train CONFIG``: a fine-tuning job described by a JSON (or YAML) file.

The config names factories by import path, so a batch job needs no Python of its own::

    {
      "model": "my_pkg.models:pretrained_resnet",  # returns an nn.Module
      "model_kwargs": {},
      "data": "my_pkg.data:splits",                # returns {"train": ..., "val": ..., "test": ...}
      "data_kwargs": {},
      "surgery": {"remove_layers": ["layer4"]},    # optional, applied before FineTuner
      "finetuner": {"num_classes": 10, "hidden": [256], "cache_dtype": "fp16"},
      "fit": {"epochs": 10, "batch_size": 256, "lr": 0.001},
      "output": "runs/resnet-cifar"
    }

**A job config is code.** The ``model`` and ``data`` entries name functions that fastft
imports and calls, with the config's keyword arguments: running a config runs whatever those
functions do, like running a Python script. Run only configs you trust.

It runs the same under ``python -m fastft.cli train`` and under ``torchrun`` (a process
group is then initialised from the environment, gloo on CPU and nccl on GPU, and training is
data-parallel); rank 0 writes ``model.pt`` (the exported model's state_dict),
``finetuner.pt`` (:meth:`FineTuner.save`), ``history.json`` and ``metrics.json``.
"""

from __future__ import annotations

import importlib
import json
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from fastft import distributed as fdist
from fastft.errors import FastFTValueError
from fastft.model import surgery
from fastft.train import FineTuner

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


class ConfigError(FastFTValueError):
    """The job config is missing a key, names something that cannot be imported, or is malformed."""


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
    made_group = _init_process_group()
    try:
        model = resolve(config["model"])(**config.get("model_kwargs", {}))
        splits = resolve(config["data"])(**config.get("data_kwargs", {}))
        if not isinstance(splits, dict) or "train" not in splits:
            raise ConfigError(
                f"{config['data']!r} must return a dict with 'train' "
                "(and optionally 'val', 'test')."
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
        ft.fit(splits["train"], val=splits.get("val"), **config.get("fit", {}))
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
