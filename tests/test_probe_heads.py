"""The probe's heads against their references: a linear head equals ``fit`` with the same
settings, logistic regression matches scikit-learn's, kNN equals a brute-force search."""

from __future__ import annotations

import copy
import math

import numpy as np
import pytest
import torch
from torch import nn

import fastft
from fastft.probing.heads import Features, choose, linear_heads
from fastft.probing.knn import knn_head, knn_predict
from fastft.probing.logreg import logreg_head, logreg_path, predict
from fastft.probing.taps import TapStack, default_taps, pool


class Backbone(nn.Module):
    """An embedding and a stack of three blocks, returning [B, L, D] sequences."""

    def __init__(self):
        super().__init__()
        self.embed = nn.Linear(6, 12)
        self.blocks = nn.ModuleList([nn.Sequential(nn.Linear(12, 12), nn.Tanh()) for _ in range(3)])
        self.top = nn.Linear(12, 2)

    def forward(self, x):
        h = self.embed(x)
        for b in self.blocks:
            h = b(h)
        return self.top(h)


class UpTo(nn.Module):
    """What a user would fine-tune on: the backbone up to block ``k``, mean-pooled."""

    def __init__(self, backbone: Backbone, k: int):
        super().__init__()
        self.embed, self.blocks = backbone.embed, backbone.blocks[: k + 1]

    def forward(self, x):
        h = self.embed(x)
        for b in self.blocks:
            h = b(h)
        return h.mean(dim=1)


def _data(n=160, seed=0):
    g = torch.Generator().manual_seed(seed)
    X = torch.randn(n, 4, 6, generator=g)
    y = (X[:, :, 0].mean(1) > 0).long() + (X[:, :, 1].mean(1) > 0).long()
    return X, y


def test_default_taps_are_the_embedding_and_every_block():
    assert default_taps(Backbone()) == ["embed", "blocks.0", "blocks.1", "blocks.2"]


def test_pooling_of_sequences_and_maps():
    x = torch.arange(24.0).reshape(2, 3, 4)
    mask = torch.tensor([[1, 1, 0], [1, 0, 0]])
    assert torch.equal(pool(x, "cls", None, "t"), x[:, 0])
    assert torch.equal(pool(x, "mean", None, "t"), x.mean(1))
    assert torch.allclose(pool(x, "auto", mask, "t"), torch.stack([x[0, :2].mean(0), x[1, 0]]))
    maps = torch.randn(2, 5, 3, 3)
    assert torch.allclose(pool(maps, "auto", None, "t"), maps.mean(dim=(2, 3)))
    with pytest.raises(fastft.FastFTValueError, match="only pooling='mean'"):
        pool(maps, "cls", None, "t")


def test_a_tap_stack_stops_after_its_highest_tap():
    model = Backbone()
    calls = []
    model.blocks[2].register_forward_pre_hook(lambda m, a: calls.append("blocks.2"))
    stack = TapStack(model, ["embed", "blocks.1"], "mean")
    stack(torch.randn(3, 4, 6))  # the first call runs to the end: every tap runs once?
    assert calls == ["blocks.2"]
    out = stack(torch.randn(3, 4, 6))
    assert list(out) == ["embed", "blocks.1"] and calls == ["blocks.2"]
    assert out["blocks.1"].shape == (3, 12)


@pytest.mark.parametrize("grid", [([3e-3], [0.0]), ([1e-3, 3e-2], [0.0, 1e-2])])
def test_a_linear_head_equals_fit_with_the_same_settings(grid):
    """The chosen head of a grid trained together equals a FineTuner.fit of the backbone cut
    at the tap, with the chosen settings (same seed, batch order, features in fp32)."""
    torch.manual_seed(0)
    backbone = Backbone().eval()
    X, y = _data()
    Xt, yt = _data(60, seed=1)
    stack = TapStack(backbone, ["blocks.1"], "mean")
    kw = dict(dtype="fp32", tier="host", progress=False)
    feats = fastft.FeatureCache.build(stack, (X, y), **kw).gather(torch.arange(len(y)))[0]
    test = fastft.FeatureCache.build(stack, (Xt, yt), **kw).gather(torch.arange(len(yt)))[0]
    fit, val = torch.arange(0, 120), torch.arange(120, 160)
    f = Features(feats[fit], y[fit], feats[val], y[val], test, yt, 3)
    result = linear_heads(f, lrs=grid[0], weight_decays=grid[1], epochs=3, batch_size=32, seed=7)
    assert len(result.grid) == len(grid[0]) * len(grid[1])

    ft = fastft.FineTuner(
        UpTo(copy.deepcopy(backbone), 1), num_classes=3, cache_dtype="fp32", seed=7, verbose=False
    )
    ft.fit(
        (X[fit], y[fit]),
        epochs=3,
        batch_size=32,
        **{k: result.chosen[k] for k in ("lr", "weight_decay")},
    )
    ref = ft.export().head
    assert isinstance(ref, nn.Linear)
    torch.testing.assert_close(result.model.weight, ref.weight, atol=1e-5, rtol=0)
    torch.testing.assert_close(result.model.bias, ref.bias, atol=1e-5, rtol=0)
    with torch.no_grad():
        expected = (ft.predict(Xt).argmax(-1) == yt).float().mean().item()
    assert result.test_accuracy == pytest.approx(expected)


def test_the_choice_is_the_best_validation_score_then_the_lower_loss():
    assert choose([0.5, 0.9, 0.9], [1.0, 2.0, 1.5]) == 2
    assert choose([0.5, float("nan"), 0.7]) == 2
    assert choose([0.8, 0.8]) == 0


