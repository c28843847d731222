"""``fastft.probe``: the protocol (validation split, few-shot sample), one frozen pass per
backbone through the cache, the report's files, and ``fastft probe`` on a tiny task."""

from __future__ import annotations

import csv
import json
import os
import subprocess
import sys

import pytest
import torch
from torch import nn

import fastft
from fastft.probing.protocol import make_split, stratified_split


class Counted(nn.Module):
    """A layer that counts its calls (a counter the cache key is told to ignore)."""

    fastft_key_ignore = ("calls",)

    def __init__(self, layer: nn.Module):
        super().__init__()
        self.layer, self.calls = layer, 0

    def forward(self, x):
        self.calls += 1
        return self.layer(x)


class Backbone(nn.Module):
    """An embedding and two blocks over [B, L, D] sequences, then a classifier."""

    def __init__(self, seed: int = 0):
        super().__init__()
        torch.manual_seed(seed)
        self.embed = Counted(nn.Linear(5, 10))
        self.blocks = nn.ModuleList(
            [Counted(nn.Sequential(nn.Linear(10, 10), nn.Tanh())) for _ in range(2)]
        )
        self.head = Counted(nn.Linear(10, 3))

    def calls(self) -> dict[str, int]:
        return {n: m.calls for n, m in self.named_modules() if isinstance(m, Counted) and m.calls}

    def reset(self) -> None:
        for m in self.modules():
            if isinstance(m, Counted):
                m.calls = 0

    def forward(self, x):
        h = self.embed(x)
        for b in self.blocks:
            h = b(h)
        return self.head(h.mean(1))


def _data(n, seed):
    g = torch.Generator().manual_seed(seed)
    X = torch.randn(n, 3, 5, generator=g)
    y = (X[:, :, 0].mean(1) > 0).long() + (X[:, :, 1].mean(1) > 0.3).long()
    return X, y


SMALL = dict(
    lrs=[1e-2, 3e-2],
    weight_decays=[0.0, 1e-2],
    Cs=[0.1, 10.0],
    ks=[3, 10],
    epochs=2,
    cache="host",
    cache_dtype="fp32",
    extract_batch_size=40,
    progress=False,
)


# ---------------------------------------------------------------------------- protocol
def test_the_validation_split_is_stratified_seeded_and_disjoint():
    y = torch.tensor([0] * 50 + [1] * 30 + [2] * 20)
    rest, val = stratified_split(y, 0.2, seed=1)
    again = stratified_split(y, 0.2, seed=1)
    other = stratified_split(y, 0.2, seed=2)
    assert torch.equal(val, again[1]) and torch.equal(rest, again[0])
    assert not torch.equal(val, other[1])
    assert set(rest.tolist()).isdisjoint(val.tolist())
    assert sorted(rest.tolist() + val.tolist()) == list(range(100))
    assert torch.bincount(y[val]).tolist() == [10, 6, 4]


def test_few_shot_samples_k_per_class_seeded_outside_the_validation_rows():
    y = torch.tensor([0] * 40 + [1] * 40 + [2] * 40)
    a = make_split(y, val_fraction=0.25, seed=5, shots=4)
    b = make_split(y, val_fraction=0.25, seed=5, shots=4)
    c = make_split(y, val_fraction=0.25, seed=6, shots=4)
    assert torch.equal(a.fit, b.fit) and torch.equal(a.val, b.val)
    assert not torch.equal(a.fit, c.fit)
    assert torch.bincount(y[a.fit]).tolist() == [4, 4, 4]
    assert set(a.fit.tolist()).isdisjoint(a.val.tolist())
    assert a.describe()["shots"] == 4 and a.describe()["fit"] == a.fit.tolist()
    with pytest.raises(fastft.FastFTValueError, match="fewer than shots"):
        make_split(y, val_fraction=0.25, seed=5, shots=31)


