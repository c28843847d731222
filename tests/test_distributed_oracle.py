"""Two-rank DDP training (gloo, CPU) against a naive single-process loop in plain torch.

README ("Several processes") promises that head training under torch.distributed equals
single-process training with the same global batch, to 1e-5: every rank draws the same
``randperm``, takes its contiguous slice of each global batch, and the gradient all-reduce
averages the ranks' share-weighted gradients into the gradient of the global batch mean.
These tests hold fastft's multi-process training to that promise against
:func:`helpers.naive_reference.naive_fit`, which imports no fastft and knows nothing of
ranks: one process, the whole edited model run on every global batch (frozen layers in eval
mode), ``torch.randperm(N, generator=seed)`` per epoch, AdamW. The naive model is built by
hand (:func:`edited_model`: the pretrained stack with ``new_layers``), not taken from fastft.

One spawn of two ranks (``cache="disk"``, the user guide's sharded build into one folder) runs
every case in turn and writes each rank's weights and history; each test compares one case.
The last global batch of every epoch is uneven (75 rows, batch 16: 11 rows, 6 + 5 on the
ranks), so the share weighting of the ranks' losses is exercised. Tolerances: the ranks'
weights bitwise equal; weights, training losses and val metrics within 1e-6 absolute of the
naive loop's (tighter than README's 1e-5; the differences seen are about 6e-8).

- (a) ``head``: head-only training; weights equal the naive loop's, only the new layers
  moved; each epoch's training loss in the history (all-reduced over the ranks) equals the
  naive mean loss of that epoch.
- (b) ``unfreeze``: ``unfreeze=[(2, 1)]`` (two head epochs, then the top block ``4`` with the
  head); naive: the same two stages, each with a fresh AdamW and the batch order drawn from
  the seed again (as :mod:`fastft.train.fitting` documents).
- (c) ``val``: the ``val_*`` metrics (loss, accuracy, macro-F1) of every epoch, on both
  ranks, equal the naive model's after that many epochs on the *whole* validation set (37
  rows), and differ from those on either rank's half of it.
- (d) ``resume_head`` / ``resume_unfreeze``: a fit interrupted after epoch k (an exception
  from a callback in epoch k + 1, after the epoch-k checkpoint) and resumed under two ranks
  by a fresh FineTuner trains only the remaining epochs and reaches the weights of the
  uninterrupted run (within 1e-6) and the naive loop's; ``resume_unfreeze`` resumes inside
  the unfrozen stage, so the optimizer state of a DDP-wrapped tail is restored.
- (e) ``views``: ``views=3`` with a random transform is supported under DDP. The naive side
  makes the augmented inputs as FeatureCache.build documents (the transform called per chunk
  of ``extract_batch_size`` samples with a generator seeded from ``(seed, view, chunk
  start)``; :func:`chunk_seed` restates that formula); naive_fit draws one view per sample
  and epoch after the permutation.
- (f) ``dropout`` (xfail, strict): dropout in the new layers. A single process equals the
  naive loop with the same global random stream; two ranks do not (see the marker).

Each case was seen to fail under a deliberate change (then reverted): (a) another lr on
rank 1; (b) and (e) no gradient all-reduce (``fastft.distributed.wrap`` made a no-op); (c)
the val metrics computed on each rank's half of the validation rows (giving each rank half
of the validation *data* is refused outright: the ranks' disk-cache keys differ); (d) the
checkpoint rewritten to say one epoch fewer than its weights had (the resume trains one
epoch too many: the weights and ``trained_epochs`` differ).

The rendezvous is a file in the test's temporary folder (``init_method="file://..."``, as
in test_distributed.py): no TCP port is taken, so none can collide.
"""

from __future__ import annotations

import datetime
import hashlib
import os
import traceback

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import nn

import fastft

from helpers.data import mlp_data
from helpers.models import make_mlp_stack
from helpers.naive_reference import naive_fit, new_layers
from helpers.spawned import exit_without_finalizing

WORLD = 2
SEED = 3
FIT = dict(batch_size=16, lr=0.01, optimizer="adamw", weight_decay=0.01)
EPOCHS = 4
UNFREEZE = [(2, 1)]  # head for epochs 1-2, the top block ("4") with it for 3-4
VIEWS, EXTRACT_BATCH = 3, 32  # 75 rows: chunks at 0, 32, 64 of each view
TOL = dict(rtol=0, atol=1e-6)  # README promises 1e-5; about 6e-8 is seen
CASES = ("head", "unfreeze", "val", "resume_head", "resume_unfreeze", "views", "dropout")
DROPOUT, DROPOUT_SEED = 0.2, 7
RESUME_AFTER = {"resume_head": 2, "resume_unfreeze": 3}  # k: epochs in the checkpoint