def _digits():
    from sklearn.datasets import load_digits

    d = load_digits()
    X = torch.tensor(d.data, dtype=torch.float32) / 16.0
    y = torch.tensor(d.target)
    perm = torch.randperm(len(y), generator=torch.Generator().manual_seed(0))
    return X[perm[:1200]], y[perm[:1200]], X[perm[1200:]], y[perm[1200:]]


@pytest.mark.parametrize("C", [0.01, 0.1, 1.0])
def test_logistic_regression_matches_scikit_learn(C):
    from sklearn.linear_model import LogisticRegression
    from threadpoolctl import threadpool_limits

    X, y, Xt, yt = _digits()
    ours = predict(logreg_path(X, y, [0.003, C], 10)[C], Xt)
    with threadpool_limits(1):  # BLAS threads fighting over a busy machine's cores: 30x slower
        sk = LogisticRegression(C=C, max_iter=5000, tol=1e-8).fit(X.numpy(), y.numpy())
    ours_acc = (ours == yt).float().mean().item()
    sk_acc = float((sk.predict(Xt.numpy()) == yt.numpy()).mean())
    assert abs(ours_acc - sk_acc) <= 0.005, (ours_acc, sk_acc)
    # the same optimum, not only the same accuracy: most predictions agree one by one
    assert (ours.numpy() == sk.predict(Xt.numpy())).mean() >= 0.99


def test_logistic_regression_chooses_C_on_validation_only():
    X, y, Xt, yt = _digits()
    f = Features(X[:900], y[:900], X[900:], y[900:], Xt, yt, 10)
    r = logreg_head(f, Cs=[0.001, 0.1, 10.0])
    assert [g["C"] for g in r.grid] == [0.001, 0.1, 10.0]
    best = max(r.grid, key=lambda g: g["val_accuracy"])
    assert r.chosen == {"C": best["C"]} and r.val_accuracy == best["val_accuracy"]
    # the weakest penalty fits digits far better than the strongest
    assert r.grid[0]["val_accuracy"] < r.grid[-1]["val_accuracy"]


def brute_force_knn(bank, labels, queries, k, num_classes, T=0.07):
    """One query at a time: every similarity, sorted by (-similarity, row), k votes."""
    bank = bank.double().numpy()
    bank = bank / np.linalg.norm(bank, axis=1, keepdims=True)
    out = []
    for q in queries.double().numpy():
        q = q / np.linalg.norm(q)
        sims = [float(np.dot(q, b)) for b in bank]
        order = sorted(range(len(bank)), key=lambda i: (-sims[i], i))[:k]
        votes = [0.0] * num_classes
        for i in order:
            votes[int(labels[i])] += math.exp(sims[i] / T)
        out.append(max(range(num_classes), key=lambda c: (votes[c], -c)))
    return torch.tensor(out)


def test_knn_equals_a_brute_force_search():
    g = torch.Generator().manual_seed(3)
    bank, queries = torch.randn(150, 8, generator=g), torch.randn(60, 8, generator=g)
    labels = torch.randint(0, 4, (150,), generator=g)
    ks = [1, 5, 20, 400]
    ours = knn_predict(bank, labels, queries, ks, 4, chunk=16)
    for k in ks:
        ref = brute_force_knn(bank, labels, queries, min(k, 150), 4)
        assert torch.equal(ours[k], ref), k
    # k matters: the predictions are not all the same
    assert not torch.equal(ours[1], ours[20])


def test_knn_chooses_k_on_validation_and_scores_test_once():
    g = torch.Generator().manual_seed(4)
    X = torch.randn(200, 5, generator=g)
    y = (X[:, 0] > 0).long()
    f = Features(X[:120], y[:120], X[120:160], y[120:160], X[160:], y[160:], 2)
    r = knn_head(f, ks=[1, 15])
    scores = {g["k"]: g["val_accuracy"] for g in r.grid}
    assert r.chosen["k"] == max(scores, key=lambda k: (scores[k], -k))
    ref = brute_force_knn(X[:120], y[:120], X[160:], r.chosen["k"], 2)
    assert r.test_accuracy == pytest.approx((ref == y[160:]).float().mean().item())


def test_taps_of_a_hugging_face_model_are_its_hidden_states():
    """BERT's embedding output and every layer's output, masked-mean pooled, equal
    ``output_hidden_states``; the classifier above the last tap runs only in the first call
    (the one that checks each tap runs once)."""
    from helpers.compat_models import CASES, require, text_batch

    require("transformers")
    case = next(c for c in CASES if c.family == "BERT" and c.library == "transformers")
    model = case.build().eval()
    ran = []
    model.classifier.register_forward_hook(lambda *a: ran.append(1))
    batch = text_batch(6)
    stack = TapStack(model, "blocks", "auto")
    assert stack.tap_list == ("bert.embeddings", "bert.encoder.layer.0", "bert.encoder.layer.1")
    with torch.no_grad():
        stack(batch)
        taps = stack(batch)
        assert ran == [1]
        hidden = model(**batch, output_hidden_states=True).hidden_states
    m = batch["attention_mask"].unsqueeze(-1).float()
    for (name, got), h in zip(taps.items(), hidden):
        torch.testing.assert_close(got, (h * m).sum(1) / m.sum(1), atol=1e-5, rtol=1e-5, msg=name)


def test_heads_refuse_grids_they_cannot_use():
    X, y = torch.randn(10, 3), torch.randint(0, 2, (10,))
    with pytest.raises(fastft.FastFTValueError, match="every C must be positive"):
        logreg_path(X, y, [0.0, 1.0], 2)
    with pytest.raises(fastft.FastFTValueError, match="ks must be positive"):
        knn_predict(X, y, X, [0], 2)
    with pytest.raises(fastft.FastFTValueError, match="at least one training row"):
        knn_predict(X[:0], y[:0], X, [1], 2)
