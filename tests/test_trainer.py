"""FineTuner against the oracle: naive frozen fine-tuning with the same batch order.

With an fp32 cache, one view and the same seed, training the new layers on cached
features must give the weights a plain PyTorch loop gives when it runs the frozen layers
every epoch (in eval mode) — for an MLP, a CNN with BatchNorm and a transformer encoder
with masked-mean pooling, with SGD and AdamW.
"""

from __future__ import annotations

import copy
import functools

import pytest
import torch
from torch import nn

import fastft
from fastft import FineTuner

from helpers.data import image_data, mlp_data, token_data
from helpers.models import make_mlp
from helpers.oracle import naive_finetune, trainable_state


class SmallCNN(nn.Module):
    def __init__(self):
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv2d(3, 8, 3, padding=1),
            nn.BatchNorm2d(8),
            nn.ReLU(),
            nn.Conv2d(8, 16, 3, padding=1, stride=2),
            nn.BatchNorm2d(16),
            nn.ReLU(),
        )
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(16, 10)

    def forward(self, x):
        return self.fc(self.pool(self.features(x)).flatten(1))


def make_cnn(seed=0):
    torch.manual_seed(seed)
    m = SmallCNN()
    # Give BatchNorm non-trivial running statistics, as a pretrained network has.
    m.train()
    with torch.no_grad():
        for _ in range(3):
            m(torch.randn(16, 3, 8, 8) * 2 + 0.5)
    return m


class TinyEncoder(nn.Module):
    """Token embedding → 2 transformer layers → masked-mean pooling → classifier."""

    def __init__(self, vocab=50, dim=16):
        super().__init__()
        self.embed = nn.Embedding(vocab, dim)
        self.layers = nn.ModuleList(
            nn.TransformerEncoderLayer(dim, 2, 32, dropout=0.1, batch_first=True) for _ in range(2)
        )
        self.classifier = nn.Linear(dim, 4)

    def forward(self, batch):
        ids, mask = batch["input_ids"], batch["attention_mask"]
        h = self.embed(ids)
        for layer in self.layers:
            h = layer(h, src_key_padding_mask=mask == 0)
        m = mask.unsqueeze(-1).to(h.dtype)
        pooled = (h * m).sum(1) / m.sum(1).clamp_min(1e-9)
        return self.classifier(pooled)


def make_encoder(seed=0):
    torch.manual_seed(seed)
    return TinyEncoder()


CASES = {
    "mlp": (make_mlp, functools.partial(mlp_data, 90), dict(num_classes=4, hidden=[8])),
    "cnn_batchnorm": (
        make_cnn,
        functools.partial(image_data, 70),
        dict(num_classes=5, hidden=[12]),
    ),
    "transformer_masked_mean": (
        make_encoder,
        functools.partial(token_data, 60),
        dict(num_classes=3),
    ),
}


@pytest.mark.parametrize("optimizer", ["sgd", "adamw"])
@pytest.mark.parametrize("case", sorted(CASES))
def test_fastft_equals_naive_frozen_finetuning(case, optimizer, tmp_path):
    make_model, make_data, kwargs = CASES[case]
    X, y = make_data()
    ft = FineTuner(
        make_model(), cache_dtype="fp32", seed=3, cache_dir=str(tmp_path), verbose=False, **kwargs
    )
    ft.prepare(fastft.data.index_select(X, torch.arange(4)))
    naive_model = copy.deepcopy(ft.model)  # same edits, same initial new weights
    initial = trainable_state(ft.model)

    fit_args = dict(
        epochs=3,
        batch_size=16,
        lr=0.05 if optimizer == "sgd" else 0.01,
        optimizer=optimizer,
        weight_decay=0.01,
    )
    ft.fit((X, y), **fit_args)
    naive_finetune(naive_model, X, y, seed=3, **fit_args)

    got, want = trainable_state(ft.model), trainable_state(naive_model)
    assert set(got) == set(want) and got
    for name in want:
        torch.testing.assert_close(got[name], want[name], rtol=0, atol=1e-5, msg=name)
    # The new layers actually moved: the oracle is not comparing two untrained heads.
    assert max((got[n] - initial[n]).abs().max().item() for n in got) > 1e-3


