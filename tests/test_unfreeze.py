"""Progressive unfreezing on the cache against the oracle: naive training of the same blocks.

The naive side runs the whole model every step (everything below the unfrozen blocks frozen
in eval mode, BatchNorm of the unfrozen blocks with frozen statistics), with the same batch
order, the same optimizer and the same decayed learning rates per block; nothing of fastft
is involved. With an fp32 cache fastft's weights must equal it within 1e-5.
"""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

import fastft
from fastft import FineTuner
from fastft.data import index_select
from fastft.errors import CacheTooLargeError, FastFTValueError, SurgeryError
from fastft.model.blocks import find_blocks, param_groups, unfreeze_blocks

from helpers.data import image_data, mlp_data, token_data
from helpers.models import (
    load_minilm_or_skip,
    make_hf_style,
    make_mlp_stack,
    make_resnet,
    make_text_encoder,
)
from helpers.oracle import FIT, naive_finetune

CASES = {
    "hf_style_untraceable": (
        make_hf_style,
        token_data,
        dict(num_classes=3),
        ["layers.0", "layers.1", "layers.2"],
    ),
    "mlp_stack": (make_mlp_stack, mlp_data, dict(num_classes=4, hidden=[8]), ["0", "2", "4"]),
    "cnn_residual_batchnorm": (
        make_resnet,
        image_data,
        dict(num_classes=5),
        ["layer1.0", "layer1.1", "layer2.0", "layer2.1"],
    ),
    "transformer_masked": (
        make_text_encoder,
        token_data,
        dict(num_classes=3),
        ["layers.0", "layers.1", "layers.2"],
    ),
}


def _tuner(case: str, tmp_path, **overrides) -> tuple[FineTuner, object, torch.Tensor]:
    make_model, make_data, kwargs, _ = CASES[case]
    X, y = make_data()
    ft = FineTuner(
        make_model(),
        cache_dtype="fp32",
        seed=3,
        cache_dir=str(tmp_path),
        verbose=False,
        **{**kwargs, **overrides},
    )
    ft.prepare(index_select(X, torch.arange(4)))  # attach the head now, so the naive copy has it
    return ft, X, y