# ---------------------------------------------------------------------------- the probe
def test_one_frozen_pass_per_backbone_then_cache_hits(tmp_path):
    X, y = _data(120, 0)
    Xt, yt = _data(40, 1)
    model = Backbone()
    disk = dict(SMALL, cache="disk", cache_dir=tmp_path)
    report = fastft.probe({"a": model}, (X, y), (Xt, yt), heads=["linear", "knn"], **disk)
    calls = model.calls()
    # 3 batches of training rows + 1 of test rows (and the cache's one-batch probe of shapes
    # at most): every tap came from those calls, and the head above the taps ran once (the
    # first call runs to the end, to check that every tap runs once per forward)
    assert calls["embed"] == calls["blocks.0"] == calls["blocks.1"], calls
    assert 4 <= calls["embed"] <= 6
    assert calls["head"] == 1
    info = report.backbones["a"]
    assert not info["train_pass"]["hit"] and not info["test_pass"]["hit"]
    assert {r.layer for r in report.rows} == {"embed", "blocks.0", "blocks.1"}
    assert len(report.rows) == 3 * 2

    model.reset()
    again = fastft.probe({"a": model}, (X, y), (Xt, yt), heads=["linear", "knn"], **disk)
    assert model.calls() == {}  # both passes were cache hits: the backbone never ran
    assert again.backbones["a"]["train_pass"]["hit"] and again.backbones["a"]["test_pass"]["hit"]
    assert [r.test_accuracy for r in again.rows] == [r.test_accuracy for r in report.rows]

    fastft.probe({"a": model}, (X, y), (Xt, yt), heads=["knn"], pooling="cls", **disk)
    assert model.calls()["embed"] >= 4  # another pooling is another cache: the key covers it


def test_hyper_parameters_are_chosen_on_training_rows_only():
    """The validation rows are rows of the training set: kNN's chosen validation accuracy is
    what a brute-force kNN gets on those rows, and the test set is scored with that k only."""
    X, y = _data(150, 2)
    Xt, yt = _data(50, 3)
    report = fastft.probe(
        {"a": Backbone()}, (X, y), (Xt, yt), heads=["knn"], taps=["blocks.1"], **SMALL
    )
    p = report.protocol
    assert set(p["fit"]).isdisjoint(p["val"]) and max(p["fit"] + p["val"]) < 150
    assert p["n_fit"] + p["n_val"] == 150 and p["n_test"] == 50
    row = report.rows[0]
    with torch.no_grad():
        feats = Backbone().blocks[1](Backbone().blocks[0](Backbone().embed(X))).mean(1)
    from fastft.probing.knn import knn_predict

    fit, val = torch.tensor(p["fit"]), torch.tensor(p["val"])
    for g in row.grid:
        pred = knn_predict(feats[fit], y[fit], feats[val], [g["k"]], 3)[g["k"]]
        assert g["val_accuracy"] == pytest.approx((pred == y[val]).float().mean().item())
    assert row.val_accuracy == max(g["val_accuracy"] for g in row.grid)


def test_the_report_files_hold_the_report(tmp_path):
    X, y = _data(120, 4)
    Xt, yt = _data(40, 5)
    report = fastft.probe(
        {"a": Backbone(0), "b": Backbone(1)},
        (X, y),
        (Xt, yt),
        concat_last=2,
        shots=10,
        out=tmp_path / "report",
        **SMALL,
    )
    files = report.files
    assert set(files) == {"json", "csv", "markdown", "heatmap"}
    for path in files.values():
        assert os.path.getsize(path) > 0
    with open(files["heatmap"], "rb") as f:
        assert f.read(8) == b"\x89PNG\r\n\x1a\n"
    saved = json.loads(open(files["json"]).read())
    assert [r["test_accuracy"] for r in saved["rows"]] == [r.test_accuracy for r in report.rows]
    assert saved["protocol"]["shots"] == 10 and saved["protocol"]["n_fit"] == 30
    with open(files["csv"]) as f:
        rows = list(csv.DictReader(f))
    assert len(rows) == len(report.rows) == 2 * 4 * 4  # backbones x (3 taps + concat) x heads
    assert {r["layer"] for r in rows} >= {"concat(last 2)"}
    for r, ours in zip(rows, report.rows):
        assert (r["backbone"], r["layer"], r["head"]) == (ours.backbone, ours.layer, ours.head)
        assert float(r["test_accuracy"]) == pytest.approx(ours.test_accuracy, abs=1e-6)
    assert report.table().count("\n") == len(report.rows) + 1
    best = report.best("b")
    assert best.backbone == "b"
    assert best.val_accuracy == max(r.val_accuracy for r in report.rows if r.backbone == "b")


