"""Progressive unfreezing through FineTuner.fit, beyond the oracle cases of test_unfreeze:
unfreeze() before the head is attached, rejected requests that change nothing, a deep cache
that does not fit, early stopping across stages, resume and save after blocks were frozen
again, data given as a Dataset or a DataLoader, and taps of one number per sample.
"""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader

from fastft import FineTuner
from fastft.data import index_select
from fastft.errors import CacheTooLargeError, FastFTError, FastFTValueError
from fastft.model.blocks import find_blocks, unfrozen_blocks
from fastft.train import EarlyStopping

from helpers.data import Rows, mlp_data, token_batch, token_data
from helpers.models import make_dict_encoder, make_hf_style, make_mlp_stack
from helpers.oracle import FIT, naive_finetune

pytestmark = pytest.mark.filterwarnings("ignore:fastft runs the frozen layers in eval mode")


def test_unfreeze_before_the_head_is_attached_applies_after_the_probe(tmp_path):
    class Encoder(nn.Module):  # no classifier: the head is appended after a probe batch
        def __init__(self):
            super().__init__()
            torch.manual_seed(0)
            self.stem = nn.Linear(12, 16)
            self.layers = nn.Sequential(
                *[nn.Sequential(nn.Linear(16, 16), nn.ReLU()) for _ in range(3)]
            )
            self.norm = nn.LayerNorm(16)  # ends in no Linear: there is no classifier to replace

        def forward(self, x):
            return self.norm(self.layers(self.stem(x)))

    X, y = mlp_data()
    ft = FineTuner(
        Encoder(), num_classes=3, cache_dtype="fp32", seed=3, cache_dir=str(tmp_path), verbose=False
    )
    assert ft.tuned.head_spec is None and ft.unfreeze(1) == []  # the model is not edited yet
    history = ft.fit((X, y), epochs=2, **FIT)
    assert [m for m, _ in unfrozen_blocks(ft.model)] == [
        ft.model.get_submodule(find_blocks(ft.model)[-1][0])
    ]
    assert history.column("unfrozen_blocks") == [1, 1]
    assert ft.cache.taps[0].shape == (16,)


def test_early_stopping_restores_a_best_epoch_of_an_earlier_stage(tmp_path):
    class HeadStageIsBest(EarlyStopping):
        def step(self, record, module):
            penalty = 10.0 if record.get("unfrozen_blocks") else 0.0
            return super().step(dict(record, val_loss=record["val_loss"] + penalty), module)

    X, y = mlp_data()
    Xv, yv = mlp_data(40, seed=9)
    ft = FineTuner(
        make_mlp_stack(),
        num_classes=4,
        hidden=[8],
        cache_dtype="fp32",
        seed=3,
        cache_dir=str(tmp_path),
        verbose=False,
    )
    history = ft.fit(
        (X, y),
        val=(Xv, yv),
        epochs=4,
        unfreeze=[(2, 1)],
        early_stopping=HeadStageIsBest(patience=5),
        **FIT,
    )
    best = history[1]["val_loss"]  # the head stage's last epoch
    assert ft.evaluate((Xv, yv))["loss"] == pytest.approx(best, abs=1e-6)


def test_resume_after_a_manual_unfreeze_says_what_to_do(tmp_path):
    X, y = mlp_data()
    ck = str(tmp_path / "ck.pt")
    kw = dict(
        num_classes=4,
        hidden=[8],
        cache_dtype="fp32",
        seed=3,
        cache_dir=str(tmp_path),
        verbose=False,
    )
    ft = FineTuner(make_mlp_stack(), **kw)
    ft.unfreeze(1)
    ft.fit((X, y), epochs=2, checkpoint=ck, lr_decay=0.5, **FIT)
    again = FineTuner(make_mlp_stack(), **kw)  # forgot ft.unfreeze(1)
    with pytest.raises(FastFTError, match="unfreeze"):
        again.fit((X, y), epochs=3, checkpoint=ck, resume=True, lr_decay=0.5, **FIT)


def test_save_keeps_a_block_trained_then_frozen_again(tmp_path):
    X, y = mlp_data()
    kw = dict(
        num_classes=4,
        hidden=[8],
        cache_dtype="fp32",
        seed=3,
        cache_dir=str(tmp_path),
        verbose=False,
    )
    ft = FineTuner(make_mlp_stack(), **kw)
    ft.fit((X, y), epochs=2, unfreeze=[(1, 1)], **FIT)
    ft.unfreeze(0)
    ft.fit((X, y), epochs=1, **FIT)
    ft.save(str(tmp_path / "ft.pt"))
    loaded = FineTuner.load(
        str(tmp_path / "ft.pt"), make_mlp_stack(), cache_dir=str(tmp_path), verbose=False
    )
    torch.testing.assert_close(loaded.predict(X), ft.predict(X), rtol=0, atol=1e-6)


