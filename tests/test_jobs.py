"""``fastft train CONFIG``: a job from a config file, and its errors."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import fastft

from helpers.ports import free_port

TESTS = Path(__file__).resolve().parent


def write_config(tmp_path, **overrides):
    config = {
        "model": "helpers.jobfactories:small_model",
        "model_kwargs": {"width": 12},
        "data": "helpers.jobfactories:splits",
        "finetuner": {
            "num_classes": 3,
            "hidden": [8],
            "cache_dtype": "fp32",
            "verbose": False,
            "cache_dir": str(tmp_path / "cache"),
        },
        "fit": {"epochs": 3, "batch_size": 16, "lr": 0.01},
        "output": str(tmp_path / "out"),
        **overrides,
    }
    path = tmp_path / "job.json"
    path.write_text(json.dumps(config))
    return path, config


def run_train(path):
    env = {**os.environ, "PYTHONPATH": f"{TESTS}{os.pathsep}{os.environ.get('PYTHONPATH', '')}"}
    return subprocess.run(
        [sys.executable, "-m", "fastft.cli", "train", str(path)],
        capture_output=True,
        text=True,
        timeout=300,
        env=env,
    )


def test_train_job_writes_model_history_and_metrics(tmp_path):
    path, config = write_config(tmp_path)
    out = run_train(path)
    assert out.returncode == 0, out.stderr
    folder = Path(config["output"])
    history = json.loads((folder / "history.json").read_text())
    metrics = json.loads((folder / "metrics.json").read_text())
    assert [r["epoch"] for r in history] == [1, 2, 3]
    assert metrics["train_loss"] == history[-1]["loss"]
    # The exported weights reload into the plain edited structure and match the saved FineTuner.
    from helpers import jobfactories

    ft = fastft.FineTuner.load(
        str(folder / "finetuner.pt"),
        jobfactories.small_model(12),
        verbose=False,
        cache_dir=str(tmp_path / "cache"),
    )
    model = ft.export()
    exported = torch.load(folder / "model.pt", weights_only=True)
    for name, tensor in model.state_dict().items():
        torch.testing.assert_close(exported[name], tensor, rtol=0, atol=0)
    # The reported test accuracy is what the written model scores on the test split: its
    # predictions against the labels, counted here, with plain PyTorch.
    model.load_state_dict(exported)
    X, y = jobfactories.splits()["test"]
    with torch.no_grad():
        predicted = model.eval()(X).argmax(1)
    assert predicted.shape == y.shape == (16,)
    correct = int((predicted == y).sum())
    assert metrics["test_accuracy"] == pytest.approx(correct / 16, abs=1e-6), (correct, metrics)
    assert correct >= 10  # learned: the commonest test class alone is 7 of the 16


def test_bad_configs_are_clear_errors(tmp_path):
    path, _ = write_config(tmp_path, model="helpers.jobfactories:nope")
    out = run_train(path)
    assert out.returncode == 2 and "has no 'nope'" in out.stderr
    path.write_text("{not json")
    out = run_train(path)
    assert out.returncode == 2 and "not valid JSON" in out.stderr
    path.write_text(json.dumps({"model": "a:b", "data": "c:d", "output": "x", "epochs": 3}))
    out = run_train(path)
    assert out.returncode == 2 and "unknown config keys ['epochs']" in out.stderr


def test_same_job_under_torchrun_gives_the_same_model(tmp_path):
    single_path, single = (
        write_config(tmp_path / "single") if (tmp_path / "single").mkdir() is None else None
    )
    ddp_path, ddp = write_config(tmp_path / "ddp") if (tmp_path / "ddp").mkdir() is None else None
    assert run_train(single_path).returncode == 0
    env = {**os.environ, "PYTHONPATH": f"{TESTS}{os.pathsep}{os.environ.get('PYTHONPATH', '')}"}
    out = subprocess.run(
        [
            sys.executable,
            "-m",
            "torch.distributed.run",
            "--nproc_per_node",
            "2",
            "--master_addr",
            "127.0.0.1",
            "--master_port",
            str(free_port()),
            "-m",
            "fastft.cli",
            "train",
            str(ddp_path),
        ],
        capture_output=True,
        text=True,
        timeout=300,
        env=env,
    )
    assert out.returncode == 0, out.stderr[-3000:]
    a = torch.load(Path(single["output"]) / "model.pt", weights_only=True)
    b = torch.load(Path(ddp["output"]) / "model.pt", weights_only=True)
    for name in a:
        torch.testing.assert_close(b[name], a[name], rtol=0, atol=1e-5, msg=name)


def test_job_with_an_unfreeze_schedule(tmp_path):
    path, config = write_config(
        tmp_path,
        model="helpers.jobfactories:deep_model",
        fit={"epochs": 3, "batch_size": 16, "lr": 0.01, "unfreeze": [[1, 1]], "lr_decay": 0.5},
    )
    out = run_train(path)
    assert out.returncode == 0, out.stderr
    history = json.loads((Path(config["output"]) / "history.json").read_text())
    assert [r.get("unfrozen_blocks") for r in history] == [None, 1, 1]
    from helpers import jobfactories

    ft = fastft.FineTuner.load(
        str(Path(config["output"]) / "finetuner.pt"),
        jobfactories.deep_model(12),
        verbose=False,
        cache_dir=str(tmp_path / "cache"),
    )
    assert ft.model[2].weight.requires_grad and not ft.model[0].weight.requires_grad
