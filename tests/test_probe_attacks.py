"""``fastft.probe`` on what a new user passes by mistake: empty grids, labels that are not
class indices, too little data for a validation split, a zero temperature, one head named
as a string; and the digits command's taps (each a distinct feature)."""

from __future__ import annotations

import itertools
import warnings

import pytest
import torch
from torch import nn

import fastft
from fastft.probing.cli import DIGITS_TAPS

KW = dict(taps=["0", "2"], cache="host", cache_dtype="fp32", progress=False)


def _task(n: int = 120, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    X = torch.randn(n, 6, generator=g)
    return X, X[:, :3].argmax(1)


def _backbone():
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(6, 16), nn.ReLU(), nn.Linear(16, 16))


@pytest.mark.parametrize(
    "heads, grid", [("logreg", "Cs"), ("knn", "ks"), ("mlp", "lrs"), ("linear", "weight_decays")]
)
def test_an_empty_grid_of_a_chosen_head_is_refused(heads, grid):
    X, y = _task()
    with pytest.raises(fastft.FastFTValueError, match=f"{grid} is empty, but the {heads} heads"):
        fastft.probe(
            {"m": _backbone()}, (X, y), (X[:60], y[:60]), heads=[heads], **{grid: []}, **KW
        )


def test_an_empty_grid_of_a_head_not_chosen_is_fine():
    X, y = _task()
    report = fastft.probe(
        {"m": _backbone()}, (X, y), (X[:60], y[:60]), heads=["knn"], Cs=[], lrs=[], **KW
    )
    assert {r.head for r in report.rows} == {"knn"}


def test_one_head_named_as_a_string():
    X, y = _task()
    report = fastft.probe(
        {"m": _backbone()}, (X, y), (X[:60], y[:60]), heads="logreg", Cs=[1.0], **KW
    )
    assert [r.head for r in report.rows] == ["logreg", "logreg"]


def test_labels_that_are_not_class_indices_are_refused():
    X, y = _task()
    with pytest.raises(fastft.FastFTValueError, match="labels include -1"):
        fastft.probe({"m": _backbone()}, (X, y - 1), (X, y), heads="knn", **KW)
    with pytest.raises(fastft.FastFTValueError, match="test labels are not whole numbers"):
        fastft.probe({"m": _backbone()}, (X, y), (X, y + 0.5), heads="knn", **KW)


def test_sparse_labels_predict_like_contiguous_ones():
    X, y = _task()
    Xt, yt = _task(60, seed=1)
    code = torch.tensor([3, 7, 9])
    kw = dict(KW, heads=["knn"], ks=[1, 5])
    dense = fastft.probe({"m": _backbone()}, (X, y), (Xt, yt), **kw)
    sparse = fastft.probe({"m": _backbone()}, (X, code[y]), (Xt, code[yt]), **kw)
    assert [r.test_accuracy for r in sparse.rows] == [r.test_accuracy for r in dense.rows]
    assert [r.chosen for r in sparse.rows] == [r.chosen for r in dense.rows]


def test_no_validation_rows_is_refused():
    X, y = _task()
    rows = torch.stack([(y == c).nonzero()[0, 0] for c in range(3)])  # one row per class
    with pytest.raises(fastft.FastFTValueError, match="no validation rows"):
        fastft.probe({"m": _backbone()}, (X[rows], y[rows]), (X, y), heads="knn", **KW)


@pytest.mark.parametrize("temperature", [0.0, -0.07])
def test_a_temperature_that_is_not_positive_is_refused(temperature):
    X, y = _task()
    with pytest.raises(fastft.FastFTValueError, match="temperature must be positive"):
        fastft.probe({"m": _backbone()}, (X, y), (X[:60], y[:60]), temperature=temperature, **KW)