def test_a_rejected_deferred_unfreeze_is_not_recorded(tmp_path):
    class Encoder(nn.Module):
        def __init__(self):
            super().__init__()
            self.layers = nn.Sequential(
                *[nn.Sequential(nn.Linear(12, 12), nn.ReLU()) for _ in range(3)]
            )

        def forward(self, x):
            return self.layers(x)

    X, y = mlp_data()
    ft = FineTuner(
        Encoder(), num_classes=3, cache_dtype="fp32", seed=3, cache_dir=str(tmp_path), verbose=False
    )
    ft.unfreeze(7)  # more blocks than there are; checked once the head is attached
    with pytest.raises(FastFTValueError, match="3 blocks"):
        ft.fit((X, y), epochs=1, **FIT)
    history = ft.fit((X, y), epochs=1, **FIT)  # a second fit must not claim 7 unfrozen blocks
    assert history.column("unfrozen_blocks") == [None]


def test_a_rejected_unfreeze_changes_nothing(tmp_path):
    X, y = mlp_data()
    ft = FineTuner(
        make_mlp_stack(),
        num_classes=4,
        hidden=[8],
        cache_dtype="fp32",
        seed=3,
        cache_dir=str(tmp_path),
        verbose=False,
    )
    ft.unfreeze(2)
    with pytest.raises(FastFTValueError, match="3 blocks"):
        ft.unfreeze(4)
    history = ft.fit((X, y), epochs=1, **FIT)
    assert history.column("unfrozen_blocks") == [2]
    ft.save(str(tmp_path / "ft.pt"))
    loaded = FineTuner.load(
        str(tmp_path / "ft.pt"), make_mlp_stack(), cache_dir=str(tmp_path), verbose=False
    )
    assert len(list(unfrozen_blocks(loaded.model))) == 2


def test_a_failed_deep_cache_leaves_the_blocks_as_they_were(tmp_path):
    X, y = mlp_data(seed=11)  # data of its own: no cache of another test is reused in memory
    # Room for the head cut's cache (16 wide), not for the cut below block '2' (32 wide).
    ft = FineTuner(
        make_mlp_stack(),
        num_classes=4,
        hidden=[8],
        cache_dtype="fp32",
        seed=3,
        cache_dir=str(tmp_path),
        verbose=False,
        cache="host",
        max_memory=80 * 16 * 4 + 80 * 8 + 100,
    )
    with pytest.raises(CacheTooLargeError):
        ft.fit((X, y), epochs=3, unfreeze=[(1, 2)], **FIT)
    assert not list(unfrozen_blocks(ft.model))


def test_a_dataset_trains_like_the_same_tensors(tmp_path):
    X, y = token_data()

    def run(data):
        ft = FineTuner(
            make_hf_style(),
            num_classes=3,
            cache_dtype="fp32",
            seed=3,
            cache_dir=str(tmp_path),
            verbose=False,
        )
        torch.manual_seed(7)  # dropout in the unfrozen block draws from the global generator
        ft.fit(data, epochs=3, unfreeze=[(1, 1), (2, 2)], **FIT)
        return ft.model.state_dict()

    a, b = run((X, y)), run(Rows(X, y))
    for name in a:
        torch.testing.assert_close(a[name], b[name], rtol=0, atol=1e-6, msg=name)


def test_a_schedule_on_a_dataset_and_disk_cache_resumes_from_disk(tmp_path):
    """Derived caches come from the deepest cut's cache whatever the data's form; on disk a
    second tuner finds every stage's cache."""
    X, y = token_data()

    def run(data, tier):
        model = make_hf_style()
        for layer in model.layers:
            layer.dropout.p = 0.0  # independent of the global generator
        ft = FineTuner(
            model,
            num_classes=3,
            cache_dtype="fp32",
            seed=3,
            cache_dir=str(tmp_path / tier),
            verbose=False,
            cache=tier,
        )
        ft.fit(data, epochs=3, unfreeze=[(1, 1), (2, 2)], **FIT)
        return ft

    ref = run((X, y), "host")
    first = run(DataLoader(Rows(X, y), batch_size=7), "disk")
    second = run(Rows(X, y), "disk")
    assert first.cache.tier == "disk" and second.cache.telemetry["hit"]
    for ft in (first, second):
        for name, want in ref.model.state_dict().items():
            torch.testing.assert_close(
                ft.model.state_dict()[name], want, rtol=0, atol=1e-6, msg=name
            )


def test_one_number_per_sample_taps_are_cached_beside_the_sequence(tmp_path):
    # A dict-returning encoder (token count beside the embedding): with its top layer unfrozen
    # the fx split's taps include a [B] tensor, cached as a row of one and gathered back as [B].
    X = token_batch(n=40, seed=4)
    y = torch.arange(40) % 3
    ft = FineTuner(
        make_dict_encoder(),
        num_classes=3,
        cache_dtype="fp32",
        seed=3,
        cache_dir=str(tmp_path),
        verbose=False,
    )
    ft.prepare(index_select(X, torch.arange(2)))
    naive = copy.deepcopy(ft.model)
    ft.unfreeze(1)
    torch.manual_seed(5)
    ft.fit((X, y), epochs=2, batch_size=8, lr=1e-2)
    assert any(t.shape == () for t in ft.cache.taps)
    top = naive.encoder.layers[2] if hasattr(naive, "encoder") else naive.layers[2]
    top.requires_grad_(True)
    torch.manual_seed(5)
    naive_finetune(naive, X, y, epochs=2, seed=3, batch_size=8, lr=1e-2, train_modules=[top])
    for name, want in naive.state_dict().items():
        torch.testing.assert_close(ft.model.state_dict()[name], want, rtol=0, atol=1e-5, msg=name)