def train_data():
    return mlp_data(75, seed=1)


def val_data():
    return mlp_data(37, seed=9)


def jitter(x, generator=None):
    """The random transform of the views case (draws only from ``generator``)."""
    return x + 0.3 * torch.randn(x.shape, generator=generator)


def tuner_kwargs(cache_dir: str, **extra) -> dict:
    return dict(
        num_classes=4,
        hidden=[8],
        cache_dtype="fp32",
        cache="disk",
        cache_dir=cache_dir,
        seed=SEED,
        verbose=False,
        **extra,
    )


# ---------------------------------------------------------------------------- the two ranks
class Interrupted(Exception):
    pass


def _interrupt_after(k: int):
    def callback(ft, record):
        if record["epoch"] == k + 1:  # epoch k's checkpoint is written; this epoch's is not
            raise Interrupted

    return callback


def _run_case(case: str, cache_dir: str, ck_dir: str) -> dict:
    X, y = train_data()
    if case == "views":
        kw = tuner_kwargs(
            cache_dir, views=VIEWS, transform=jitter, extract_batch_size=EXTRACT_BATCH
        )
        ft = fastft.FineTuner(make_mlp_stack(), **kw)
        ft.fit((X, y), epochs=EPOCHS, **FIT)
        return _result(ft)
    if case == "dropout":
        ft = fastft.FineTuner(make_mlp_stack(), **tuner_kwargs(cache_dir, dropout=DROPOUT))
        torch.manual_seed(DROPOUT_SEED)  # the dropout stream: the same on every rank
        ft.fit((X, y), epochs=EPOCHS, **FIT)
        return _result(ft)
    if case in ("head", "unfreeze", "val"):
        ft = fastft.FineTuner(make_mlp_stack(), **tuner_kwargs(cache_dir))
        ft.fit(
            (X, y),
            val=val_data() if case == "val" else None,
            epochs=EPOCHS,
            unfreeze=UNFREEZE if case == "unfreeze" else None,
            **FIT,
        )
        return _result(ft)
    # resume_*: interrupted in epoch k + 1, then resumed by a fresh tuner of both ranks.
    k = RESUME_AFTER[case]
    ck = os.path.join(ck_dir, f"{case}.pt")
    schedule = UNFREEZE if case == "resume_unfreeze" else None
    first = fastft.FineTuner(make_mlp_stack(), **tuner_kwargs(cache_dir))
    try:
        first.fit(
            (X, y),
            epochs=EPOCHS,
            unfreeze=schedule,
            checkpoint=ck,
            callbacks=[_interrupt_after(k)],
            **FIT,
        )
        raise AssertionError("the fit was not interrupted")
    except Interrupted:
        pass
    dist.barrier()  # every rank's epoch-k checkpoint is written before any rank reads one
    in_checkpoint = int(torch.load(ck, weights_only=True)["global_epochs_done"])
    trained = []
    again = fastft.FineTuner(make_mlp_stack(), **tuner_kwargs(cache_dir))
    again.fit(
        (X, y),
        epochs=EPOCHS,
        unfreeze=schedule,
        checkpoint=ck,
        resume=True,
        callbacks=[lambda ft, record: trained.append(record["epoch"])],
        **FIT,
    )
    return {**_result(again), "in_checkpoint": in_checkpoint, "trained_epochs": trained}


def _result(ft) -> dict:
    return {
        "state": {k: v.detach().clone() for k, v in ft.model.state_dict().items()},
        "history": [dict(r) for r in ft.history],
    }


def _worker(rank: int, init_file: str, root: str) -> None:
    dist.init_process_group(
        "gloo",
        init_method=f"file://{init_file}",
        rank=rank,
        world_size=WORLD,
        timeout=datetime.timedelta(seconds=120),  # a hung collective fails the test, soon
    )
    results = {}
    try:
        for case in CASES:
            try:
                results[case] = _run_case(
                    case, os.path.join(root, "cache"), os.path.join(root, "checkpoints")
                )
            except Exception:
                results[case] = {"error": traceback.format_exc()}
        torch.save(results, os.path.join(root, f"rank{rank}.pt"))
    finally:
        dist.destroy_process_group()
    exit_without_finalizing()


@pytest.fixture(scope="module")
def ranks(tmp_path_factory) -> list[dict]:
    """Each rank's results: ``{case: {"state", "history", ...} or {"error"}}``."""
    root = tmp_path_factory.mktemp("ddp_oracle")
    mp.start_processes(
        _worker,
        args=(str(root / "init"), str(root)),
        nprocs=WORLD,
        join=True,
        start_method="spawn",
    )
    return [torch.load(root / f"rank{r}.pt") for r in range(WORLD)]