def test_the_digits_taps_are_distinct_features():
    from fastft.bench.demo.digits import DigitsCNN

    torch.manual_seed(0)
    model = DigitsCNN(5).eval()
    with torch.no_grad():
        out = fastft.TapStack(model, DIGITS_TAPS, "mean")(torch.randn(8, 1, 8, 8))
    assert list(out) == DIGITS_TAPS
    for a, b in itertools.combinations(DIGITS_TAPS, 2):
        same = out[a].shape == out[b].shape and torch.allclose(out[a], out[b], atol=1e-6)
        assert not same, f"taps {a} and {b} give the same features"


def test_logistic_regression_warns_when_it_does_not_converge():
    from fastft.probing.logreg import logreg_path

    X, y = _task(200)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # well-conditioned features: solved, no warning
        logreg_path(X, y, [0.1, 10.0], 3)
    scaled = X * torch.tensor([1.0, 1e3, 1e-2, 1.0, 3e2, 1.0])  # ill-conditioned
    with pytest.warns(RuntimeWarning, match=r"did not converge in 20 L-BFGS iterations for C"):
        logreg_path(scaled, y, [0.1, 10.0], 3, max_iter=20)


def test_no_stale_heatmap_is_left_beside_a_new_report(tmp_path, monkeypatch):
    from fastft.probing import report as report_module

    X, y = _task()
    kw = dict(KW, heads=["knn"], ks=[3])
    fastft.probe({"m": _backbone()}, (X, y), (X[:60], y[:60]), out=tmp_path, **kw)
    assert (tmp_path / "probe_heatmap.png").exists()

    def no_matplotlib(*args):
        raise ImportError("no matplotlib")

    monkeypatch.setattr(report_module, "heatmap", no_matplotlib)
    with pytest.warns(UserWarning, match="no heatmap written"):
        again = fastft.probe({"m": _backbone()}, (X, y), (X[:60], y[:60]), out=tmp_path, **kw)
    assert "heatmap" not in again.files
    assert not (tmp_path / "probe_heatmap.png").exists()  # the old one would mislead


def test_a_nan_C_or_a_negative_weight_decay_is_refused():
    X, y = _task()
    for C in (float("nan"), float("inf")):  # inf would reach the JSON report as Infinity
        with pytest.raises(fastft.FastFTValueError, match="every C must be positive and finite"):
            fastft.probe({"m": _backbone()}, (X, y), (X[:60], y[:60]), heads="logreg", Cs=[C], **KW)
    with pytest.raises(fastft.FastFTValueError, match="weight decays must be finite and >= 0"):
        fastft.probe(
            {"m": _backbone()},
            (X, y),
            (X[:60], y[:60]),
            heads="linear",
            weight_decays=[0.0, -1.0],
            **KW,
        )


def test_the_markdown_report_states_the_protocol(tmp_path):
    X, y = _task(150)
    kw = dict(KW, heads=["knn"], ks=[3])
    report = fastft.probe({"m": _backbone()}, (X, y), (X[:40], y[:40]), shots=4, seed=3, **kw)
    files = report.write(tmp_path)
    text = open(files["markdown"]).read()
    p = report.protocol
    assert p["n_fit"] == 12 and p["n_train"] == 150 and p["n_test"] == 40
    assert "heads fit on 12 of 150 training rows, 4 per class (few-shot)" in text
    assert f"chosen on {p['n_val']} validation rows (val_fraction 0.2, seed 3)" in text
    assert "40 test rows scored once" in text


