"""Edge cases of progressive unfreezing: the replay split's module swap, cut modules called
with keywords, single-tensor inputs, exact non-float taps under bf16, the memory guard's
message, block discovery on torchvision-style networks, and trainer paths (early stopping
across stages, resume, save after refreezing) that must hold.
"""

from __future__ import annotations

import copy
import threading
from collections import OrderedDict

import pytest
import torch
from torch import nn

from fastft import FineTuner
from fastft.cache import FeatureCache
from fastft.cache.layout import _check_fits
from fastft.data import index_select
from fastft.errors import CacheTooLargeError, FastFTError, FastFTValueError
from fastft.model.surgery import freeze, replace_head
from fastft.model.blocks import find_blocks, trained_blocks, unfreeze_blocks, unfrozen_blocks
from models import Rows
from naive import naive_finetune
from test_unfreeze import FIT, HFStyleEncoder, _MaskedAttention, make_hf_style, make_mlp_stack, mlp_data, token_data

pytestmark = pytest.mark.filterwarnings("ignore:fastft runs the frozen layers in eval mode")


def _oracle(make_model, X, y, tmp_path, *, blocks: int = 1, epochs: int = 2) -> tuple[FineTuner, nn.Module]:
    """FineTuner with the top ``blocks`` unfrozen vs plain PyTorch training of the same blocks."""
    ft = FineTuner(make_model(), num_classes=3, cache_dtype="fp32", seed=3, cache_dir=str(tmp_path), verbose=False)
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


# ---------------------------------------------------------------------------- replay split
@pytest.mark.filterwarnings("ignore::fastft.errors.CacheReuseWarning")  # instrumentation state
def test_replay_restores_an_instance_forward_that_was_there(tmp_path):
    """accelerate (and users) wrap a module by setting ``module.forward`` on the instance; the
    replay's own swap must put that one back, not delete it, also when the model raises."""
    X, y = token_data()
    ft = FineTuner(make_hf_style(), num_classes=3, cache_dtype="fp32", seed=3, cache_dir=str(tmp_path), verbose=False)
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
    ft = FineTuner(make_hf_style(), num_classes=3, cache_dtype="fp32", seed=3, cache_dir=str(tmp_path), verbose=False)
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
    ft = FineTuner(make_hf_style(), num_classes=3, cache_dtype="fp32", seed=3, cache_dir=str(tmp_path), verbose=False)
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
        torch.testing.assert_close(ft.model(index_select(X, torch.arange(8))), want, rtol=0, atol=1e-5)


class _KeywordEncoder(HFStyleEncoder):
    """Its layers get the hidden states as a keyword (``layer(h=..., additive_mask=...)``),
    as some Hugging Face encoders do (``hidden_states=``)."""

    def run_layer(self, layer, h, additive):
        return layer(h=h, additive_mask=additive)[0]


class _HiddenStatesLayer(_MaskedAttention):
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


@pytest.mark.parametrize("cls, keyword", [(_KeywordEncoder, "h"), (_HiddenStatesEncoder, "hidden_states")])
@pytest.mark.parametrize("blocks", [1, 2])
def test_replay_cut_taking_its_hidden_states_as_a_keyword_equals_naive(blocks, cls, keyword, tmp_path):
    X, y = token_data()
    ft, _ = _oracle(lambda: _keyword_encoder(cls), X, y, tmp_path, blocks=blocks)
    assert ft.prefix.method == "replay"
    assert ft.cache.taps[0].name == f"layers.{3 - blocks}.input" and ft.cache.taps[0].shape == (10, 16)
    assert f"keyword {keyword}" in ft.prefix.signature()


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


# ---------------------------------------------------------------------------- cache: exact taps
class _IdsPrefix(nn.Module):
    def forward(self, x):
        return x["h"], x["ids"]