@pytest.mark.filterwarnings("ignore::fastft.errors.CacheReuseWarning")  # instrumentation state
def test_frozen_part_runs_once_per_sample_not_per_epoch(tmp_path):
    X, y = mlp_data(90)
    model = make_mlp()
    calls = {"rows": 0}
    first = model[0]
    first.register_forward_hook(
        lambda m, i, o: calls.__setitem__("rows", calls["rows"] + o.shape[0])
    )
    ft = FineTuner(model, num_classes=3, cache_dtype="fp16", cache_dir=str(tmp_path), verbose=False)
    ft.fit((X, y), epochs=5, batch_size=32)
    # One pass over the 90 samples plus the small probe batches of the split's parity check.
    assert len(X) <= calls["rows"] <= len(X) + 16
    assert len(ft.history) == 5 and ft.history[-1]["loss"] < ft.history[0]["loss"]


def test_predict_export_and_evaluate_agree(tmp_path):
    X, y = image_data(70)
    ft = FineTuner(
        make_cnn(),
        num_classes=5,
        hidden=[8],
        cache_dtype="fp32",
        cache_dir=str(tmp_path),
        verbose=False,
    )
    ft.fit((X, y), epochs=2, batch_size=16)
    logits = ft.predict(X)
    plain = ft.export()
    assert not any(
        isinstance(m, (fastft.FrozenPrefix, fastft.TrainableTail)) for m in plain.modules()
    )
    with torch.no_grad():
        torch.testing.assert_close(plain(X), logits, rtol=0, atol=1e-5)
    metrics = ft.evaluate((X, y))
    assert metrics["accuracy"] == pytest.approx(
        (logits.argmax(1) == y).double().mean().item(), abs=1e-9
    )
    assert set(metrics) >= {"loss", "accuracy", "macro_f1"}


def test_save_load_round_trip(tmp_path):
    X, y = mlp_data(90)
    ft = FineTuner(
        make_mlp(),
        num_classes=4,
        hidden=[8],
        cache_dtype="fp32",
        cache_dir=str(tmp_path),
        verbose=False,
    )
    ft.fit((X, y), epochs=2, batch_size=32)
    path = tmp_path / "ft.pt"
    ft.save(str(path))
    loaded = FineTuner.load(str(path), make_mlp(), cache_dir=str(tmp_path), verbose=False)
    torch.testing.assert_close(loaded.predict(X), ft.predict(X), rtol=0, atol=0)
    assert loaded.history == ft.history


def test_resumed_fit_equals_uninterrupted(tmp_path):
    X, y = image_data(70)
    args = dict(epochs=4, batch_size=16, lr=0.01, scheduler="cosine")

    full = FineTuner(
        make_cnn(), num_classes=5, cache_dtype="fp32", cache_dir=str(tmp_path), verbose=False
    )
    full.fit((X, y), **args)

    class Interrupt(Exception):
        pass

    def crash_after_two(ft, record):
        if record["epoch"] == 2:
            raise Interrupt

    ckpt = str(tmp_path / "ckpt.pt")
    first = FineTuner(
        make_cnn(), num_classes=5, cache_dtype="fp32", cache_dir=str(tmp_path), verbose=False
    )
    with pytest.raises(Interrupt):
        first.fit((X, y), callbacks=[crash_after_two], checkpoint=ckpt, **args)
    resumed = FineTuner(
        make_cnn(), num_classes=5, cache_dtype="fp32", cache_dir=str(tmp_path), verbose=False
    )
    resumed.fit((X, y), checkpoint=ckpt, resume=True, **args)
    for name, want in trainable_state(full.model).items():
        torch.testing.assert_close(trainable_state(resumed.model)[name], want, rtol=0, atol=1e-6)
    assert [r["epoch"] for r in resumed.history] == [1, 2, 3, 4]


def test_validation_metrics_and_early_stopping(tmp_path):
    X, y = mlp_data(120)
    ft = FineTuner(make_mlp(), num_classes=4, cache_dir=str(tmp_path), verbose=False)
    hist = ft.fit(
        (X[:90], y[:90]),
        val=(X[90:], y[90:]),
        epochs=40,
        batch_size=16,
        lr=0.2,
        optimizer="sgd",
        early_stopping=2,
    )
    assert "val_accuracy" in hist[-1] and "val_macro_f1" in hist[-1]
    assert len(hist) < 40  # stopped early


