"""Training semantics a user relies on without reading the source (issue 19, part A).

- ``EarlyStopping`` maximises accuracy-like monitors (``mode="auto"``) and restores the best.
- New layers follow the model's dtype and device; data of another dtype is a DataError.
- ``evaluate(batch_size=...)`` evaluates in those batches, not the fit's.
- ``fit`` again continues training and numbering epochs; each call returns its own epochs.
- ``momentum`` is SGD's (0.9 by default) and refused with Adam/AdamW.
- ``resume=True`` without a checkpoint says it starts from scratch.
- ``cache="auto"`` that keeps a cache in memory says that ``cache_dir=`` is unused.
- Frozen modules left in train mode are warned about only when that changes results, once,
  at the user's line.
"""

from __future__ import annotations

import math
import warnings

import pytest
import torch
from torch import nn

import fastft
from fastft import EarlyStopping, FineTuner, FitConfig
from fastft.errors import DataError, FastFTValueError
from fastft.model import surgery
from fastft.train.config import monitor_mode

from helpers.data import labelled

pytestmark = pytest.mark.usefixtures("fresh_registry")


def mlp(seed=0, *extra: nn.Module):
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(6, 16), nn.ReLU(), *extra, nn.Linear(16, 3))


def data(n=48, seed=1):
    return labelled(n, classes=3, seed=seed)


def tuner(model=None, **kw):
    kw.setdefault("num_classes", 3)
    kw.setdefault("cache", "host")
    return FineTuner(model or mlp(), cache_dtype="fp32", verbose=False, **kw)


def head_state(ft):
    return {k: v.clone() for k, v in ft.tuned.trainable_state().items()}


def caught(fn, *args, **kwargs):
    """Run ``fn`` and return the warnings it raised (all of them recorded)."""
    with warnings.catch_warnings(record=True) as rec:
        warnings.simplefilter("always")
        fn(*args, **kwargs)
    return rec


# ---------------------------------------------------------------------------- 1. early stopping
def test_auto_mode_maximises_scores_and_minimises_losses():
    for name in ("val_accuracy", "accuracy", "val_acc", "val_macro_f1", "val_auc", "val_top5"):
        assert monitor_mode(name) == "max", name
    for name in ("val_loss", "loss"):
        assert monitor_mode(name) == "min", name
    assert monitor_mode("val_accuracy", "min") == "min"
    assert EarlyStopping(monitor="val_accuracy").best == -math.inf
    assert EarlyStopping(monitor="val_loss").best == math.inf
    with pytest.raises(FastFTValueError, match="mode"):
        EarlyStopping(mode="highest")


def test_val_accuracy_rising_then_falling_keeps_the_highest_epoch():
    """Fails if: accuracy is minimised (stops after epoch 3 and restores epoch 1)."""
    X, y = data()
    ft = tuner()
    scripted = [0.30, 0.50, 0.70, 0.40, 0.35, 0.30, 0.20, 0.10]
    snapshots = {}

    def script(tuner_, record):  # the accuracy a user would see rise, then fall
        record["val_accuracy"] = scripted[record["epoch"] - 1]
        snapshots[record["epoch"]] = head_state(tuner_)

    stopping = EarlyStopping(patience=2, monitor="val_accuracy")
    history = ft.fit(
        (X, y), (X, y), epochs=8, batch_size=8, lr=0.05, early_stopping=stopping, callbacks=[script]
    )
    assert history.column("epoch") == [1, 2, 3, 4, 5]  # two epochs below 0.70, then stop
    assert stopping.best == 0.70
    for name, want in snapshots[3].items():
        torch.testing.assert_close(ft.tuned.trainable_state()[name], want, rtol=0, atol=0)
    assert any(not torch.equal(ft.tuned.trainable_state()[n], t) for n, t in snapshots[5].items())


