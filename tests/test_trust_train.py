"""Trust: training continues exactly what it can and refuses what it cannot.

- ``evaluate`` works after ``FineTuner.load`` and after ``unfreeze``.
- A resume refuses a checkpoint of other data, another backbone, or a scheduler planned over
  other epochs; without a scheduler more epochs continue exactly.
- Labels and hyper-parameters that would only give NaN weights are refused before training;
  validation labels are checked before the first epoch, not after it.
"""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from fastft import FineTuner
from fastft.errors import DataError, FastFTValueError

from helpers.data import labelled
from helpers.oracle import trainable_state

pytestmark = pytest.mark.usefixtures("fresh_registry")


def mlp(seed=0):
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(6, 16), nn.ReLU(), nn.Linear(16, 8), nn.ReLU(), nn.Linear(8, 3))


def data(n=48, seed=1, classes=3):
    return labelled(n, classes=classes, seed=seed)


def tuner(tmp_path, model=None, **kw):
    kw.setdefault("num_classes", 3)
    return FineTuner(
        model or mlp(),
        cache="host",
        cache_dtype="fp32",
        cache_dir=str(tmp_path),
        verbose=False,
        **kw,
    )


# ---------------------------------------------------------------------------- evaluate
@pytest.mark.parametrize("after", ["load", "unfreeze"])
@pytest.mark.reliability(
    "evaluate() right after FineTuner.load() or after unfreeze()",
    "works (the model is split again) and equals the exported model's accuracy",
)
def test_evaluate_after_load_or_unfreeze(tmp_path, after):
    X, y = data()
    ft = tuner(tmp_path)
    ft.fit((X, y), epochs=2, batch_size=8)
    if after == "load":
        ft.save(str(tmp_path / "ft.pt"))
        ft = FineTuner.load(
            str(tmp_path / "ft.pt"), mlp(), cache="host", cache_dir=str(tmp_path), verbose=False
        )
    else:
        ft.unfreeze(1)
    with torch.no_grad():
        accuracy = (ft.export()(X).argmax(1) == y).double().mean().item()
    assert ft.evaluate((X, y))["accuracy"] == pytest.approx(accuracy)


# ---------------------------------------------------------------------------- resume
class Interrupt(Exception):
    pass


def interrupted(tmp_path, X, y, *, at, model=None, **fit):
    """A fit interrupted at the end of epoch ``at`` (in a callback, before that epoch's
    checkpoint): its checkpoint holds epoch ``at - 1``. Returns its path."""
    ckpt = str(tmp_path / "ckpt.pt")

    def stop(ft, record):
        if record["epoch"] == at:
            raise Interrupt

    with pytest.raises(Interrupt):
        tuner(tmp_path, model).fit((X, y), callbacks=[stop], checkpoint=ckpt, **fit)
    return ckpt


@pytest.mark.parametrize("scheduler", ["cosine", "onecycle"])
@pytest.mark.reliability(
    "fit(resume=True) with more epochs than the interrupted fit, with a cosine or onecycle "
    "scheduler",
    "refused up front: its learning rate was planned over the other epochs",
)
def test_a_planned_schedule_is_not_stretched(tmp_path, scheduler):
    X, y = data()
    ckpt = interrupted(tmp_path, X, y, at=2, epochs=3, batch_size=8, scheduler=scheduler)
    with pytest.raises(FastFTValueError, match=rf"epochs=3 with scheduler='{scheduler}'.*epochs=5"):
        tuner(tmp_path).fit(
            (X, y), epochs=5, batch_size=8, scheduler=scheduler, checkpoint=ckpt, resume=True
        )


@pytest.mark.reliability(
    "fit(resume=True) with more epochs than the interrupted fit, no scheduler",
    "continues to the same weights as one uninterrupted fit of the longer length",
)
def test_more_epochs_without_a_schedule_continue_exactly(tmp_path):
    X, y = data()
    whole = tuner(tmp_path)
    whole.fit((X, y), epochs=5, batch_size=8)
    ckpt = interrupted(tmp_path, X, y, at=2, epochs=3, batch_size=8)
    resumed = tuner(tmp_path)
    resumed.fit((X, y), epochs=5, batch_size=8, checkpoint=ckpt, resume=True)
    for name, want in trainable_state(whole.model).items():
        torch.testing.assert_close(trainable_state(resumed.model)[name], want, rtol=0, atol=1e-6)
    assert [r["epoch"] for r in resumed.history] == [1, 2, 3, 4, 5]


@pytest.mark.parametrize("other", ["data", "backbone"])
@pytest.mark.reliability(
    "fit(resume=True) from a checkpoint made on other training data, or with another "
    "pretrained backbone",
    "refused with a message saying what differs; nothing trained",
)
def test_a_checkpoint_of_another_fit_is_refused(tmp_path, other):
    X, y = data()
    ckpt = interrupted(tmp_path, X, y, at=2, epochs=3, batch_size=8)
    if other == "data":
        X2, y2, model, match = X * 2, y, mlp(), "other training data"
    else:
        X2, y2, model, match = X, y, mlp(seed=7), "another backbone"
    ft = tuner(tmp_path, model)
    with pytest.raises(FastFTValueError, match=match):
        ft.fit((X2, y2), epochs=3, batch_size=8, checkpoint=ckpt, resume=True)
    assert not ft.history