@pytest.mark.parametrize("out_dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("dtype", ["fp16", "int8"])
def test_token_ids_come_back_exactly_in_any_out_dtype(dtype, out_dtype, tmp_path):
    """Training under amp='bf16' gathers in bf16, which rounds integers above 256: token ids
    (e.g. 30521) must still come back exact."""
    ids = torch.arange(30500, 30524).view(8, 3)
    data = ({"h": torch.randn(8, 4, 3), "ids": ids}, torch.zeros(8, dtype=torch.long))
    cache = FeatureCache.build(_IdsPrefix(), data, dtype=dtype, tier="host", progress=False, dataset_id="ids",
                               cache_dir=str(tmp_path))
    h, got = cache.gather_shaped(torch.arange(8), out_dtype=out_dtype)
    assert got.dtype == torch.int64 and torch.equal(got, ids)
    assert h.dtype == out_dtype and h.shape == (8, 4, 3)
    flat = cache.gather(torch.arange(8), out_dtype=out_dtype)  # gather keeps its out_dtype contract
    assert flat[1].dtype == out_dtype
    torch.testing.assert_close(flat[1], ids.to(out_dtype))


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
    ft = FineTuner(model, num_classes=3, cache_dtype="fp32", seed=3, cache_dir=str(tmp_path), verbose=False)
    ft.unfreeze(1)
    ft.build_cache((X, y))
    model.seen.clear()
    ft.fit((X, y), epochs=1, amp="bf16", **FIT)
    assert ft.prefix.method == "replay" and model.seen
    valid = torch.cat([X["input_ids"].flatten()])
    for ids in model.seen:
        assert ids.dtype == torch.int64
        assert torch.isin(ids, valid).all()


# ---------------------------------------------------------------------------- memory guard
def test_memory_guard_message_names_real_sizes():
    with pytest.raises(CacheTooLargeError) as small:
        _check_fits("host", 131_584, torch.device("cpu"), 1_000)
    text = str(small.value)
    assert "0.00 GiB" not in text and "131,584 bytes" in text and "1,000 bytes" in text
    assert "cache='disk'" in text and "cache='auto'" in text

    with pytest.raises(CacheTooLargeError, match=r"fp16 about 1\.5 GiB, int8 about 0\.75 GiB"):
        _check_fits("host", 3 * 2**30, torch.device("cpu"), 2**30, torch.float32)
    with pytest.raises(CacheTooLargeError) as from_fp16:
        _check_fits("host", 3 * 2**30, torch.device("cpu"), 2**30, torch.float16)
    assert "int8 about 1.5 GiB" in str(from_fp16.value) and "fp16 about" not in str(from_fp16.value)
    with pytest.raises(CacheTooLargeError, match="no smaller cache_dtype"):
        _check_fits("host", 3 * 2**30, torch.device("cpu"), 2**30, torch.int8)
    _check_fits("host", 2**30, torch.device("cpu"), 2**30, torch.float32)  # fits: no error


# ---------------------------------------------------------------------------- find_blocks
class _Bottleneck(nn.Module):
    def __init__(self, c_in, c, downsample=False):
        super().__init__()
        self.conv1, self.bn1 = nn.Conv2d(c_in, c, 1, bias=False), nn.BatchNorm2d(c)
        self.conv2, self.bn2 = nn.Conv2d(c, c, 3, padding=1, bias=False), nn.BatchNorm2d(c)
        self.conv3, self.bn3 = nn.Conv2d(c, 4 * c, 1, bias=False), nn.BatchNorm2d(4 * c)
        self.relu = nn.ReLU()
        self.downsample = nn.Sequential(nn.Conv2d(c_in, 4 * c, 1, bias=False), nn.BatchNorm2d(4 * c)) \
            if downsample else None

    def forward(self, x):
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.relu(self.bn2(self.conv2(out)))
        out = self.bn3(self.conv3(out))
        return self.relu(out + (x if self.downsample is None else self.downsample(x)))


class _TorchvisionResNet(nn.Module):
    """torchvision's ResNet-50 layout (conv1, bn1, layer1..layer4 Sequentials of Bottlenecks
    with a downsample Sequential in each first block, fc), small."""

    def __init__(self, layers=(3, 4, 6, 3)):
        super().__init__()
        self.conv1, self.bn1 = nn.Conv2d(3, 8, 3, padding=1, bias=False), nn.BatchNorm2d(8)
        self.relu, self.maxpool = nn.ReLU(), nn.MaxPool2d(2)
        c_in = 8
        for i, n in enumerate(layers, start=1):
            blocks = [_Bottleneck(c_in, 4 * i, downsample=True)] + [_Bottleneck(16 * i, 4 * i) for _ in range(n - 1)]
            setattr(self, f"layer{i}", nn.Sequential(*blocks))
            c_in = 16 * i
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(c_in, 10)

    def forward(self, x):
        x = self.maxpool(self.relu(self.bn1(self.conv1(x))))
        x = self.layer4(self.layer3(self.layer2(self.layer1(x))))
        return self.fc(torch.flatten(self.avgpool(x), 1))


def test_find_blocks_on_a_torchvision_style_resnet():
    model = _TorchvisionResNet()
    names = [n for n, _ in find_blocks(model)]
    assert names == [f"layer{i}.{j}" for i, n in enumerate((3, 4, 6, 3), start=1) for j in range(n)]
    # The common feature-extractor idiom wraps the children in a Sequential: same blocks.
    wrapped = nn.Sequential(*list(model.children())[:-1])
    assert [n for n, _ in find_blocks(wrapped)] == [f"{i + 3}.{j}" for i, n in enumerate((3, 4, 6, 3), start=1)
                                                   for j in range(n)]
    replace_head(model, num_classes=2)
    freeze(model, except_new=True)
    assert unfreeze_blocks(model, 2) == ["layer4.1", "layer4.2"]
    assert model.layer4[2].bn3.weight.requires_grad and not model.layer4[0].conv1.weight.requires_grad


class _EncoderBlock(nn.Module):
    def __init__(self, dim=8):
        super().__init__()
        self.ln_1, self.mlp = nn.LayerNorm(dim), nn.Sequential(nn.Linear(dim, dim), nn.GELU(), nn.Linear(dim, dim))

    def forward(self, x):
        return x + self.mlp(self.ln_1(x))


def test_find_blocks_on_vit_layouts():
    class TorchvisionViT(nn.Module):  # encoder.layers: a Sequential of named EncoderBlocks
        def __init__(self):
            super().__init__()
            self.conv_proj = nn.Conv2d(3, 8, 4, 4)
            self.encoder = nn.Module()
            self.encoder.layers = nn.Sequential(OrderedDict((f"encoder_layer_{i}", _EncoderBlock()) for i in range(4)))
            self.encoder.ln = nn.LayerNorm(8)
            self.heads = nn.Sequential(OrderedDict(head=nn.Linear(8, 10)))

    class TimmViT(nn.Module):  # blocks: a Sequential; norm and head after it
        def __init__(self):
            super().__init__()
            self.patch_embed = nn.Conv2d(3, 8, 4, 4)
            self.blocks = nn.Sequential(*[_EncoderBlock() for _ in range(4)])
            self.norm, self.head = nn.LayerNorm(8), nn.Linear(8, 10)

    assert [n for n, _ in find_blocks(TorchvisionViT())] == [f"encoder.layers.encoder_layer_{i}" for i in range(4)]
    assert [n for n, _ in find_blocks(TimmViT())] == [f"blocks.{i}" for i in range(4)]


def test_find_blocks_descends_into_stages_of_blocks():
    """torchvision's ConvNeXt/Swin/EfficientNet: ``features`` is a Sequential of a stem, stage
    Sequentials of blocks and downsampling Sequentials. The blocks are the stages' blocks (in
    execution order, downsamplers between them), not whole stages."""
    def downsample():
        return nn.Sequential(nn.LayerNorm(8), nn.Linear(8, 8))

    features = nn.Sequential(
        nn.Sequential(nn.Conv2d(3, 8, 4, 4), nn.LayerNorm(8)),  # stem: no blocks inside
        nn.Sequential(_EncoderBlock(), _EncoderBlock(), _EncoderBlock()),
        downsample(),
        nn.Sequential(_EncoderBlock(), _EncoderBlock()),
        downsample(),
        nn.Sequential(_EncoderBlock()),  # a stage of one block: the stage is that block
    )
    model = nn.Module()
    model.features = features
    model.classifier = nn.Linear(8, 3)
    names = [n for n, _ in find_blocks(model)]
    assert names == ["features.0", "features.1.0", "features.1.1", "features.1.2", "features.2",
                     "features.3.0", "features.3.1", "features.4", "features.5"]
    # An MLP written as a Sequential of (Linear, ReLU) pairs: the pairs are the blocks.
    mlp = nn.Sequential(*[nn.Sequential(nn.Linear(4, 4), nn.ReLU()) for _ in range(3)])
    assert [n for n, _ in find_blocks(mlp)] == ["0", "1", "2"]


# ---------------------------------------------------------------------------- trainer paths
def test_a_refrozen_block_is_marked_trained():
    model = make_mlp_stack()
    replace_head(model, num_classes=2)
    unfreeze_blocks(model, 2)
    unfreeze_blocks(model, 1)
    unfreeze_blocks(model, 0)
    assert not list(unfrozen_blocks(model))
    assert {id(m) for m in trained_blocks(model)} == {id(model[2]), id(model[4])}


def test_unfreeze_before_the_head_is_attached_applies_after_the_probe(tmp_path):
    class Encoder(nn.Module):  # no classifier: the head is appended after a probe batch
        def __init__(self):
            super().__init__()
            torch.manual_seed(0)
            self.stem = nn.Linear(12, 16)
            self.layers = nn.Sequential(*[nn.Sequential(nn.Linear(16, 16), nn.ReLU()) for _ in range(3)])
            self.norm = nn.LayerNorm(16)  # ends in no Linear: there is no classifier to replace

        def forward(self, x):
            return self.norm(self.layers(self.stem(x)))

    X, y = mlp_data()
    ft = FineTuner(Encoder(), num_classes=3, cache_dtype="fp32", seed=3, cache_dir=str(tmp_path), verbose=False)
    assert ft.tuned.head_spec is None and ft.unfreeze(1) == []  # the model is not edited yet
    history = ft.fit((X, y), epochs=2, **FIT)
    assert [m for m, _ in unfrozen_blocks(ft.model)] == [ft.model.get_submodule(find_blocks(ft.model)[-1][0])]
    assert history.column("unfrozen_blocks") == [1, 1]
    assert ft.cache.taps[0].shape == (16,)


def test_early_stopping_restores_a_best_epoch_of_an_earlier_stage(tmp_path):
    from fastft.train import EarlyStopping

    class HeadStageIsBest(EarlyStopping):
        def step(self, record, module):
            penalty = 10.0 if record.get("unfrozen_blocks") else 0.0
            return super().step(dict(record, val_loss=record["val_loss"] + penalty), module)

    X, y = mlp_data()
    Xv, yv = mlp_data(40, seed=9)
    ft = FineTuner(make_mlp_stack(), num_classes=4, hidden=[8], cache_dtype="fp32", seed=3,
                   cache_dir=str(tmp_path), verbose=False)
    history = ft.fit((X, y), val=(Xv, yv), epochs=4, unfreeze=[(2, 1)], early_stopping=HeadStageIsBest(patience=5),
                     **FIT)
    best = history[1]["val_loss"]  # the head stage's last epoch
    assert ft.evaluate((Xv, yv))["loss"] == pytest.approx(best, abs=1e-6)


def test_resume_after_a_manual_unfreeze_says_what_to_do(tmp_path):
    X, y = mlp_data()
    ck = str(tmp_path / "ck.pt")
    kw = dict(num_classes=4, hidden=[8], cache_dtype="fp32", seed=3, cache_dir=str(tmp_path), verbose=False)
    ft = FineTuner(make_mlp_stack(), **kw)
    ft.unfreeze(1)
    ft.fit((X, y), epochs=2, checkpoint=ck, lr_decay=0.5, **FIT)
    again = FineTuner(make_mlp_stack(), **kw)  # forgot ft.unfreeze(1)
    with pytest.raises(FastFTError, match="unfreeze"):
        again.fit((X, y), epochs=3, checkpoint=ck, resume=True, lr_decay=0.5, **FIT)


def test_save_keeps_a_block_trained_then_frozen_again(tmp_path):
    X, y = mlp_data()
    kw = dict(num_classes=4, hidden=[8], cache_dtype="fp32", seed=3, cache_dir=str(tmp_path), verbose=False)
    ft = FineTuner(make_mlp_stack(), **kw)
    ft.fit((X, y), epochs=2, unfreeze=[(1, 1)], **FIT)
    ft.unfreeze(0)
    ft.fit((X, y), epochs=1, **FIT)
    ft.save(str(tmp_path / "ft.pt"))
    loaded = FineTuner.load(str(tmp_path / "ft.pt"), make_mlp_stack(), cache_dir=str(tmp_path), verbose=False)
    torch.testing.assert_close(loaded.predict(X), ft.predict(X), rtol=0, atol=1e-6)


def test_a_rejected_deferred_unfreeze_is_not_recorded(tmp_path):
    class Encoder(nn.Module):
        def __init__(self):
            super().__init__()
            self.layers = nn.Sequential(*[nn.Sequential(nn.Linear(12, 12), nn.ReLU()) for _ in range(3)])

        def forward(self, x):
            return self.layers(x)

    X, y = mlp_data()
    ft = FineTuner(Encoder(), num_classes=3, cache_dtype="fp32", seed=3, cache_dir=str(tmp_path), verbose=False)
    ft.unfreeze(7)  # more blocks than there are; checked once the head is attached
    with pytest.raises(FastFTValueError, match="3 blocks"):
        ft.fit((X, y), epochs=1, **FIT)
    history = ft.fit((X, y), epochs=1, **FIT)  # a second fit must not claim 7 unfrozen blocks
    assert history.column("unfrozen_blocks") == [None]


def test_a_rejected_unfreeze_changes_nothing(tmp_path):
    X, y = mlp_data()
    ft = FineTuner(make_mlp_stack(), num_classes=4, hidden=[8], cache_dtype="fp32", seed=3, cache_dir=str(tmp_path),
                   verbose=False)
    ft.unfreeze(2)
    with pytest.raises(FastFTValueError, match="3 blocks"):
        ft.unfreeze(4)
    history = ft.fit((X, y), epochs=1, **FIT)
    assert history.column("unfrozen_blocks") == [2]
    ft.save(str(tmp_path / "ft.pt"))
    loaded = FineTuner.load(str(tmp_path / "ft.pt"), make_mlp_stack(), cache_dir=str(tmp_path), verbose=False)
    assert len(list(unfrozen_blocks(loaded.model))) == 2


def test_a_failed_deep_cache_leaves_the_blocks_as_they_were(tmp_path):
    X, y = mlp_data(seed=11)  # data of its own: no cache of another test is reused in memory
    # Room for the head cut's cache (16 wide), not for the cut below block '2' (32 wide).
    ft = FineTuner(make_mlp_stack(), num_classes=4, hidden=[8], cache_dtype="fp32", seed=3, cache_dir=str(tmp_path),
                   verbose=False, cache="host", max_memory=80 * 16 * 4 + 80 * 8 + 100)
    with pytest.raises(CacheTooLargeError):
        ft.fit((X, y), epochs=3, unfreeze=[(1, 2)], **FIT)
    assert not list(unfrozen_blocks(ft.model))


def test_a_dataset_trains_like_the_same_tensors(tmp_path):
    X, y = token_data()

    def run(data):
        ft = FineTuner(make_hf_style(), num_classes=3, cache_dtype="fp32", seed=3, cache_dir=str(tmp_path),
                       verbose=False)
        torch.manual_seed(7)  # dropout in the unfrozen block draws from the global generator
        ft.fit(data, epochs=3, unfreeze=[(1, 1), (2, 2)], **FIT)
        return ft.model.state_dict()

    a, b = run((X, y)), run(Rows(X, y))
    for name in a:
        torch.testing.assert_close(a[name], b[name], rtol=0, atol=1e-6, msg=name)


def test_a_schedule_on_a_dataset_and_disk_cache_resumes_from_disk(tmp_path):
    """Derived caches come from the deepest cut's cache whatever the data's form; on disk a
    second tuner finds every stage's cache."""
    from torch.utils.data import DataLoader

    X, y = token_data()

    def run(data, tier):
        model = make_hf_style()
        for layer in model.layers:
            layer.dropout.p = 0.0  # independent of the global generator
        ft = FineTuner(model, num_classes=3, cache_dtype="fp32", seed=3, cache_dir=str(tmp_path / tier),
                       verbose=False, cache=tier)
        ft.fit(data, epochs=3, unfreeze=[(1, 1), (2, 2)], **FIT)
        return ft

    ref = run((X, y), "host")
    first = run(DataLoader(Rows(X, y), batch_size=7), "disk")
    second = run(Rows(X, y), "disk")
    assert first.cache.tier == "disk" and second.cache.telemetry["hit"]
    for ft in (first, second):
        for name, want in ref.model.state_dict().items():
            torch.testing.assert_close(ft.model.state_dict()[name], want, rtol=0, atol=1e-6, msg=name)


def test_one_number_per_sample_taps_are_cached_beside_the_sequence(tmp_path):
    # A dict-returning encoder (token count beside the embedding): with its top layer unfrozen
    # the fx split's taps include a [B] tensor, cached as a row of one and gathered back as [B].
    from models import make_dict_encoder, token_batch

    X = token_batch(n=40, seed=4)
    y = torch.arange(40) % 3
    ft = FineTuner(make_dict_encoder(), num_classes=3, cache_dtype="fp32", seed=3, cache_dir=str(tmp_path),
                   verbose=False)
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