def test_sweep_equals_separate_fits(tmp_path):
    X, y = mlp_data(90)
    configs = [{"lr": 0.01}, {"lr": 0.003, "weight_decay": 0.1}, {"lr": 0.01, "hidden": [6]}]
    ft = FineTuner(
        make_mlp(),
        num_classes=4,
        hidden=[8],
        cache_dtype="fp32",
        cache_dir=str(tmp_path),
        verbose=False,
    )
    result = ft.fit_many(configs, (X, y), epochs=3, batch_size=16, keep_best=False)
    assert len(result.histories) == 3 and 0 <= result.best_index < 3
    for cfg, head, hist in zip(configs, result.heads, result.histories):
        solo = FineTuner(
            make_mlp(),
            num_classes=4,
            hidden=cfg.get("hidden", [8]),
            cache_dtype="fp32",
            cache_dir=str(tmp_path),
            verbose=False,
        )
        solo.fit(
            (X, y), epochs=3, batch_size=16, lr=cfg["lr"], weight_decay=cfg.get("weight_decay", 0.0)
        )
        solo_head = solo.model[-1]
        for (n, p), (_, q) in zip(head.named_parameters(), solo_head.named_parameters()):
            torch.testing.assert_close(p.detach(), q.detach(), rtol=0, atol=1e-5, msg=n)
        assert hist[-1]["loss"] == pytest.approx(solo.history[-1]["loss"], abs=1e-5)


def test_sweep_keep_best_installs_the_best_head(tmp_path):
    X, y = mlp_data(90)
    ft = FineTuner(
        make_mlp(),
        num_classes=4,
        hidden=[8],
        cache_dtype="fp32",
        cache_dir=str(tmp_path),
        verbose=False,
    )
    result = ft.fit_many([{"lr": 1e-5}, {"lr": 0.05}], (X, y), epochs=4, batch_size=16)
    assert result.best_index == 1
    out = ft.predict(X)
    with torch.no_grad():
        torch.testing.assert_close(ft.export()(X), out, rtol=0, atol=1e-6)


class TestBadInput:
    def test_labels_out_of_range(self, tmp_path):
        X, y = mlp_data(90)
        y = y.clone()
        y[7] = 9
        ft = FineTuner(make_mlp(), num_classes=4, cache_dir=str(tmp_path), verbose=False)
        with pytest.raises(fastft.DataError, match="label 9 of sample 7"):
            ft.fit((X, y), epochs=1)

    def test_float_labels_for_classification(self, tmp_path):
        X, y = mlp_data(90)
        ft = FineTuner(make_mlp(), num_classes=4, cache_dir=str(tmp_path), verbose=False)
        with pytest.raises(fastft.DataError, match="integer class labels"):
            ft.fit((X, y.float()), epochs=1)

    def test_num_classes_below_two(self):
        with pytest.raises(fastft.FastFTValueError, match="num_classes must be ≥ 2"):
            FineTuner(make_mlp(), num_classes=1)

    def test_mismatched_lengths(self, tmp_path):
        X, y = mlp_data(90)
        ft = FineTuner(make_mlp(), num_classes=4, cache_dir=str(tmp_path), verbose=False)
        with pytest.raises(fastft.DataError):
            ft.fit((X, y[:-3]), epochs=1)

    def test_empty_dataset(self, tmp_path):
        ft = FineTuner(make_mlp(), num_classes=4, cache_dir=str(tmp_path), verbose=False)
        with pytest.raises(fastft.DataError, match="empty"):
            ft.fit((torch.empty(0, 12), torch.empty(0, dtype=torch.long)), epochs=1)

    @pytest.mark.parametrize("bs", [0, -4])
    def test_batch_size(self, bs, tmp_path):
        X, y = mlp_data(90)
        ft = FineTuner(make_mlp(), num_classes=4, cache_dir=str(tmp_path), verbose=False)
        with pytest.raises(fastft.FastFTValueError, match="batch_size must be a positive integer"):
            ft.fit((X, y), batch_size=bs)

    def test_nan_in_frozen_features_names_the_sample(self, tmp_path):
        X, y = mlp_data(90)
        X = X.clone()
        X[13, 2] = float("nan")
        ft = FineTuner(make_mlp(), num_classes=4, cache_dir=str(tmp_path), verbose=False)
        with pytest.raises(fastft.DataError, match="13"):
            ft.fit((X, y), epochs=1)

    def test_predict_before_fit(self):
        ft = FineTuner(make_mlp(), num_classes=4, verbose=False)
        with pytest.raises(fastft.NotFittedError, match="call fit"):
            ft.predict(torch.randn(2, 12))

    def test_unknown_optimizer(self, tmp_path):
        X, y = mlp_data(90)
        ft = FineTuner(make_mlp(), num_classes=4, cache_dir=str(tmp_path), verbose=False)
        with pytest.raises(fastft.FastFTValueError, match="unknown optimizer 'adagrad'"):
            ft.fit((X, y), optimizer="adagrad")