def test_a_finished_fit_resumed_on_other_data_is_refused(tmp_path):
    X, y = data()
    ckpt = str(tmp_path / "ckpt.pt")
    tuner(tmp_path).fit((X, y), epochs=2, batch_size=8, checkpoint=ckpt)
    with pytest.raises(FastFTValueError, match="other training data"):
        tuner(tmp_path).fit((X[:40], y[:40]), epochs=2, batch_size=8, checkpoint=ckpt, resume=True)
    again = tuner(tmp_path)
    again.fit(
        (X, y), epochs=2, batch_size=8, checkpoint=ckpt, resume=True
    )  # the same data: restored as it ended
    assert [r["epoch"] for r in again.history] == [1, 2]


# ---------------------------------------------------------------------- labels and hyper-parameters
def regression_tuner(tmp_path, outputs=1):
    return tuner(tmp_path, num_classes=None, head=nn.Linear(8, outputs))


@pytest.mark.parametrize(
    "case",
    ["mse NaN target", "mse Inf target", "bce NaN target", "bce target 1.5", "bce target -0.5"],
)
@pytest.mark.reliability(
    "NaN/Inf targets for loss='mse' or 'bce', bce targets outside [0, 1]",
    "DataError naming the sample, before any training",
)
def test_targets_that_would_give_nan_weights_are_refused(tmp_path, case):
    X, _ = data()
    model = mlp()  # its output layer (8 -> 3) is replaced by the regression or multi-label head
    if case.startswith("mse"):
        y = torch.randn(48)
        y[7] = float("nan") if "NaN" in case else float("inf")
        ft, loss = (
            FineTuner(
                model, head=nn.Linear(8, 1), cache="host", cache_dir=str(tmp_path), verbose=False
            ),
            "mse",
        )
    else:
        y = torch.randint(0, 2, (48, 4)).float()
        y[7, 1] = {"bce NaN target": float("nan"), "bce target 1.5": 1.5, "bce target -0.5": -0.5}[
            case
        ]
        ft, loss = (
            FineTuner(
                model, head=nn.Linear(8, 4), cache="host", cache_dir=str(tmp_path), verbose=False
            ),
            "bce",
        )
    with pytest.raises(DataError, match="sample 7"):
        ft.fit((X, y), epochs=1, batch_size=8, loss=loss)
    assert not ft.history


@pytest.mark.parametrize(
    "setting",
    [
        {"lr": math.inf},
        {"lr": math.nan},
        {"momentum": math.nan, "optimizer": "sgd"},
        {"momentum": 1.5, "optimizer": "sgd"},
        {"weight_decay": -1.0},
        {"weight_decay": math.inf},
        {"label_smoothing": 1.0},
        {"class_weights": [1.0, math.nan, 1.0]},
        {"lr_decay": math.inf},
    ],
)
@pytest.mark.reliability(
    "lr=inf or NaN, momentum NaN or 1.5, weight_decay -1 or inf, label_smoothing 1, a NaN "
    "class weight, lr_decay inf",
    "FastFTValueError naming the setting, before any work",
)
def test_settings_that_would_give_nan_weights_are_refused(tmp_path, setting):
    X, y = data()
    ft = tuner(tmp_path)
    name = next(iter(setting))
    with pytest.raises(FastFTValueError, match=name):
        ft.fit((X, y), epochs=1, batch_size=8, **setting)
    assert ft.cache is None and not ft.history


@pytest.mark.parametrize("how", ["fit", "fit_many"])
@pytest.mark.reliability(
    "validation labels outside the model's classes", "DataError before the first epoch"
)
def test_validation_labels_are_checked_before_training(tmp_path, how):
    X, y = data()
    Xv, yv = data(n=10, seed=2)
    yv[4] = 7
    ft = tuner(tmp_path)
    with pytest.raises(DataError, match="label 7 of sample 4 of the val labels"):
        if how == "fit":
            ft.fit((X, y), val=(Xv, yv), epochs=2, batch_size=8)
        else:
            ft.fit_many([{"lr": 1e-3}, {"lr": 1e-2}], (X, y), val=(Xv, yv), epochs=2, batch_size=8)
    assert not ft.history


# ---------------------------------------------------------------------------- job configs
def test_the_cli_says_a_job_config_is_code(capsys):
    from fastft import cli, jobs

    with pytest.raises(SystemExit):
        cli.main(["train", "--help"])
    assert "A job config is code" in " ".join(capsys.readouterr().out.split())
    assert "A job config is code" in jobs.__doc__