def test_bad_arguments_are_refused_with_what_to_do():
    X, y = _data(30, 0)
    with pytest.raises(fastft.FastFTValueError, match="heads must be among"):
        fastft.probe({"a": Backbone()}, (X, y), (X, y), heads=["svm"], progress=False)
    with pytest.raises(fastft.FastFTValueError, match="no module named 'nope'"):
        fastft.probe({"a": Backbone()}, (X, y), (X, y), taps=["nope"], progress=False)
    with pytest.raises(fastft.FastFTValueError, match="names no taps for backbone 'a'"):
        fastft.probe({"a": Backbone()}, (X, y), (X, y), taps={"b": "blocks"}, progress=False)
    with pytest.raises(fastft.FastFTValueError, match="concat_last=5, but backbone 'a' has 3"):
        fastft.probe({"a": Backbone()}, (X, y), (X[:9], y[:9]), concat_last=5, **SMALL)
    with pytest.raises(fastft.FastFTValueError, match="at least one backbone"):
        fastft.probe({}, (X, y), (X, y))
    with pytest.raises(fastft.FastFTValueError, match="val_fraction must be between 0 and 1"):
        make_split(y, val_fraction=1.0, seed=0)
    with pytest.raises(fastft.FastFTValueError, match="shots must be a positive"):
        make_split(y, val_fraction=0.2, seed=0, shots=0)


def test_tap_stacks_refuse_what_they_cannot_pool():
    model = Backbone()
    with pytest.raises(fastft.FastFTValueError, match="pooling must be one of"):
        fastft.TapStack(model, "blocks", "max")
    with pytest.raises(fastft.FastFTValueError, match="taps must be 'blocks' or a list"):
        fastft.TapStack(model, "embed")
    with pytest.raises(fastft.FastFTValueError, match="names a module twice"):
        fastft.TapStack(model, ["embed", "embed"])
    with pytest.raises(fastft.FastFTValueError, match="needs dict inputs with an 'attention_mask'"):
        fastft.TapStack(model, ["embed"], "masked_mean")(torch.randn(2, 3, 5))
    unused = nn.Linear(1, 1)
    model.unused = unused  # registered, never called by forward
    with pytest.raises(fastft.FastFTValueError, match="never ran"):
        fastft.TapStack(model, ["embed", "unused"])(torch.randn(2, 3, 5))
    with pytest.raises(fastft.FastFTValueError, match="no stack of blocks"):
        fastft.TapStack(nn.Linear(3, 3))


# ---------------------------------------------------------------------------- the command
def test_the_command_writes_the_report(tmp_path):
    done = subprocess.run(
        [
            sys.executable,
            "-m",
            "fastft.cli",
            "probe",
            "--task",
            "digits",
            "--limit",
            "40",
            "--pretrain-epochs",
            "1",
            "--epochs",
            "1",
            "--out",
            str(tmp_path / "out"),
            "--quiet",
        ],
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert done.returncode == 0, done.stderr
    saved = json.loads((tmp_path / "out" / "probe.json").read_text())
    assert {r["head"] for r in saved["rows"]} == {"linear", "mlp", "logreg", "knn"}
    assert (tmp_path / "out" / "probe_heatmap.png").stat().st_size > 0
    assert "| digits-cnn |" in done.stdout  # the table is printed


def test_the_command_reads_its_grids(capsys):
    from fastft.cli import build_parser

    args = build_parser().parse_args(
        ["probe", "--lrs", "0.1,0.2", "--Cs", "1", "--ks", "5,7", "--heads", "linear,knn"]
    )
    assert (args.lrs, args.Cs, args.ks) == ([0.1, 0.2], [1.0], [5, 7])
    assert args.heads == ["linear", "knn"]
    assert args.task == "bbc" and args.cache == "disk" and args.out == "fastft-probe"
    for bad in (["--lrs", "0.1,x"], ["--ks", "1.5"], ["--heads", "svm"]):
        with pytest.raises(SystemExit) as exc:
            build_parser().parse_args(["probe", *bad])
        assert exc.value.code == 2
        assert "comma-separated list" in capsys.readouterr().err
