"""evaluate's metrics, fit_many, save/load of an appended head and resume, against the naive
reference (:mod:`helpers.naive_reference`) and metrics computed here, independently.

- ``evaluate`` reports accuracy, top-5 (more than 5 classes) and macro-F1 for ``'ce'``, and
  per-label and subset accuracy for ``'bce'``; each is computed here with plain Python loops
  from the *reference* model's logits.
- ``fit_many`` "sweeps lr, weight_decay, hidden, seed and dropout; each head equals its own
  fit to 1e-5" (README): each head against its own fit and against the reference.
- ``FineTuner.load`` of a tuner whose head was appended to an encoder without a classifier
  (FineTuner's own append, and ``fastft.surgery.append_head`` by hand) predicts what the
  saved one and the reference predict.
- A fit interrupted and resumed from its checkpoint ends with the uninterrupted reference's
  weights (dropout, onecycle: the random state and the schedule go on where they stopped).
"""

from __future__ import annotations

import pytest
import torch
from torch import nn
from torch.nn import functional as F

import fastft
from fastft import FineTuner

from helpers.data import mlp_data, token_data
from helpers.models import make_dict_encoder, make_mlp
from helpers.naive_reference import naive_fit, new_layers

pytestmark = pytest.mark.filterwarnings(
    "ignore:fastft runs the frozen layers in eval mode:UserWarning"  # models arrive in train mode
)

ATOL = 1e-5
SEED, DROPOUT_SEED = 3, 11
FIT = dict(epochs=3, batch_size=16, lr=0.01, weight_decay=0.01)


def frozen(module: nn.Module) -> nn.Module:
    for p in module.parameters():
        p.requires_grad_(False)
    return module


def mlp_reference(k: int, hidden=(8,), dropout=0.2, seed=SEED) -> tuple[nn.Module, nn.Module]:
    head = nn.Sequential(*new_layers(16, k, list(hidden), dropout=dropout, seed=seed))
    return nn.Sequential(frozen(make_mlp()[:5]), head), head


def tuner(**kw) -> FineTuner:
    settings = dict(seed=SEED, cache_dtype="fp32", verbose=False)
    return FineTuner(make_mlp(), **{**settings, **kw})


def assert_same(got: nn.Module, want: nn.Module, atol: float = ATOL) -> None:
    g, w = list(got.state_dict().items()), list(want.state_dict().items())
    assert [t.shape for _, t in g] == [t.shape for _, t in w] and g
    for (name, a), (_, b) in zip(g, w):
        torch.testing.assert_close(a, b, rtol=0, atol=atol, msg=name)


# ---------------------------------------------------------------------------- evaluate
def seven_classes(n: int, seed: int):
    X, _ = mlp_data(n, seed=seed)
    score = X[:, 0] + 0.5 * X[:, 1] - X[:, 2]
    return X, torch.bucketize(score, torch.tensor([-1.5, -0.8, -0.3, 0.3, 0.8, 1.5]))


def test_evaluate_reports_top5_and_macro_f1_of_the_reference(tmp_path):
    """7 classes: accuracy, top-5 and macro-F1 of evaluate(val) equal those counted here from
    the reference model's logits. Class 6 occurs in no label (and so is never predicted):
    macro-F1 averages over the classes in the labels or the predictions only.

    Fails if: top-5 is counted as top-4 here, or macro-F1 averages over all 7 classes."""
    (X, y), (Xv, yv) = seven_classes(110, 1), seven_classes(60, 2)
    train, val = (X[y != 6], y[y != 6]), (Xv[yv != 6], yv[yv != 6])
    fit = dict(FIT, epochs=5, lr=0.05)
    ft = tuner(num_classes=7, hidden=[8], dropout=0.2, cache_dir=str(tmp_path))
    ref, head = mlp_reference(7)
    torch.manual_seed(DROPOUT_SEED)
    ft.fit(train, **fit)
    torch.manual_seed(DROPOUT_SEED)
    naive_fit(ref, *train, train_modules=[head], seed=SEED, **fit)
    metrics = ft.evaluate(val)

    with torch.no_grad():
        logits = ref.eval()(val[0])
    labels = val[1].tolist()
    rows = logits.tolist()
    ranked = [sorted(range(7), key=lambda c: -row[c]) for row in rows]
    preds = [r[0] for r in ranked]
    top5 = sum(lab in r[:5] for lab, r in zip(labels, ranked)) / len(labels)
    f1s = []
    for c in sorted(set(labels) | set(preds)):
        tp = sum(p == c and t == c for p, t in zip(preds, labels))
        fp = sum(p == c and t != c for p, t in zip(preds, labels))
        fn = sum(p != c and t == c for p, t in zip(preds, labels))
        f1s.append(2 * tp / (2 * tp + fp + fn))
    want = {
        "loss": F.cross_entropy(logits, val[1]).item(),
        "accuracy": sum(p == t for p, t in zip(preds, labels)) / len(labels),
        "top5": top5,
        "macro_f1": sum(f1s) / len(f1s),
    }
    assert set(metrics) == set(want)
    assert metrics == pytest.approx(want, abs=ATOL)
    assert want["accuracy"] < want["top5"] < 1  # the three metrics tell different things
    assert 6 not in preds and len(f1s) < 7