def case_results(ranks: list[dict], case: str) -> list[dict]:
    out = [r[case] for r in ranks]
    for rank, got in enumerate(out):
        if "error" in got:
            pytest.fail(f"rank {rank} failed in case {case!r}:\n{got['error']}")
    return out


# ---------------------------------------------------------------------------- the naive side
def edited_model(dropout: float = 0.0) -> nn.Sequential:
    """The edited model built by hand: the pretrained stack with its output layer ``6``
    replaced by FineTuner's documented new layers (``hidden=[8]``, seeded by ``SEED``)."""
    model = make_mlp_stack()
    model[6] = nn.Sequential(*new_layers(16, 4, [8], dropout=dropout, seed=SEED))
    model.requires_grad_(False)
    model[6].requires_grad_(True)
    return model


def naive_stage(model: nn.Sequential, X, y, *, epochs: int, views=None) -> list[float]:
    """One fit (or stage) of :func:`naive_fit`: the modules with trainable parameters train."""
    trained = [m for m in model if any(p.requires_grad for p in m.parameters())]
    return naive_fit(
        model, X, y, train_modules=trained, epochs=epochs, seed=SEED, views=views, **FIT
    )


def naive_head(model: nn.Sequential, X, y, epochs: int = EPOCHS, views=None) -> list[float]:
    return naive_stage(model, X, y, epochs=epochs, views=views)


def naive_unfreezing(model: nn.Sequential, X, y) -> list[float]:
    """``unfreeze=[(2, 1)]`` by hand: the head for two epochs, then the top block ``4`` with
    the head for two more (a fresh optimizer, the batch order from the seed again)."""
    ((at, _),) = UNFREEZE
    losses = naive_stage(model, X, y, epochs=at)
    model[4].requires_grad_(True)
    return losses + naive_stage(model, X, y, epochs=EPOCHS - at)


def macro_f1(preds: torch.Tensor, labels: torch.Tensor, num_classes: int) -> float:
    """Mean F1 over the classes that occur in the labels or the predictions."""
    f1s = []
    for c in range(num_classes):
        tp = int(((preds == c) & (labels == c)).sum())
        predicted, actual = int((preds == c).sum()), int((labels == c).sum())
        if predicted + actual:
            f1s.append(2 * tp / (predicted + actual))
    return sum(f1s) / len(f1s) if f1s else 0.0


def val_metrics(model: nn.Module, X: torch.Tensor, y: torch.Tensor) -> dict[str, float]:
    """Cross-entropy, accuracy and macro-F1 of ``model`` (eval mode) on all of ``X``."""
    model.eval()
    with torch.no_grad():
        logits = model(X)
    preds = logits.argmax(dim=1)
    return {
        "val_loss": nn.functional.cross_entropy(logits, y).item(),
        "val_accuracy": (preds == y).double().mean().item(),
        "val_macro_f1": macro_f1(preds, y, logits.shape[1]),
    }


def chunk_seed(seed: int, view: int, start: int) -> int:
    """The seed of one chunk's transform (FeatureCache.build: seeded per chunk from ``seed``)."""
    digest = hashlib.sha256(f"{seed}:{view}:{start}".encode()).digest()
    return int.from_bytes(digest[:8], "little") & ((1 << 63) - 1)


def augmented_views(X: torch.Tensor) -> list[torch.Tensor]:
    """The ``VIEWS`` transformed copies of ``X``, chunk by chunk as the cache build makes them."""
    return [
        torch.cat(
            [
                jitter(
                    X[start : start + EXTRACT_BATCH],
                    generator=torch.Generator().manual_seed(chunk_seed(SEED, v, start)),
                )
                for start in range(0, len(X), EXTRACT_BATCH)
            ]
        )
        for v in range(VIEWS)
    ]


# ---------------------------------------------------------------------------- checks
def assert_ranks_equal(results: list[dict]) -> None:
    """Every rank holds the very same weights (the all-reduced gradient, the same step)."""
    for rank in range(1, WORLD):
        for name, w in results[0]["state"].items():
            assert torch.equal(results[rank]["state"][name], w), f"rank {rank} differs in {name}"


def assert_state_close(got: dict, want: nn.Module | dict, **tol) -> None:
    want = want.state_dict() if isinstance(want, nn.Module) else want
    assert set(got) == set(want)
    for name, w in want.items():
        torch.testing.assert_close(got[name], w, **(tol or TOL), msg=name)


def assert_losses_close(history: list[dict], losses: list[float]) -> None:
    assert len(history) == len(losses)
    for epoch, (got, want) in enumerate(zip(history, losses), start=1):
        assert got["loss"] == pytest.approx(want, abs=TOL["atol"]), f"epoch {epoch}"