def test_early_stopping_state_resumes_and_reads_old_checkpoints():
    stop = EarlyStopping(patience=3, monitor="val_accuracy")
    module = nn.Linear(2, 2)
    stop.step({"val_accuracy": 0.6}, module)
    stop.step({"val_accuracy": 0.5}, module)
    again = EarlyStopping(patience=3, monitor="val_accuracy")
    again.load_state_dict(stop.state_dict())
    assert (again.best, again.step({"val_accuracy": 0.55}, module)) == (0.6, False)
    assert again.step({"val_accuracy": 0.55}, module)  # third epoch without improvement
    # A checkpoint from before ``mode``: a loss monitor goes on; an accuracy one starts over
    # (its kept best was the lowest accuracy).
    old = {"best": 0.25, "bad": 1, "state": None}
    on_loss = EarlyStopping(monitor="val_loss")
    on_loss.load_state_dict(old)
    assert on_loss.best == 0.25
    on_acc = EarlyStopping(monitor="val_accuracy")
    on_acc.load_state_dict(old)
    assert on_acc.best == -math.inf


def test_an_instance_given_to_two_fits_counts_each_afresh():
    """Fails if: the second fit compares its epochs with the first fit's best loss."""
    X, y = data()
    ft = tuner()
    losses = iter([1.0, 0.5, 0.9, 0.8, 0.7])  # the second fit improves on itself only

    def script(t, record):
        record["loss"] = next(losses)

    stopping = EarlyStopping(patience=1, monitor="loss")
    ft.fit((X, y), epochs=2, batch_size=8, early_stopping=stopping, callbacks=[script])
    second = ft.fit((X, y), epochs=3, batch_size=8, early_stopping=stopping, callbacks=[script])
    assert second.column("loss") == [0.9, 0.8, 0.7] and stopping.best == 0.7


# ---------------------------------------------------------------------------- 2. dtype, device
def test_new_layers_follow_a_bf16_model_and_train():
    X, y = data()
    ft = tuner(mlp().to(torch.bfloat16), hidden=[8])
    new = [p for n, p in ft.model.named_parameters() if p.requires_grad]
    assert new and {p.dtype for p in new} == {torch.bfloat16}
    history = ft.fit((X.to(torch.bfloat16), y), epochs=2, batch_size=8, lr=0.01)
    assert all(math.isfinite(r["loss"]) for r in history)
    assert ft.predict(X[:4].to(torch.bfloat16)).dtype == torch.bfloat16
    assert {p.dtype for p in ft.tuned.new_head().parameters()} == {torch.bfloat16}  # sweeps


def test_surgery_makes_new_layers_in_the_model_dtype_and_device():
    half = mlp().half()
    surgery.replace_head(half, module=nn.Linear(16, 5))
    assert half[-1].weight.dtype == torch.float16
    surgery.insert_layers(half, "1", nn.Linear(16, 16))  # after a ReLU: the model's dtype
    assert half.get_submodule("2").weight.dtype == torch.float16
    wrapped = surgery.append_head(nn.Sequential(nn.Linear(4, 4)).half(), nn.Linear(4, 2))
    assert wrapped.head.weight.dtype == torch.float16
    on_meta = mlp().to("meta")  # a model on another device: the new layers go there
    surgery.replace_head(on_meta, module=nn.Linear(16, 5))
    surgery.insert_layers(on_meta, "0", nn.Linear(16, 16))
    assert {p.device.type for p in on_meta.parameters()} == {"meta"}


@pytest.mark.parametrize(
    ("model_dtype", "data_dtype", "names"),
    [
        (torch.bfloat16, torch.float32, ("float32", "bfloat16", "X.to(torch.bfloat16)")),
        (torch.bfloat16, torch.float64, ("float64", "bfloat16", "model.to(torch.float64)")),
        (torch.float32, torch.float64, ("float64", "float32", "X.to(torch.float32)")),
    ],
)
def test_data_of_another_dtype_than_the_model_is_a_data_error(model_dtype, data_dtype, names):
    X, y = data()
    for hidden in ([], [8]):
        ft = tuner(mlp().to(model_dtype), hidden=hidden)
        with pytest.raises(DataError) as info:
            ft.fit((X.to(data_dtype), y), epochs=1, batch_size=8)
        for name in names:
            assert name in str(info.value)


def test_predict_on_data_of_another_dtype_is_a_data_error():
    X, y = data()
    ft = tuner(mlp().to(torch.bfloat16))
    ft.fit((X.to(torch.bfloat16), y), epochs=1, batch_size=8)
    with pytest.raises(DataError, match="inputs are float32 but the model's weights are bfloat16"):
        ft.predict(X[:4])