def test_evaluate_reports_multi_label_metrics_of_the_reference(tmp_path):
    """loss="bce": per-label accuracy (of logit > 0) and subset accuracy (all labels right).

    Fails if: subset accuracy is counted here as any-label-right."""
    X, _ = mlp_data(130, seed=4)
    y = torch.stack([X[:, 0] > 0, X[:, 1] > 0, X[:, 0] + X[:, 2] > 0, X[:, 3] > 1], 1).float()
    train, val = (X[:90], y[:90]), (X[90:], y[90:])
    ft = tuner(num_classes=4, hidden=[8], dropout=0.2, cache_dir=str(tmp_path))
    ref, head = mlp_reference(4)
    fit = dict(FIT, loss="bce", epochs=5, lr=0.03)
    torch.manual_seed(DROPOUT_SEED)
    ft.fit(train, **fit)
    torch.manual_seed(DROPOUT_SEED)
    naive_fit(ref, *train, train_modules=[head], seed=SEED, **fit)
    metrics = ft.evaluate(val)

    with torch.no_grad():
        logits = ref.eval()(val[0])
    hits = [
        [(score > 0) == (target > 0.5) for score, target in zip(row, truth)]
        for row, truth in zip(logits.tolist(), val[1].tolist())
    ]
    want = {
        "loss": F.binary_cross_entropy_with_logits(logits, val[1]).item(),
        "label_accuracy": sum(map(sum, hits)) / (len(hits) * 4),
        "subset_accuracy": sum(all(h) for h in hits) / len(hits),
    }
    assert metrics == pytest.approx(want, abs=ATOL)
    assert want["subset_accuracy"] < want["label_accuracy"]


# ---------------------------------------------------------------------------- fit_many
SWEEP = [
    {"lr": 0.01, "hidden": [8], "dropout": 0.2},
    {"lr": 0.02, "weight_decay": 0.05, "hidden": [8], "dropout": 0.3},
    {"lr": 0.01, "hidden": [6]},
    {"lr": 0.005, "hidden": [8]},
]


def test_fit_many_equals_separate_fits_and_the_reference(tmp_path):
    """Four heads in one pass (two of them with dropout, two vectorized together) against
    four separate fits and four reference fits: weights and per-epoch val metrics.

    Fails if: the reference of each head gets another head's lr, or (before the fix of the
    engine) dropout heads of one sweep draw their masks from one shared stream."""
    X, y = mlp_data(110)
    train, val = (X[:80], y[:80]), (X[80:], y[80:])
    fit = dict(epochs=3, batch_size=16)
    ft = tuner(num_classes=3, hidden=[8], cache_dir=str(tmp_path))
    torch.manual_seed(DROPOUT_SEED)
    sweep = ft.fit_many(SWEEP, train, val=val, keep_best=False, **fit)
    for config, head, history in zip(SWEEP, sweep.heads, sweep.histories):
        options = dict(hidden=config["hidden"], dropout=config.get("dropout", 0.0))
        hyper = dict(lr=config["lr"], weight_decay=config.get("weight_decay", 0.0))
        solo = tuner(num_classes=3, cache_dir=str(tmp_path), **options)
        torch.manual_seed(DROPOUT_SEED)
        solo.fit(train, val, **fit, **hyper)
        ref, ref_head = mlp_reference(3, **options)
        torch.manual_seed(DROPOUT_SEED)
        naive_fit(ref, *train, train_modules=[ref_head], seed=SEED, **fit, **hyper)
        assert_same(head, solo.model[5])
        assert_same(head, ref_head)
        for key in ("loss", "val_loss", "val_accuracy", "val_macro_f1"):
            assert history.column(key) == pytest.approx(solo.history.column(key), abs=ATOL), key


@pytest.mark.xfail(
    strict=True,
    reason="fit_many trains every head on one batch order, the tuner's seed; a config's "
    "'seed' seeds only its head's initialisation, while its own fit (FineTuner(seed=s)) "
    "also draws the batch order from s. docs/guide.md: 'each head equals its own fit'.",
)
def test_fit_many_seed_config_equals_its_own_fit(tmp_path):
    """A config {"seed": 5} against FineTuner(seed=5).fit."""
    X, y = mlp_data(80)
    ft = tuner(num_classes=3, hidden=[8], cache_dir=str(tmp_path))
    sweep = ft.fit_many(
        [{"lr": 0.01}, {"lr": 0.01, "seed": 5}], (X, y), keep_best=False, epochs=3, batch_size=16
    )
    solo = tuner(num_classes=3, hidden=[8], seed=5, cache_dir=str(tmp_path))
    solo.fit((X, y), epochs=3, batch_size=16, lr=0.01)
    assert_same(sweep.heads[1], solo.model[5])