def moved(state: dict, start: nn.Module) -> set[str]:
    return {n for n, w in start.state_dict().items() if not torch.equal(state[n], w)}


HEAD = {"6.0.weight", "6.0.bias", "6.2.weight", "6.2.bias"}


# ---------------------------------------------------------------------------- the cases
def test_head_training_equals_the_naive_loop(ranks):
    results = case_results(ranks, "head")
    assert_ranks_equal(results)
    naive = edited_model()
    losses = naive_head(naive, *train_data())
    assert_state_close(results[0]["state"], naive)
    assert_losses_close(results[0]["history"], losses)
    # Not vacuous: the head moved, the frozen layers did not.
    assert moved(results[0]["state"], edited_model()) == HEAD


def test_progressive_unfreezing_equals_the_naive_stages(ranks):
    results = case_results(ranks, "unfreeze")
    assert_ranks_equal(results)
    naive = edited_model()
    losses = naive_unfreezing(naive, *train_data())
    assert_state_close(results[0]["state"], naive)
    assert_losses_close(results[0]["history"], losses)
    assert [r.get("unfrozen_blocks", 0) for r in results[0]["history"]] == [0, 0, 1, 1]
    assert moved(results[0]["state"], edited_model()) == HEAD | {"4.weight", "4.bias"}


def test_validation_metrics_are_those_of_the_whole_validation_set(ranks):
    results = case_results(ranks, "val")
    assert_ranks_equal(results)
    X, y = train_data()
    Xv, yv = val_data()
    keys = ("val_loss", "val_accuracy", "val_macro_f1")
    for epoch in range(1, EPOCHS + 1):
        # naive_fit has no per-epoch hook: train e epochs from the start (without a schedule
        # the first e epochs of a longer fit are exactly these), then evaluate.
        naive = edited_model()
        naive_head(naive, X, y, epochs=epoch)
        want = val_metrics(naive, Xv, yv)
        for rank, result in enumerate(results):
            got = result["history"][epoch - 1]
            for k in keys:
                assert got[k] == pytest.approx(want[k], abs=TOL["atol"]), f"{epoch=} {rank=} {k}"
    assert_state_close(results[0]["state"], naive)
    # The comparison tells the whole set from one rank's share of it (an odd count of rows).
    for part in torch.arange(len(yv)).tensor_split(WORLD):
        shard = val_metrics(naive, Xv[part], yv[part])
        assert any(abs(shard[k] - want[k]) > 1e-3 for k in keys)


@pytest.mark.parametrize("case", sorted(RESUME_AFTER))
def test_resume_under_two_ranks_reaches_the_uninterrupted_weights(ranks, case):
    results = case_results(ranks, case)
    uninterrupted = case_results(ranks, "unfreeze" if case == "resume_unfreeze" else "head")
    assert_ranks_equal(results)
    k = RESUME_AFTER[case]
    for got in results:
        assert got["in_checkpoint"] == k
        assert got["trained_epochs"] == list(range(k + 1, EPOCHS + 1))  # only what was left
        assert [r["epoch"] for r in got["history"]] == list(range(1, EPOCHS + 1))
    assert_state_close(results[0]["state"], uninterrupted[0]["state"], rtol=0, atol=1e-6)
    naive = edited_model()
    X, y = train_data()
    losses = naive_unfreezing(naive, X, y) if case == "resume_unfreeze" else naive_head(naive, X, y)
    assert_state_close(results[0]["state"], naive)
    assert_losses_close(results[0]["history"], losses)


def test_augmented_views_under_ddp_equal_the_naive_loop(ranks):
    results = case_results(ranks, "views")
    assert_ranks_equal(results)
    X, y = train_data()
    views = augmented_views(X)
    assert not torch.allclose(views[0], views[1])  # the views differ from each other
    naive = edited_model()
    losses = naive_head(naive, X, y, views=views)
    assert_state_close(results[0]["state"], naive)
    assert_losses_close(results[0]["history"], losses)


@pytest.mark.xfail(
    strict=True,
    reason="dropout under DDP: every rank draws its masks from the same global random state, "
    "so the ranks' halves of a global batch get the same masks, not the slices of the one "
    "mask a single process draws for the whole batch (single-process fit equals the naive "
    "loop with dropout; the DDP ranks agree with each other but not with it)",
)
def test_dropout_in_the_head_under_ddp_equals_the_naive_loop(ranks):
    results = case_results(ranks, "dropout")
    assert_ranks_equal(results)
    naive = edited_model(dropout=DROPOUT)
    torch.manual_seed(DROPOUT_SEED)
    losses = naive_head(naive, *train_data())
    assert_state_close(results[0]["state"], naive)
    assert_losses_close(results[0]["history"], losses)