# ---------------------------------------------------------------------------- 3. evaluate
def test_evaluate_uses_its_own_batch_size_after_fit():
    X, y = data(40)
    ft = tuner()
    ft.fit((X, y), epochs=1, batch_size=16)
    sizes = []
    handle = ft.tail.register_forward_hook(lambda m, args, out: sizes.append(args[0].shape[0]))
    try:
        ft.evaluate((X, y), batch_size=8)
    finally:
        handle.remove()
    assert sizes == [8] * 5


# ---------------------------------------------------------------------------- 4. fit twice
def test_fit_again_continues_training_and_numbering():
    X, y = data()
    ft = tuner()
    first = ft.fit((X, y), epochs=3, batch_size=8, lr=0.05)
    trained = head_state(ft)
    seen = []
    second = ft.fit(
        (X, y),
        epochs=3,
        batch_size=8,
        lr=1e-12,  # a negligible step: the second fit starts from the first's weights
        callbacks=[lambda t, r: seen.append(head_state(t))],
    )
    assert first.column("epoch") == [1, 2, 3]
    assert second.column("epoch") == [4, 5, 6]
    assert ft.history.column("epoch") == [1, 2, 3, 4, 5, 6]
    for name, want in trained.items():
        torch.testing.assert_close(seen[0][name], want, rtol=0, atol=1e-6)


class Interrupt(Exception):
    pass


def test_a_resumed_second_fit_numbers_its_epochs_after_the_first(tmp_path):
    X, y = data()
    ckpt = str(tmp_path / "run.ckpt")

    def crash(t, record):
        if record["epoch"] == 4:
            raise Interrupt

    ft = tuner()
    ft.fit((X, y), epochs=2, batch_size=8)
    with pytest.raises(Interrupt):
        ft.fit((X, y), epochs=3, batch_size=8, checkpoint=ckpt, callbacks=[crash])
    # The job runs again: the same two calls, the second resumed.
    again = tuner()
    again.fit((X, y), epochs=2, batch_size=8)
    resumed = again.fit((X, y), epochs=3, batch_size=8, checkpoint=ckpt, resume=True)
    assert resumed.column("epoch") == [3, 4, 5]
    assert again.history.column("epoch") == [1, 2, 3, 4, 5]
    # Or only the resumed call, in a new process: the checkpoint's history says where it was.
    alone = tuner()
    assert alone.fit((X, y), epochs=3, batch_size=8, checkpoint=ckpt, resume=True).column(
        "epoch"
    ) == [3, 4, 5]


# ---------------------------------------------------------------------------- 5. momentum
def test_momentum_is_sgds_and_refused_with_adam():
    X, y = data()
    ft = tuner()
    for kw in ({"momentum": 0.5}, {"momentum": 0.5, "optimizer": "adam"}):
        with pytest.raises(FastFTValueError, match="sgd.*betas"):
            ft.fit((X, y), epochs=1, batch_size=8, **kw)
    with pytest.raises(FastFTValueError, match="betas"):
        ft.fit((X, y), config=FitConfig(momentum=0.0, batch_size=8))
    with pytest.raises(FastFTValueError, match="betas"):
        ft.fit_many([{"lr": 0.01}], (X, y), epochs=1, batch_size=8, momentum=0.5)
    ft.fit((X, y), epochs=1, batch_size=8, optimizer="sgd", momentum=0.5)
    assert ft.fit_config.momentum == 0.5
    assert FitConfig().momentum == 0.9
    doc = " ".join(FitConfig.__doc__.split())
    assert "momentum: SGD's momentum, 0.9 by default" in doc


