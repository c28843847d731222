"""The replay split: the tail replays the model's own forward with the modules below the cut
skipped. Its swap of the skipped modules' forward restores what was there (an instance
forward, a nested replay, replays from several threads); cut modules called with keywords,
models taking one tensor, modules that also run after the cut and in-place writes between
the skipped modules and the cut train like plain PyTorch; under bf16 the model still reads
exact token ids from the cache.
"""

from __future__ import annotations

import copy
import threading

import pytest
import torch
from torch import nn

from fastft import FineTuner
from fastft.data import index_select
from fastft.model.blocks import find_blocks

from helpers.data import token_data
from helpers.models import HFStyleEncoder, MaskedAttention, make_hf_style
from helpers.oracle import FIT, naive_finetune

pytestmark = pytest.mark.filterwarnings("ignore:fastft runs the frozen layers in eval mode")


def _oracle(
    make_model, X, y, tmp_path, *, blocks: int = 1, epochs: int = 2
) -> tuple[FineTuner, nn.Module]:
    """FineTuner with the top ``blocks`` unfrozen vs plain PyTorch training of the same blocks."""
    ft = FineTuner(
        make_model(),
        num_classes=3,
        cache_dtype="fp32",
        seed=3,
        cache_dir=str(tmp_path),
        verbose=False,
    )
    ft.prepare(index_select(X, torch.arange(4)))
    naive = copy.deepcopy(ft.model)
    ft.unfreeze(blocks)
    torch.manual_seed(7)
    ft.fit((X, y), epochs=epochs, **FIT)
    top = [m for _, m in find_blocks(naive)][-blocks:]
    for b in top:
        b.requires_grad_(True)
    torch.manual_seed(7)
    naive_finetune(naive, X, y, epochs=epochs, seed=3, train_modules=top, **FIT)
    got, want = ft.model.state_dict(), naive.state_dict()
    for name in want:
        torch.testing.assert_close(got[name], want[name], rtol=0, atol=1e-5, msg=name)
    return ft, naive


# ---------------------------------------------------------------------------- the swap
@pytest.mark.filterwarnings("ignore::fastft.errors.CacheReuseWarning")  # instrumentation state
def test_replay_restores_an_instance_forward_that_was_there(tmp_path):
    """accelerate (and users) wrap a module by setting ``module.forward`` on the instance; the
    replay's own swap must put that one back, not delete it, also when the model raises."""
    X, y = token_data()
    ft = FineTuner(
        make_hf_style(),
        num_classes=3,
        cache_dtype="fp32",
        seed=3,
        cache_dir=str(tmp_path),
        verbose=False,
    )
    ft.prepare(index_select(X, torch.arange(4)))
    embed = ft.model.embed
    calls = []
    plain = embed.forward

    def wrapped(*args, **kwargs):
        calls.append(1)
        return plain(*args, **kwargs)

    embed.forward = wrapped
    ft.unfreeze(1)
    ft.fit((X, y), epochs=1, **FIT)  # the split's parity check and every step replay the forward
    assert ft.prefix.method == "replay"
    assert embed.__dict__["forward"] is wrapped
    calls.clear()
    ft.model(index_select(X, torch.arange(2)))
    assert calls == [1]  # the wrapper still runs outside a replay

    hidden = torch.zeros(2, 10, 16)
    with pytest.raises(RuntimeError, match="inside"):
        with ft.tail.body.replaying(hidden):
            assert embed.__dict__["forward"] is not wrapped  # skipped while inside
            raise RuntimeError("inside")
    assert embed.__dict__["forward"] is wrapped
    # Without an instance forward before, none is left behind.
    del embed.forward
    with ft.tail.body.replaying(hidden):
        pass
    assert "forward" not in embed.__dict__