def _naive_unfreezing(
    model: nn.Module,
    X,
    y,
    *,
    head_epochs: int,
    block_epochs: int,
    blocks: int,
    lr_decay: float | None,
    train_bn: bool = False,
) -> list[nn.Module]:
    """Head-only epochs, then the top ``blocks`` blocks with the head: plain PyTorch."""
    naive_finetune(model, X, y, epochs=head_epochs, seed=3, **FIT)
    top = [m for _, m in find_blocks(model)][-blocks:]
    for block in top:
        block.requires_grad_(True)
    in_blocks = {id(p) for b in top for p in b.parameters()}
    head = [p for p in model.parameters() if p.requires_grad and id(p) not in in_blocks]
    decay = 1.0 if lr_decay is None else lr_decay
    groups = [{"params": head, "lr": FIT["lr"]}] + [
        {"params": list(b.parameters()), "lr": FIT["lr"] * decay**depth}
        for depth, b in enumerate(reversed(top), start=1)
    ]
    bns = (
        []
        if train_bn
        else [m for b in top for m in b.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    )
    naive_finetune(
        model,
        X,
        y,
        epochs=block_epochs,
        seed=3,
        param_groups=groups,
        train_modules=top,
        keep_eval=bns,
        **FIT,
    )
    return top


@pytest.mark.parametrize("case", sorted(CASES))
def test_blocks_are_found_bottom_to_top(case, tmp_path):
    ft, _, _ = _tuner(case, tmp_path)
    assert [n for n, _ in find_blocks(ft.model)] == CASES[case][3]


def test_new_layers_are_never_blocks():
    # Before FineTuner replaces it, the MLP's output Linear is a block like the others ...
    assert [n for n, _ in find_blocks(make_mlp_stack())] == ["0", "2", "4", "6"]
    # ... once replaced by a new head, it is not.
    model = make_mlp_stack()
    fastft.surgery.replace_head(model, num_classes=2)
    assert [n for n, _ in find_blocks(model)] == ["0", "2", "4"]


@pytest.mark.parametrize("blocks", [1, 2])
@pytest.mark.parametrize("case", sorted(CASES))
def test_unfreezing_equals_naive_training_of_the_same_blocks(case, blocks, tmp_path):
    ft, X, y = _tuner(case, tmp_path)
    naive = copy.deepcopy(ft.model)
    start = copy.deepcopy(ft.model.state_dict())

    torch.manual_seed(7)  # dropout inside unfrozen blocks draws from the global generator
    history = ft.fit((X, y), epochs=4, unfreeze=[(2, blocks)], lr_decay=0.5, **FIT)
    torch.manual_seed(7)
    top = _naive_unfreezing(naive, X, y, head_epochs=2, block_epochs=2, blocks=blocks, lr_decay=0.5)

    got, want = ft.model.state_dict(), naive.state_dict()
    assert set(got) == set(want)
    for name in want:
        torch.testing.assert_close(got[name], want[name], rtol=0, atol=1e-5, msg=name)
    assert ft.prefix.method == ("replay" if case.startswith("hf_style") else "fx")
    # The comparison is not vacuous: the unfrozen blocks moved, the blocks below them did not,
    # and BatchNorm running statistics stayed the pretrained ones.
    moved = [n for n in got if not torch.equal(got[n], start[n])]
    lower = [n for n, _ in find_blocks(ft.model)][:-blocks]
    assert any(n.startswith(CASES[case][3][-1] + ".") for n in moved)
    assert not any(n.startswith(b + ".") for n in moved for b in lower)
    assert not any(
        n.endswith(("running_mean", "running_var", "num_batches_tracked")) for n in moved
    )
    assert [r.get("unfrozen_blocks") for r in history][-2:] == [blocks, blocks]
    assert [r["epoch"] for r in history] == [1, 2, 3, 4]
    assert len(top) == blocks


def test_manual_unfreeze_then_fit_equals_the_schedule(tmp_path):
    a, X, y = _tuner("mlp_stack", tmp_path / "a")
    b, _, _ = _tuner("mlp_stack", tmp_path / "b")
    a.fit((X, y), epochs=3, unfreeze=[(1, 2)], **FIT)
    b.fit((X, y), epochs=1, **FIT)
    assert b.unfreeze(2) == ["2", "4"]
    b.fit((X, y), epochs=2, **FIT)
    for (name, p), q in zip(a.model.named_parameters(), b.model.parameters()):
        torch.testing.assert_close(p, q, rtol=0, atol=1e-6, msg=name)


def test_train_bn_updates_running_statistics_like_naive(tmp_path):
    ft, X, y = _tuner("cnn_residual_batchnorm", tmp_path)
    naive = copy.deepcopy(ft.model)
    before = ft.model.layer2[1].bn1.running_mean.clone()
    ft.unfreeze(1, train_bn=True)
    ft.fit((X, y), epochs=2, **FIT)
    naive_finetune(naive, X, y, epochs=0, seed=3, **FIT)
    _train_top_block_naively(naive, X, y)
    assert not torch.equal(ft.model.layer2[1].bn1.running_mean, before)
    for name, want in naive.state_dict().items():
        torch.testing.assert_close(ft.model.state_dict()[name], want, rtol=0, atol=1e-5, msg=name)


def _train_top_block_naively(model, X, y):
    top = model.layer2[1]
    top.requires_grad_(True)
    naive_finetune(model, X, y, epochs=2, seed=3, train_modules=[top], **FIT)


def test_cache_at_the_new_cut_is_reused(tmp_path):
    ft, X, y = _tuner("transformer_masked", tmp_path)
    ft.unfreeze(1)
    first = ft.build_cache((X, y))
    assert not first.telemetry["hit"]
    # The cut's inputs: the sequence before the top layer, and the mask it needs beside it.
    shapes = sorted(tuple(t.shape) for t in first.taps)
    assert (10,) in shapes and (10, 16) in shapes
    assert any(t.source_dtype is not None for t in first.taps)
    ft.unfreeze(0)
    ft.build_cache((X, y))
    ft.unfreeze(1)
    again = ft.build_cache((X, y))
    assert again.telemetry["hit"] and again.fingerprint == first.fingerprint


def test_disk_cache_at_the_new_cut_is_reused_across_tuners(tmp_path):
    a, X, y = _tuner("cnn_residual_batchnorm", tmp_path, cache="disk")
    a.unfreeze(2)
    built = a.build_cache((X, y))
    b, _, _ = _tuner("cnn_residual_batchnorm", tmp_path, cache="disk")
    b.unfreeze(2)
    reused = b.build_cache((X, y))
    assert not built.telemetry["hit"] and reused.telemetry["hit"]
    assert reused.fingerprint == built.fingerprint
    assert [tuple(t.shape) for t in reused.taps] == [(8, 8, 8)]  # layer2.0's input feature map


def test_parameter_groups_carry_decayed_learning_rates(tmp_path):
    ft, X, y = _tuner("mlp_stack", tmp_path)
    ft.unfreeze(2)
    ft.build_cache((X, y))
    groups = param_groups(ft.tail, 0.1, 0.5, 0.01)
    assert [g["lr"] for g in groups] == [0.1, 0.05, 0.025]
    model = ft.model
    assert {id(p) for p in groups[1]["params"]} == {id(p) for p in model[4].parameters()}
    assert {id(p) for p in groups[2]["params"]} == {id(p) for p in model[2].parameters()}
    assert all(g["weight_decay"] == 0.01 for g in groups)
    assert len(param_groups(ft.tail, 0.1, None, 0.0)) == 1


def test_unfreeze_zero_freezes_the_blocks_again(tmp_path):
    ft, X, y = _tuner("mlp_stack", tmp_path)
    ft.unfreeze(2)
    assert ft.model[2].weight.requires_grad
    ft.unfreeze(1)
    assert not ft.model[2].weight.requires_grad and ft.model[4].weight.requires_grad
    ft.unfreeze(0)
    assert not ft.model[4].weight.requires_grad
    ft.fit((X, y), epochs=1, **FIT)
    assert ft.cache.taps[0].shape == (16,)  # the cut is back at the head's input


def test_errors_say_what_to_do(tmp_path):
    ft, X, y = _tuner("mlp_stack", tmp_path)
    with pytest.raises(FastFTValueError, match="3 blocks"):
        ft.unfreeze(4)
    with pytest.raises(FastFTValueError, match="non-negative"):
        ft.unfreeze(-1)
    with pytest.raises(FastFTValueError, match="increase strictly"):
        ft.fit((X, y), epochs=3, unfreeze=[(2, 1), (1, 2)])
    with pytest.raises(FastFTValueError, match="0..2"):
        ft.fit((X, y), epochs=3, unfreeze=[(3, 1)])
    with pytest.raises(FastFTValueError, match="pairs"):
        ft.fit((X, y), epochs=3, unfreeze=[1, 2])
    ft.fit((X, y), epochs=2, checkpoint=str(tmp_path / "ck.pt"), **FIT)
    with pytest.raises(FastFTValueError, match="same epochs= and unfreeze="):
        ft.fit((X, y), epochs=3, unfreeze=[(1, 1)], checkpoint=str(tmp_path / "ck.pt"), resume=True)
    with pytest.raises(FastFTValueError, match="lr_decay"):
        ft.fit((X, y), epochs=1, lr_decay=0)
    ft.unfreeze(1)
    with pytest.raises(FastFTValueError, match="fit_many"):
        ft.fit_many([{"lr": 0.1}, {"lr": 0.01}], (X, y), epochs=1)
    with pytest.raises(SurgeryError, match="no stack of blocks"):
        unfreeze_blocks(nn.Sequential(nn.Linear(2, 2)), 1)


def test_memory_guard_names_the_size_and_the_options(tmp_path):
    ft, X, y = _tuner("cnn_residual_batchnorm", tmp_path, cache="host", max_memory=10_000)
    ft.unfreeze(2)
    with pytest.raises(CacheTooLargeError, match=r"GiB in the host tier.*cache='disk'.*int8"):
        ft.build_cache((X, y))
    # The same cut fits when the user takes one of the options.
    ft.cache_tier = "auto"
    assert ft.build_cache((X, y)).tier == "disk"


def test_public_api():
    assert fastft.model.blocks.find_blocks is find_blocks
    assert issubclass(CacheTooLargeError, fastft.CacheError)


# ---------------------------------------------------------------------------- real all-MiniLM-L6-v2
@pytest.fixture(scope="module")
def minilm_and_text():
    st = load_minilm_or_skip()
    texts = [
        f"sample {i}: "
        + " ".join(["market", "goal", "vote", "film", "chip"][i % 5] for _ in range(3 + i % 4))
        for i in range(12)
    ]
    enc = st.tokenizer(
        texts, padding="max_length", truncation=True, max_length=16, return_tensors="pt"
    )
    return st, dict(enc), torch.arange(12) % 3


def test_real_minilm_top_layer_unfrozen_equals_naive(minilm_and_text, tmp_path):
    st, X, y = minilm_and_text
    ft = FineTuner(
        copy.deepcopy(st),
        num_classes=3,
        cache_dtype="fp32",
        seed=3,
        cache_dir=str(tmp_path),
        verbose=False,
    )
    ft.prepare(index_select(X, torch.arange(2)))
    naive = copy.deepcopy(ft.model)
    fit = dict(FIT, batch_size=4, lr=1e-3)
    torch.manual_seed(5)
    ft.fit((X, y), epochs=2, unfreeze=[(1, 1)], lr_decay=0.5, **fit)
    assert ft.prefix.method == "replay"
    assert [t.name for t in ft.cache.taps][0].endswith("encoder.layer.5.input")
    assert ft.cache.taps[0].shape == (16, 384)

    torch.manual_seed(5)
    naive_finetune(naive, X, y, epochs=1, seed=3, **fit)
    top = [m for _, m in find_blocks(naive)][-1]
    top.requires_grad_(True)
    in_top = {id(p) for p in top.parameters()}
    groups = [
        {
            "params": [p for p in naive.parameters() if p.requires_grad and id(p) not in in_top],
            "lr": 1e-3,
        },
        {"params": list(top.parameters()), "lr": 5e-4},
    ]
    naive_finetune(naive, X, y, epochs=1, seed=3, param_groups=groups, train_modules=[top], **fit)
    got, want = ft.model.state_dict(), naive.state_dict()
    moved = 0
    for name in want:
        torch.testing.assert_close(got[name], want[name], rtol=0, atol=1e-5, msg=name)
        moved += "layer.5." in name and not torch.equal(
            got[name], st.state_dict().get(name.removeprefix("encoder."), got[name])
        )
    assert moved > 0


def test_schedule_runs_the_layers_below_the_deepest_cut_once(tmp_path):
    """With a replay cut, the head stage's cache is computed from the deeper cut's cache: the
    embedding (below both cuts) sees each training sample once, not once per cut."""
    ft, X, y = _tuner("hf_style_untraceable", tmp_path)
    rows = []

    class CountingEmbedding(nn.Embedding):  # counts real work; a skipped call never gets here
        fastft_key_ignore = ("log",)  # test instrumentation, not part of the cache key
        log = rows

        def forward(self, ids):
            self.log.append(ids.shape[0])
            return super().forward(ids)

    ft.model.embed.__class__ = CountingEmbedding
    Xv, yv = token_data(n=20, seed=9)
    gaps = []

    def check_val_loss(tuner, record):  # the model's own loss on val, computed apart
        counted = len(rows)
        tuner.model.eval()
        with torch.no_grad():
            want = nn.functional.cross_entropy(tuner.model(Xv), yv).item()
        del rows[counted:]  # this check's own forward does not count
        gaps.append(abs(record["val_loss"] - want))

    ft.fit((X, y), val=(Xv, yv), epochs=3, unfreeze=[(1, 2)], callbacks=[check_val_loss], **FIT)
    probes = [r for r in rows if r <= 4]  # the split's parity checks on the example batch
    assert sum(rows) - sum(probes) == len(y) + len(yv)  # train and val, once each
    assert len(gaps) == 3 and max(gaps) < 1e-5  # val caches derived for the head stage are exact


def test_derived_cache_equals_the_cache_built_from_data(tmp_path):
    ft, X, y = _tuner("hf_style_untraceable", tmp_path)
    ft.unfreeze(1)
    low = ft.build_cache((X, y))
    low_tail = ft.tail
    assert ft.prefix.method == "replay"
    ft.unfreeze(0)
    direct = ft.build_cache((X, y))
    derived = ft.caches.derived(ft.prefix, low_tail, low, pool=ft.tuned.cache_pool(ft.pool))
    assert derived.fingerprint != direct.fingerprint
    torch.testing.assert_close(
        derived.gather(torch.arange(len(y)))[0],
        direct.gather(torch.arange(len(y)))[0],
        rtol=0,
        atol=1e-6,
    )
    assert torch.equal(derived.labels, direct.labels)


def test_save_load_and_export_keep_the_unfrozen_blocks(tmp_path):
    ft, X, y = _tuner("cnn_residual_batchnorm", tmp_path)
    ft.fit((X, y), epochs=2, unfreeze=[(1, 1)], **FIT)
    ft.save(str(tmp_path / "ft.pt"))
    loaded = FineTuner.load(
        str(tmp_path / "ft.pt"),
        CASES["cnn_residual_batchnorm"][0](),
        cache_dir=str(tmp_path),
        verbose=False,
    )
    assert loaded.model.layer2[1].conv1.weight.requires_grad  # unfrozen again, ready to train on
    torch.testing.assert_close(loaded.predict(X), ft.predict(X), rtol=0, atol=1e-6)
    exported = ft.export()
    assert not any(k.startswith("_fastft_") for m in exported.modules() for k in m.__dict__)
    with torch.no_grad():
        torch.testing.assert_close(exported(X), ft.predict(X), rtol=0, atol=1e-6)


def _interrupted_and_resumed(
    case, tmp_path, stopped_after, schedule, callbacks=(), early_stopping=None, **tuner
):
    """An uninterrupted fit, and one stopped after ``stopped_after`` epochs and resumed."""

    def stopper(limit):
        return lambda ft, rec: rec["epoch"] < limit

    whole, X, y = _tuner(case, tmp_path / "whole", **tuner)
    whole.fit(
        (X, y),
        val=(X, y),
        callbacks=list(callbacks),
        early_stopping=copy.deepcopy(early_stopping),
        **schedule,
    )
    ck = str(tmp_path / "ck.pt")
    first, _, _ = _tuner(case, tmp_path / "first", **tuner)
    first.fit(
        (X, y),
        val=(X, y),
        checkpoint=ck,
        callbacks=[*callbacks, stopper(stopped_after)],
        early_stopping=copy.deepcopy(early_stopping),
        **schedule,
    )
    resumed, _, _ = _tuner(case, tmp_path / "resumed", **tuner)
    resumed.fit(
        (X, y),
        val=(X, y),
        checkpoint=ck,
        resume=True,
        callbacks=list(callbacks),
        early_stopping=copy.deepcopy(early_stopping),
        **schedule,
    )
    return whole, resumed


def _assert_same_fit(resumed: FineTuner, whole: FineTuner) -> None:
    assert resumed.history.column("epoch") == whole.history.column("epoch")
    assert resumed.history.column("loss") == pytest.approx(whole.history.column("loss"), rel=1e-5)
    want, got = whole.export().state_dict(), resumed.export().state_dict()
    for name in want:
        torch.testing.assert_close(got[name], want[name], rtol=1e-5, atol=1e-6, msg=name)


SCHEDULE = dict(epochs=6, unfreeze=[(2, 1), (4, 2)], lr_decay=0.5, **FIT)


@pytest.mark.parametrize("case", ["mlp_stack", "hf_style_untraceable"])
@pytest.mark.parametrize("stopped_after", [1, 2, 3, 4, 6])
def test_an_interrupted_schedule_resumes_to_the_same_weights(case, stopped_after, tmp_path):
    """Stopped inside a stage (1, 3), at a stage's end (2, 4) or at the very end (6). The
    HF-style encoder has dropout in its blocks, and a callback draws random numbers too."""
    whole, resumed = _interrupted_and_resumed(
        case,
        tmp_path,
        stopped_after,
        SCHEDULE,
        callbacks=[lambda ft, rec: torch.randint(9, (1,)) and None],
    )
    assert len(whole.history) == 6 and resumed.tuned.unfrozen_blocks == 2
    _assert_same_fit(resumed, whole)


@pytest.mark.parametrize("stopped_after", [3, 5])
def test_a_schedule_that_freezes_blocks_again_resumes_from_the_trained_weights(
    stopped_after, tmp_path
):
    # The last stage's cache runs a block the stage before trained: it needs the saved weights.
    schedule = dict(epochs=6, unfreeze=[(2, 2), (4, 1)], lr_decay=0.5, **FIT)
    _assert_same_fit(
        *reversed(
            _interrupted_and_resumed("hf_style_untraceable", tmp_path, stopped_after, schedule)
        )
    )


@pytest.mark.parametrize("stopped_after", [1, 3])
def test_early_stopping_state_survives_a_resume(stopped_after, tmp_path):
    stopping = fastft.EarlyStopping(patience=1, monitor="val_loss")
    schedule = dict(SCHEDULE, lr=0.2)  # overshoots, so the best epoch is early and restored
    whole, resumed = _interrupted_and_resumed(
        "mlp_stack", tmp_path, stopped_after, schedule, early_stopping=stopping
    )
    assert len(whole.history) < 6  # it did stop early
    _assert_same_fit(resumed, whole)
    # A fit that early stopping ended stays ended when run again with resume=True.
    again, X, y = _tuner("mlp_stack", tmp_path / "again")
    again.fit(
        (X, y),
        val=(X, y),
        checkpoint=str(tmp_path / "ck.pt"),
        resume=True,
        early_stopping=copy.deepcopy(stopping),
        **schedule,
    )
    _assert_same_fit(again, whole)


def test_a_resume_must_repeat_the_interrupted_fit(tmp_path):
    ft, X, y = _tuner("mlp_stack", tmp_path)
    ck = str(tmp_path / "ck.pt")
    ft.fit((X, y), checkpoint=ck, callbacks=[lambda ft, rec: rec["epoch"] < 3], **SCHEDULE)
    fresh, _, _ = _tuner("mlp_stack", tmp_path)
    with pytest.raises(FastFTValueError, match="stages"):
        fresh.fit((X, y), epochs=6, lr_decay=0.5, checkpoint=ck, resume=True, **FIT)  # no unfreeze=
    with pytest.raises(FastFTValueError, match="lr=0.01.*this fit has lr=0.02"):
        fresh.fit((X, y), checkpoint=ck, resume=True, **{**SCHEDULE, "lr": 0.02})
    fresh.unfreeze(0, train_bn=True)
    with pytest.raises(FastFTValueError, match="train_bn=False"):
        fresh.fit((X, y), checkpoint=ck, resume=True, **SCHEDULE)