# ---------------------------------------------------------------------------- 6. resume
def test_resume_without_a_checkpoint_warns_once_and_a_real_one_resumes_silently(tmp_path):
    X, y = data()
    ckpt = tmp_path / "run.ckpt"
    ft = tuner()
    rec = caught(ft.fit, (X, y), epochs=2, batch_size=8, checkpoint=str(ckpt), resume=True)
    said = [w for w in rec if "no checkpoint found" in str(w.message)]
    assert len(said) == 1 and str(tmp_path) in str(said[0].message)
    assert said[0].filename == __file__ and "starting from scratch" in str(said[0].message)
    assert ckpt.is_file() and ft.history.column("epoch") == [1, 2]

    def crash(t, record):
        if record["epoch"] == 2:
            raise Interrupt

    with pytest.raises(Interrupt):
        tuner().fit((X, y), epochs=3, batch_size=8, checkpoint=str(ckpt), callbacks=[crash])
    again = tuner()
    rec = caught(again.fit, (X, y), epochs=3, batch_size=8, checkpoint=str(ckpt), resume=True)
    assert not [w for w in rec if "checkpoint" in str(w.message)]
    assert again.history.column("epoch") == [1, 2, 3]  # epochs 1-2 from the checkpoint
    rec = caught(tuner().fit, (X, y), epochs=1, batch_size=8, resume=True)
    assert [w.filename for w in rec if "without checkpoint=" in str(w.message)] == [__file__]


# ---------------------------------------------------------------------------- 7. cache_dir
def test_auto_cache_in_memory_says_cache_dir_is_unused(tmp_path):
    X, y = data()
    ft = tuner(cache="auto", cache_dir=str(tmp_path))
    rec = caught(ft.fit, (X, y), (X[:8], y[:8]), epochs=1, batch_size=8)
    said = [w for w in rec if "is not used" in str(w.message)]
    assert len(said) == 1  # once, not again for the validation cache
    assert said[0].filename == __file__
    assert "cache='disk'" in str(said[0].message) and str(tmp_path) in str(said[0].message)
    assert not list(tmp_path.iterdir())  # indeed nothing written there
    for quiet in (tuner(cache="disk", cache_dir=str(tmp_path)), tuner(cache="auto")):
        rec = caught(quiet.fit, (X, y), epochs=1, batch_size=8)
        assert not [w for w in rec if "is not used" in str(w.message)]


# ---------------------------------------------------------------------------- 8. train mode
class Noisy(nn.Module):
    """A module of one's own with a train-mode behaviour (it overrides train())."""

    def train(self, mode=True):
        return super().train(mode)

    def forward(self, x):
        return x


def eval_mode_warnings(ft, X, y, **kw):
    rec = caught(ft.fit, (X, y), epochs=1, batch_size=8, **kw)
    rec += caught(ft.fit, (X, y), epochs=1, batch_size=8, **kw)
    return [w for w in rec if "eval mode" in str(w.message)]


@pytest.mark.parametrize(
    "extra",
    [
        lambda: [],
        lambda: [nn.Dropout(0.0)],
        lambda: [nn.BatchNorm1d(16, track_running_stats=False)],
    ],
    ids=["linear-relu", "dropout-0", "batchnorm-without-statistics"],
)
def test_no_train_mode_warning_when_the_mode_changes_nothing(extra):
    X, y = data()
    assert not eval_mode_warnings(tuner(mlp(0, *extra())), X, y)


@pytest.mark.parametrize(
    "extra",
    [lambda: nn.Dropout(0.3), lambda: nn.BatchNorm1d(16), Noisy],
    ids=["dropout", "batchnorm", "own-train"],
)
def test_train_mode_warning_once_per_tuner_at_the_users_line(extra):
    X, y = data()
    said = eval_mode_warnings(tuner(mlp(0, extra())), X, y)
    assert len(said) == 1 and "'2'" in str(said[0].message)
    assert said[0].filename == __file__
    model = mlp(0, extra())
    model.eval()  # said to be meant: quiet
    assert not eval_mode_warnings(tuner(model), X, y)


def test_a_schedule_warns_once_too():
    X, y = labelled(48, classes=3, seed=1)
    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Linear(6, 16), nn.Dropout(0.2), nn.Linear(16, 16), nn.ReLU(), nn.Linear(16, 3)
    )
    ft = tuner(model)
    rec = caught(ft.fit, (X, y), epochs=3, batch_size=8, unfreeze=[(1, 1), (2, 2)])
    assert len([w for w in rec if "eval mode" in str(w.message)]) == 1


def test_fastft_split_still_warns_for_its_own_callers():
    model = mlp(0, nn.Dropout(0.5))
    surgery.replace_head(model, 3)
    surgery.freeze(model, except_new=True)
    rec = caught(fastft.split, model, torch.randn(4, 6))
    assert [w.filename for w in rec if "eval mode" in str(w.message)] == [__file__]