def test_replay_nested_inside_itself_restores_the_outer_swap(tmp_path):
    X, y = token_data()
    ft = FineTuner(
        make_hf_style(),
        num_classes=3,
        cache_dtype="fp32",
        seed=3,
        cache_dir=str(tmp_path),
        verbose=False,
    )
    ft.unfreeze(1)
    ft.build_cache((X, y))
    body, embed = ft.tail.body, ft.model.embed
    with body.replaying(torch.zeros(2, 10, 16)):
        outer = embed.__dict__["forward"]
        with body.replaying(torch.zeros(3, 10, 16)):
            pass
        assert embed.__dict__["forward"] is outer
    assert "forward" not in embed.__dict__


def test_replays_from_several_threads_leave_the_model_as_it_was(tmp_path):
    """predict() served from threads: each replay swaps the skipped modules' forward; two at
    once must not leave a placeholder forward installed for good."""
    X, y = token_data()
    ft = FineTuner(
        make_hf_style(),
        num_classes=3,
        cache_dtype="fp32",
        seed=3,
        cache_dir=str(tmp_path),
        verbose=False,
    )
    ft.unfreeze(1)
    ft.build_cache((X, y))
    taps = ft.cache.gather_shaped(torch.arange(8))
    ft.tail.eval()  # no dropout in the unfrozen block: every call gives the same output
    with torch.no_grad():
        want = ft.tail(*taps)
    wrong = []

    def work():
        for _ in range(50):
            with torch.no_grad():
                wrong.append(not torch.allclose(ft.tail(*taps), want, rtol=0, atol=1e-6))

    threads = [threading.Thread(target=work) for _ in range(3)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(wrong) == 150 and not any(wrong)
    assert not any("forward" in m.__dict__ for m in ft.model.modules())
    with torch.no_grad():  # the whole model computes again, nothing skipped
        torch.testing.assert_close(
            ft.model(index_select(X, torch.arange(8))), want, rtol=0, atol=1e-5
        )


# ------------------------------------------------------------------------ cuts called with keywords
class _KeywordEncoder(HFStyleEncoder):
    """Its layers get the hidden states as a keyword (``layer(h=..., additive_mask=...)``),
    as some Hugging Face encoders do (``hidden_states=``)."""

    def run_layer(self, layer, h, additive):
        return layer(h=h, additive_mask=additive)[0]


class _HiddenStatesLayer(MaskedAttention):
    def forward(self, *, attention_mask, hidden_states):  # the mask comes first among the keywords
        return super().forward(hidden_states, attention_mask)


class _HiddenStatesEncoder(HFStyleEncoder):
    """Layers called as ``layer(attention_mask=..., hidden_states=...)``, Hugging Face style."""

    def __init__(self):
        super().__init__()
        self.layers = nn.ModuleList(_HiddenStatesLayer(16) for _ in range(3))

    def run_layer(self, layer, h, additive):
        return layer(attention_mask=additive, hidden_states=h)[0]


def _keyword_encoder(cls=_KeywordEncoder):
    torch.manual_seed(0)
    return cls()


@pytest.mark.parametrize(
    "cls, keyword", [(_KeywordEncoder, "h"), (_HiddenStatesEncoder, "hidden_states")]
)
@pytest.mark.parametrize("blocks", [1, 2])
def test_replay_cut_taking_its_hidden_states_as_a_keyword_equals_naive(
    blocks, cls, keyword, tmp_path
):
    X, y = token_data()
    ft, _ = _oracle(lambda: _keyword_encoder(cls), X, y, tmp_path, blocks=blocks)
    assert ft.prefix.method == "replay"
    assert ft.cache.taps[0].name == f"layers.{3 - blocks}.input" and ft.cache.taps[0].shape == (
        10,
        16,
    )
    assert f"keyword {keyword}" in ft.prefix.signature()


# ---------------------------------------------------------------------------- what the replay skips
class _TensorEncoder(nn.Module):
    """Untraceable (a Python branch on values), one tensor as input, a frozen pooler after
    the stack: only the replay split can cut it below the top block."""

    def __init__(self):
        super().__init__()
        self.stem = nn.Linear(8, 16)
        self.layers = nn.ModuleList(nn.Sequential(nn.Linear(16, 16), nn.Tanh()) for _ in range(3))
        self.pool = nn.Linear(16, 16)
        self.classifier = nn.Linear(16, 3)

    def forward(self, x):
        if float(x.abs().sum()) < 0:
            raise ValueError("never")
        h = self.stem(x)
        for layer in self.layers:
            h = layer(h)
        return self.classifier(torch.tanh(self.pool(h.mean(1))) + h.mean(1))


def _tensor_encoder() -> _TensorEncoder:
    torch.manual_seed(0)
    return _TensorEncoder()


def test_replay_of_a_model_taking_one_tensor_equals_naive(tmp_path):
    g = torch.Generator().manual_seed(2)
    X, y = torch.randn(48, 5, 8, generator=g), torch.randint(0, 3, (48,), generator=g)
    ft, _ = _oracle(_tensor_encoder, X, y, tmp_path, blocks=2)
    assert ft.prefix.method == "replay"
    assert [t.name for t in ft.cache.taps] == ["layers.1.input", "input"]


def test_replay_does_not_skip_a_module_that_also_runs_after_the_cut(tmp_path):
    class Shared(HFStyleEncoder):  # the frozen embedding runs before the layers and again after
        def forward(self, batch):
            ids, _, additive = self.inputs(batch)
            h = self.run_layers(self.embed(ids), additive)
            h = h + self.embed(ids)  # reads the skipped module's output after the cut
            return self.classifier(torch.tanh(self.pooler(h[:, 0])))

    def make():
        torch.manual_seed(0)
        return Shared()

    X, y = token_data()
    ft, _ = _oracle(make, X, y, tmp_path)  # equal to naive training: the embedding really runs
    skipped = [m for m, _ in ft.tail.body._skip]
    assert ft.prefix.method == "replay" and ft.model.embed not in skipped
    assert skipped == [ft.model.layers[0], ft.model.layers[1]]


def test_replay_of_a_model_writing_in_place_between_the_skipped_modules_and_the_cut(tmp_path):
    class InPlace(HFStyleEncoder):  # like XLM's ``tensor *= mask`` after its embedding
        def forward(self, batch):
            ids, mask, additive = self.inputs(batch)
            h = self.embed(ids)
            h *= mask.unsqueeze(-1).float()
            h = self.run_layers(h, additive)
            return self.classifier(torch.tanh(self.pooler(h[:, 0])))

    def make():
        torch.manual_seed(0)
        return InPlace()

    X, y = token_data()
    ft, _ = _oracle(make, X, y, tmp_path)
    assert ft.prefix.method == "replay"


# ---------------------------------------------------------------------------- token ids under bf16
@pytest.mark.filterwarnings("ignore::fastft.errors.CacheReuseWarning")  # instrumentation state
def test_bf16_training_on_a_replay_cache_sees_the_token_ids(tmp_path):
    """The replay tail gets the model's own inputs back from the cache; under amp='bf16' the
    ids the model reads after the cut must be the cached ones."""

    class IdsAfterCut(HFStyleEncoder):
        def __init__(self):
            super().__init__(vocab=3000)
            self.seen = []

        def forward(self, batch):
            ids, _, additive = self.inputs(batch)
            self.seen.append(ids)
            h = self.run_layers(self.embed(ids), additive)
            return self.classifier(torch.tanh(self.pooler(h[:, 0])))

    torch.manual_seed(0)
    model = IdsAfterCut()
    X, y = token_data()
    X = {**X, "input_ids": X["input_ids"] * 37 + 1000}  # ids 1000..2800: not exact in bf16
    ft = FineTuner(
        model, num_classes=3, cache_dtype="fp32", seed=3, cache_dir=str(tmp_path), verbose=False
    )
    ft.unfreeze(1)
    ft.build_cache((X, y))
    model.seen.clear()
    ft.fit((X, y), epochs=1, amp="bf16", **FIT)
    assert ft.prefix.method == "replay" and model.seen
    valid = torch.cat([X["input_ids"].flatten()])
    for ids in model.seen:
        assert ids.dtype == torch.int64
        assert torch.isin(ids, valid).all()