class Shared(nn.Module):
    """One layer applied at three depths (ALBERT shares its layer's weights this way)."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.inp, self.layer = nn.Linear(6, 8), nn.Sequential(nn.Linear(8, 8), nn.Tanh())

    def forward(self, x):
        h = self.inp(x)
        for _ in range(3):
            h = self.layer(h)
        return h


def test_a_tap_that_runs_several_times_per_forward_is_refused():
    X, y = _task()
    stack = fastft.TapStack(Shared(), ["inp"])
    assert stack(X[:4])["inp"].shape == (4, 8)  # runs once: fine
    with pytest.raises(fastft.FastFTValueError, match=r"\{'layer': 3\} run more than once"):
        fastft.TapStack(Shared(), ["inp", "layer"])(X[:4])
    with pytest.raises(fastft.FastFTValueError, match="run more than once"):
        fastft.probe(
            {"m": Shared()}, (X, y), (X[:60], y[:60]), **dict(KW, taps=["layer"], heads="knn")
        )


def test_a_tap_that_returns_a_model_output_counts_by_its_first_tensor():
    class Outputs(nn.Module):
        def __init__(self):
            super().__init__()
            self.lin = nn.Linear(6, 8)

        def forward(self, x):
            h = self.lin(x)
            return {"note": "not a tensor", "last_hidden_state": h, "pooled": h[:, 0]}

    class Classifier(nn.Module):
        def __init__(self):
            super().__init__()
            self.body, self.fc = Outputs(), nn.Linear(8, 3)

        def forward(self, x):
            return self.fc(self.body(x)["last_hidden_state"].mean(1))

    model = Classifier()
    x = torch.randn(4, 5, 6)
    out = fastft.TapStack(model, ["body"], "mean")(x)["body"]
    torch.testing.assert_close(out, model.body.lin(x).mean(1))


@pytest.mark.parametrize("option", ["--limit", "--shots", "--concat-last", "--epochs"])
def test_the_command_refuses_counts_below_one(option, capsys):
    from fastft.cli import build_parser

    args = build_parser().parse_args(["probe", option, "3"])
    assert getattr(args, option[2:].replace("-", "_")) == 3
    for bad in ("-3", "0", "x"):
        with pytest.raises(SystemExit):
            build_parser().parse_args(["probe", option, bad])
        assert "use a positive integer" in capsys.readouterr().err


def test_a_test_set_that_is_the_training_set_is_flagged():
    X, y = _task()
    kw = dict(KW, heads=["knn"], ks=[1])
    with pytest.warns(UserWarning, match="the test data are the training data"):
        fastft.probe({"m": _backbone()}, (X, y), (X.clone(), y.clone()), **kw)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        fastft.probe({"m": _backbone()}, (X, y), (X[:60], y[:60]), **kw)  # a subset: no warning


def test_layers_above_the_taps_may_fail_in_the_first_call():
    class NeedsLabels(nn.Module):
        def __init__(self):
            super().__init__()
            torch.manual_seed(0)
            self.body = nn.Linear(6, 8)

        def forward(self, x, labels=None):
            h = self.body(x)
            if labels is None:
                raise TypeError("this head needs labels")
            return h

    X, y = _task()
    stack = fastft.TapStack(NeedsLabels(), ["body"])
    first, second = stack(X[:4])["body"], stack(X[:4])["body"]
    torch.testing.assert_close(first, second)
    model = NeedsLabels()
    model.body.register_forward_pre_hook(lambda *a: 1 / 0)  # fails before the tap's output
    with pytest.raises(ZeroDivisionError):
        fastft.TapStack(model, ["body"])(X[:4])


def test_the_heatmap_axis_keeps_tap_names_distinct():
    from fastft.probing.report import axis_labels

    assert axis_labels(["bert.encoder.layer.0", "bert.encoder.layer.1", "concat(last 2)"]) == [
        "layer.0",
        "layer.1",
        "concat(last 2)",
    ]
    assert axis_labels(["m.encoder.layer.1", "m.decoder.layer.1"]) == [
        "encoder.layer.1",
        "decoder.layer.1",
    ]


def test_a_conv1d_tap_is_pooled_over_time_not_channels():
    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Conv1d(2, 8, 3, padding=1), nn.ReLU(), nn.Conv1d(8, 4, 3, padding=1), nn.ReLU()
    )
    x = torch.randn(5, 2, 11)  # [B, C, L]: 11 time steps
    out = fastft.TapStack(model, ["0", "2"], "auto")(x)
    with torch.no_grad():
        torch.testing.assert_close(out["0"], model[0](x).mean(2))  # [5, 8]: channels kept
        torch.testing.assert_close(out["2"], model[:3](x).mean(2))
    with pytest.raises(fastft.FastFTValueError, match="only pooling='mean'"):
        fastft.TapStack(model, ["0"], "cls")(x)