# ---------------------------------------------------------------------------- save / load
class EncoderThenHead(nn.Module):
    """What appending a head to a sentence encoder means, written by hand."""

    def __init__(self, encoder: nn.Module, head: nn.Module):
        super().__init__()
        self.encoder, self.head = encoder, head

    def forward(self, batch):
        return self.head(self.encoder(batch)["sentence_embedding"])


def appended_layers(seed: int) -> list[nn.Module]:
    torch.manual_seed(seed)
    return [nn.Linear(16, 8), nn.ReLU(), nn.Dropout(0.2), nn.Linear(8, 3)]


@pytest.mark.parametrize("how", ["finetuner", "surgery"])
def test_load_of_an_appended_head_predicts_like_the_saved_tuner_and_the_reference(how, tmp_path):
    """A head appended to a dict-returning encoder (FineTuner's own append from num_classes,
    or surgery.append_head by hand), trained, saved, loaded on a fresh encoder.

    Fails if: the reference reads another entry than 'sentence_embedding' (token_count), or
    the loaded tuner is given the reference's untrained head (surgery case)."""
    X, y = token_data(40)
    fit = dict(FIT, epochs=2, batch_size=20)  # few encoder calls: the reference runs it each batch
    if how == "finetuner":
        ft = FineTuner(
            make_dict_encoder(),
            num_classes=3,
            hidden=[8],
            dropout=0.2,
            seed=SEED,
            cache_dtype="fp32",
            cache_dir=str(tmp_path),
            verbose=False,
        )
        head = nn.Sequential(*new_layers(16, 3, [8], dropout=0.2, seed=SEED))
    else:
        edited = fastft.surgery.append_head(make_dict_encoder(), appended_layers(SEED))
        ft = FineTuner(
            edited, seed=SEED, cache_dtype="fp32", cache_dir=str(tmp_path), verbose=False
        )
        head = nn.Sequential(*appended_layers(SEED))
    ref = EncoderThenHead(frozen(make_dict_encoder()), head)
    torch.manual_seed(DROPOUT_SEED)
    ft.fit((X, y), **fit)
    torch.manual_seed(DROPOUT_SEED)
    naive_fit(ref, X, y, train_modules=[head], seed=SEED, **fit)

    path = str(tmp_path / "tuner.pt")
    ft.save(path)
    fresh = make_dict_encoder()
    if how == "surgery":  # the user redoes the edit on a fresh encoder, untrained layers
        fresh = fastft.surgery.append_head(fresh, appended_layers(SEED + 1))
    loaded = FineTuner.load(path, fresh, cache_dir=str(tmp_path), verbose=False)
    with torch.no_grad():
        want = ref.eval()(X)
    torch.testing.assert_close(loaded.predict(X), ft.predict(X), rtol=0, atol=0)
    torch.testing.assert_close(loaded.predict(X), want, rtol=0, atol=ATOL)
    torch.testing.assert_close(loaded.export()(X), want, rtol=0, atol=ATOL)
    untrained = EncoderThenHead(make_dict_encoder(), nn.Sequential(*appended_layers(SEED)))
    assert not torch.allclose(want, untrained.eval()(X), atol=1e-3)  # training moved the head


# ---------------------------------------------------------------------------- resume
class Interrupt(Exception):
    pass


def test_resumed_fit_ends_with_the_uninterrupted_reference(tmp_path):
    """A fit of 4 epochs (dropout, onecycle) stopped after epoch 2, the global generator then
    drawn from, and resumed from its checkpoint, equals the uninterrupted reference; a file
    written by save() is not a checkpoint and is refused.

    Fails if: the reference runs onecycle over 3 epochs, or draws dropout from another seed
    (as the resumed fit would without the checkpoint's random state)."""
    X, y = mlp_data(80)
    fit = dict(FIT, epochs=4, scheduler="onecycle")
    ckpt = str(tmp_path / "run.ckpt")

    def stop_after_two(tuner, record):
        if record["epoch"] == 2:
            raise Interrupt

    first = tuner(num_classes=3, hidden=[8], dropout=0.3, cache_dir=str(tmp_path))
    torch.manual_seed(DROPOUT_SEED)
    with pytest.raises(Interrupt):
        first.fit((X, y), checkpoint=ckpt, callbacks=[stop_after_two], **fit)
    torch.rand(1000)  # the process goes on drawing before the resume

    resumed = tuner(num_classes=3, hidden=[8], dropout=0.3, cache_dir=str(tmp_path))
    history = resumed.fit((X, y), checkpoint=ckpt, resume=True, **fit)
    ref, head = mlp_reference(3, dropout=0.3)
    torch.manual_seed(DROPOUT_SEED)
    losses = naive_fit(ref, X, y, train_modules=[head], seed=SEED, **fit)
    assert [r["loss"] for r in history] == pytest.approx(losses, abs=ATOL)
    assert_same(resumed.model[5], head)

    saved = str(tmp_path / "saved.pt")
    resumed.save(saved)
    again = tuner(num_classes=3, hidden=[8], dropout=0.3, cache_dir=str(tmp_path))
    with pytest.raises(fastft.FastFTValueError, match="is a saved model, not a training"):
        again.fit((X, y), checkpoint=saved, resume=True, **fit)
