"""fastft.split: the edited model cut into a frozen prefix (cached) and a trainable tail.

For every model: ``tail(*prefix(x))`` equals the edited model in eval mode, the tail's
trainable parameters are exactly the new ones, and the prefix holds only frozen weights.
Skip connections across the cut give several taps; models torch.fx cannot trace go through
the hook fallback; every way a split can fail says why.
"""

from __future__ import annotations

import copy
import io
import warnings

import pytest
import torch
from torch import nn

import fastft
from fastft.errors import SplitError
from fastft.model import surgery

from helpers.data import image_batch, mlp_batch, token_batch
from helpers.models import (
    load_minilm_or_skip,
    make_dict_encoder,
    make_dynamic,
    make_mlp,
    make_resnet,
    make_text_encoder,
    make_vit,
)


def edited(
    model: nn.Module, *, head: int | None = 3, after: str | None = None, insert=None
) -> nn.Module:
    """Replace the head and/or insert layers, then freeze everything that is not new."""
    if head is not None:
        surgery.replace_head(model, num_classes=head)
    if after is not None:
        surgery.insert_layers(model, after=after, modules=insert)
    surgery.freeze(model, except_new=True)
    return model


def quiet_split(model, x, **kw):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # the train-mode notice has its own test
        return fastft.split(model, x, **kw)


def eval_output(model, x):
    modes = [m.training for m in model.modules()]
    model.eval()
    with torch.no_grad():
        out = model(dict(x) if isinstance(x, dict) else x)
    for m, mode in zip(model.modules(), modes):
        m.training = mode
    return out


def assert_split_is_exact(model, prefix, tail, x, atol=1e-6):
    """tail(*prefix(x)) equals the model, both in eval mode (new dropout layers off)."""
    tail.eval()
    taps = prefix(x)
    assert isinstance(taps, tuple) and len(taps) == len(prefix.tap_names) == len(tail.tap_names)
    assert all(
        isinstance(t, torch.Tensor) and t.shape[0] == 4 and not t.requires_grad for t in taps
    )
    torch.testing.assert_close(tail(*taps), eval_output(model, x), rtol=0, atol=atol)


def assert_trains_exactly_the_new_modules(model, prefix, tail):
    new = {
        id(p) for name in surgery.new_modules(model) for p in model.get_submodule(name).parameters()
    }
    assert new and {id(p) for p in tail.parameters() if p.requires_grad} == new
    assert not any(p.requires_grad for p in prefix.parameters())
    assert not {id(p) for p in prefix.parameters()} & new


# ---------------------------------------------------------------------------- the models
CASES = {
    "mlp": (make_mlp, mlp_batch, dict(), ["4"]),
    "resnet_head": (make_resnet, image_batch, dict(), ["flatten"]),
    "vit_cls_token": (make_vit, image_batch, dict(), ["getitem_1"]),
    "text_masked_mean": (make_text_encoder, token_batch, dict(), ["classifier.0"]),
    "mlp_hidden_layers": (
        make_mlp,
        mlp_batch,
        dict(after="4", insert=[nn.Linear(16, 16), nn.ReLU()]),
        ["4"],
    ),
}


@pytest.mark.parametrize("case", sorted(CASES))
def test_split_parity_and_trainable_set(case):
    make, batch, kw, taps = CASES[case]
    model, x = edited(make(), **kw), batch()
    prefix, tail = quiet_split(model, x)
    assert (prefix.method, prefix.tap_names) == ("fx", taps)
    assert_split_is_exact(model, prefix, tail, x)
    assert_split_is_exact(model, prefix, tail, batch(seed=7))  # not only on the probe batch
    assert_trains_exactly_the_new_modules(model, prefix, tail)


def test_resnet_layer_between_two_blocks_gives_one_tap_and_frozen_blocks_in_the_tail():
    model = edited(make_resnet(), head=None, after="layer1.0", insert=[nn.Conv2d(8, 8, 1)])
    x = image_batch()
    prefix, tail = quiet_split(model, x)
    assert prefix.tap_names == ["layer1.0"]
    assert_split_is_exact(model, prefix, tail, x)
    assert_trains_exactly_the_new_modules(model, prefix, tail)
    # The frozen blocks after the new layer run in the tail, in eval mode even when it trains.
    block = model.layer2[0]
    assert any(m is block for m in tail.modules())
    stats = [b.detach().clone() for b in model.buffers()]
    tail.train()
    assert tail.training and model.layer1[1].training
    assert not block.training and not model.layer2[1].bn1.training and not model.fc.training
    tail(*prefix(x)).square().mean().backward()
    assert all(torch.equal(a, b) for a, b in zip(stats, model.buffers()))  # running stats untouched
    assert model.layer1[1].weight.grad is not None and model.fc.weight.grad is None


def test_resnet_layer_inside_a_block_before_the_addition_gives_two_taps():
    model = edited(make_resnet(), head=4, after="layer1.1.bn2", insert=[nn.Conv2d(8, 8, 1)])
    x = image_batch()
    prefix, tail = quiet_split(model, x)
    # The block's input (its skip connection) and the frozen bn2's output both cross the cut.
    assert prefix.tap_names == ["layer1.0", "layer1.1.bn2.0"]
    assert [tuple(t.shape) for t in prefix(x)] == [(4, 8, 8, 8), (4, 8, 8, 8)]
    assert_split_is_exact(model, prefix, tail, x)
    assert_trains_exactly_the_new_modules(model, prefix, tail)


def test_vit_layer_after_the_first_block():
    model = edited(make_vit(), after="blocks.0", insert=[nn.Linear(16, 16)])
    x = image_batch()
    prefix, tail = quiet_split(model, x)
    assert prefix.tap_names == ["blocks.0.0"]
    assert_split_is_exact(model, prefix, tail, x)
    assert_trains_exactly_the_new_modules(model, prefix, tail)
    tail.train()
    assert not model.blocks[1].dropout.training and model.blocks[0][1].training


def test_dict_encoder_with_appended_head():
    model = surgery.append_head(
        make_dict_encoder(), [nn.Linear(16, 8), nn.ReLU(), nn.Dropout(0.5), nn.Linear(8, 5)]
    )
    surgery.freeze(model, except_new=True)
    x = token_batch()
    prefix, tail = quiet_split(model, x)
    assert prefix.method == "fx" and len(prefix.tap_names) == 1
    assert torch.equal(prefix(x)[0], eval_output(model.encoder, x)["sentence_embedding"])
    assert_split_is_exact(model, prefix, tail, x)
    assert_trains_exactly_the_new_modules(model, prefix, tail)
    assert set(x) == {"input_ids", "attention_mask"}  # the caller's batch was not written into
    tail.train()
    assert model.head[2].training  # dropout inside the new head trains with it


def test_trainable_but_not_new_modules_go_to_the_tail():
    model = make_resnet()
    surgery.freeze(model)
    surgery.unfreeze(model, names=["layer2.1", "fc"])
    x = image_batch()
    prefix, tail = quiet_split(model, x)
    assert prefix.tap_names == ["layer2.0"]
    assert_split_is_exact(model, prefix, tail, x)
    assert {n for n, p in tail.named_parameters() if p.requires_grad} == {
        "body." + n for n, p in model.named_parameters() if n.startswith(("layer2.1.", "fc."))
    }
    tail.train()
    assert model.layer2[1].bn1.training  # an unfrozen block trains as a whole, BatchNorm included


# ---------------------------------------------------------------------------- hook fallback
def test_data_dependent_control_flow_uses_the_hook_fallback():
    model = edited(make_dynamic())
    x = mlp_batch()
    prefix, tail = quiet_split(model, x)
    assert (prefix.method, prefix.tap_names) == ("hook", ["head.input"])
    assert_split_is_exact(model, prefix, tail, x)
    assert_split_is_exact(model, prefix, tail, mlp_batch(seed=5) * 3)
    assert_trains_exactly_the_new_modules(model, prefix, tail)
    assert {n for n, _ in prefix.named_parameters()} == {
        "body.frozen." + n for n, _ in model.named_parameters() if not n.startswith("head.")
    }
    # The prefix leaves no hook behind: the model is still a plain module.
    prefix(x)
    assert all(not m._forward_pre_hooks and not m._forward_hooks for m in model.modules())
    copy.deepcopy(model)


def test_hook_split_of_a_traceable_model_gives_the_same_taps_as_fx():
    model = edited(make_resnet(), head=None, after="fc", insert=[nn.ReLU(), nn.Linear(10, 4)])
    x = image_batch()
    fx_prefix, _ = quiet_split(model, x, method="fx")
    hook_prefix, hook_tail = quiet_split(model, x, method="hook")
    assert fx_prefix.tap_names == ["fc.0"] and hook_prefix.tap_names == ["fc.1.input"]
    assert len(hook_tail.body.steps) == 2  # ReLU, Linear: the chain after the cut
    assert torch.equal(hook_prefix(x)[0], fx_prefix(x)[0])


def test_untraceable_model_with_new_modules_between_frozen_ones_is_replayed():
    model = edited(make_dynamic(), after="body.0", insert=[nn.Linear(16, 16)])
    x = mlp_batch()
    prefix, tail = quiet_split(model, x)
    # fx cannot trace it and the hook split needs the new modules last; the replay split
    # caches body.1's input (and x) and replays the forward with body.0 skipped.
    assert prefix.method == "replay"
    assert prefix.tap_names == ["body.1.input", "input"]
    torch.testing.assert_close(tail(*prefix(x)), eval_output(model, x), rtol=0, atol=1e-6)
    with pytest.raises(SplitError) as err:
        quiet_split(model, x, method="hook")
    assert "frozen module 'body.3' runs after the trainable module 'body.1'" in str(err.value)


def test_fx_only_on_an_untraceable_model():
    with pytest.raises(
        SplitError, match=r"fx: torch.fx cannot trace it \(TypeError: int\(\) argument"
    ):
        quiet_split(edited(make_dynamic()), mlp_batch(), method="fx")


class Scaled(nn.Module):
    """Code runs between the two new modules, or after the last one."""

    def __init__(self, where: str):
        super().__init__()
        self.body, self.a, self.b, self.where = (
            nn.Linear(4, 4),
            nn.Linear(4, 4),
            nn.Linear(4, 2),
            where,
        )

    def forward(self, x):
        h = self.a(self.body(x))
        return self.b(h * 2) if self.where == "between" else self.b(h) * 2


@pytest.mark.parametrize(
    "where, match",
    [
        ("between", "'b' does not take exactly the output of 'a'"),
        ("after", "does not return the output of its last module 'b'"),
    ],
)
def test_hook_split_needs_a_chain(where, match):
    model = Scaled(where)
    surgery.freeze(model, names="body")
    with pytest.raises(SplitError, match=match):
        quiet_split(model, torch.randn(3, 4), method="hook")
    prefix, tail = quiet_split(model, torch.randn(3, 4))  # torch.fx handles both
    assert prefix.method == "fx"


# ---------------------------------------------------------------------------- parity check
class Counter(nn.Module):
    """A frozen module with hidden state: every call gives a different output."""

    def __init__(self):
        super().__init__()
        self.register_buffer("calls", torch.zeros(()))

    def forward(self, x):
        self.calls += 1
        return x + self.calls


def test_parity_failure_names_the_first_divergent_module():
    model = nn.Sequential(nn.Linear(12, 8), Counter(), nn.ReLU(), nn.Linear(8, 3))
    edited(model)
    with pytest.raises(
        SplitError, match=r"differs from the model's by .*first divergent module: '1' \(Counter\)"
    ):
        quiet_split(model, mlp_batch())
    prefix, tail = quiet_split(model, mlp_batch(), check=False)  # the caller may skip the check
    assert prefix.tap_names == ["2"]


# ---------------------------------------------------------------------------- modes and warnings
def test_warns_once_when_frozen_batchnorm_or_dropout_was_in_train_mode():
    model = edited(make_resnet())
    modes = {n: m.training for n, m in model.named_modules()}
    with pytest.warns(
        UserWarning, match=r"eval mode: 10 frozen dropout/BatchNorm.*'bn1'.*running statistics"
    ) as rec:
        fastft.split(model, image_batch())
    assert len([w for w in rec if "eval mode" in str(w.message)]) == 1
    assert {n: m.training for n, m in model.named_modules()} == modes  # split leaves modes alone
    with (
        warnings.catch_warnings()
    ):  # the same model split again (a schedule's next stage): said once
        warnings.simplefilter("error")
        fastft.split(model, image_batch())
    model.eval()
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        fastft.split(model, image_batch())


def test_no_warning_for_batchnorm_kept_frozen_in_unfrozen_blocks():
    model = edited(make_resnet())
    model.eval()
    fastft.model.blocks.unfreeze_blocks(model, 1)
    model.layer2[
        1
    ].train()  # the user's block in train mode: its BatchNorm stats stay frozen on purpose
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        fastft.split(model, image_batch())


def test_prefix_runs_in_eval_mode_whatever_the_model_mode():
    model = edited(make_resnet())
    x = image_batch()
    prefix, _ = quiet_split(model, x)
    stats = [b.clone() for b in model.buffers()]
    prefix.train()
    model.train()
    first = prefix(x)[0]
    assert torch.equal(first, prefix(x)[0]) and not first.requires_grad
    assert all(torch.equal(a, b) for a, b in zip(stats, model.buffers()))
    assert model.bn1.training  # the model's own flags are restored after each call


# ---------------------------------------------------------------------------- signature
def test_signature_follows_structure_and_cut_not_weights():
    x = image_batch()
    a = edited(make_resnet(seed=0))
    b = edited(make_resnet(seed=1))  # other weights, same structure
    sig = quiet_split(a, x)[0].signature()
    assert (
        sig == quiet_split(b, x)[0].signature() == quiet_split(copy.deepcopy(a), x)[0].signature()
    )
    assert "0x" not in sig and "layer2" in sig
    moved = edited(make_resnet(), head=None, after="layer2.0", insert=[nn.Conv2d(16, 16, 1)])
    assert quiet_split(moved, x)[0].signature() != sig
    smaller = edited(make_resnet())
    surgery.remove_layers(smaller, "layer2.1")
    assert quiet_split(smaller, x)[0].signature() != sig
    hook = quiet_split(edited(make_dynamic()), mlp_batch())[0].signature()
    assert "0x" not in hook and "cut: input of head" in hook


# ---------------------------------------------------------------------------- errors
def test_nothing_to_train():
    model = make_mlp()
    surgery.freeze(model)
    with pytest.raises(SplitError, match="nothing to train"):
        fastft.split(model, mlp_batch())


def test_nothing_frozen():
    with pytest.raises(SplitError, match="nothing is frozen"):
        fastft.split(make_mlp(), mlp_batch())


@pytest.mark.parametrize(
    "x, kw, match",
    [
        ([1, 2], {}, "a tensor or a dict of tensors"),
        (torch.tensor(1.0), {}, "a tensor or a dict of tensors"),
        (None, {"method": "jit"}, "method must be one of"),
    ],
)
def test_bad_arguments(x, kw, match):
    model = edited(make_mlp())
    with pytest.raises(SplitError, match=match):
        fastft.split(model, mlp_batch() if x is None else x, **kw)


class ReadsInput(nn.Module):
    """``head`` (trainable) reads the input next to a frozen layer; ``adapter`` reads the dict."""

    def __init__(self, whole_dict: bool = False):
        super().__init__()
        self.frozen = nn.Linear(4, 4)
        self.head = DictReader() if whole_dict else nn.Linear(4, 4)
        self.whole_dict = whole_dict

    def forward(self, batch):
        return self.head(batch if self.whole_dict else batch["x"]) + self.frozen(batch["x"])


class DictReader(nn.Module):
    def __init__(self):
        super().__init__()
        self.inner = nn.Linear(4, 4)

    def forward(self, batch):
        return self.inner(batch["x"])


def test_a_new_module_reading_the_input_takes_the_input_as_a_tap():
    model = ReadsInput()
    surgery.freeze(model, names="frozen")
    x = {"x": torch.randn(3, 4)}
    prefix, tail = quiet_split(model, x)
    assert prefix.tap_names == ["getitem", "frozen"]
    assert torch.equal(prefix(x)[0], x["x"])
    torch.testing.assert_close(tail(*prefix(x)), eval_output(model, x), rtol=0, atol=1e-6)


def test_a_new_module_reading_the_whole_input_dict_is_explained():
    model = ReadsInput(whole_dict=True)
    surgery.freeze(model, names="frozen")
    with pytest.raises(SplitError) as err:
        quiet_split(model, {"x": torch.randn(3, 4)})
    msg = str(err.value)
    assert (
        "fx: the model input itself (dict) reaches a trainable module (head) "
        "with nothing frozen before it" in msg
    )
    assert "hook: 'head' is called with non-tensor or keyword inputs" in msg


# --------------------------------------------------------------------- the edited model stays plain
def test_edited_and_split_model_exports_as_plain_torch():
    model = edited(make_resnet(), head=4, after="layer1.1.bn2", insert=[nn.Conv2d(8, 8, 1)])
    x = image_batch()
    prefix, tail = quiet_split(model, x)
    assert not any(
        isinstance(m, (fastft.FrozenPrefix, fastft.TrainableTail)) for m in model.modules()
    )
    buf = io.BytesIO()
    torch.save(model, buf)
    buf.seek(0)
    torch.testing.assert_close(
        torch.load(buf, weights_only=False).eval()(x), eval_output(model, x), rtol=0, atol=0
    )


# ---------------------------------------------------------------------------- real all-MiniLM-L6-v2
@pytest.fixture(scope="module")
def minilm():
    st = load_minilm_or_skip()
    batch = st.preprocess(["a tiny test sentence", "another one, a little longer than the first"])
    x = {k: v for k, v in batch.items() if isinstance(v, torch.Tensor)}
    assert x["input_ids"].shape[0] == 2 and x["input_ids"].shape[1] <= 32
    return st, x


@pytest.mark.parametrize("drop_top_two", [False, True])
def test_real_minilm_with_a_new_head(minilm, drop_top_two):
    st, x = minilm
    encoder = copy.deepcopy(st)
    want = eval_output(encoder, x)["sentence_embedding"]
    layers = [n for n, m in encoder.named_modules() if n.endswith("encoder.layer")][0]
    if drop_top_two:
        surgery.remove_layers(encoder, [f"{layers}.4", f"{layers}.5"], example_inputs=x)
        assert len(encoder.get_submodule(layers)) == 4
    model = surgery.append_head(encoder, [nn.Linear(384, 256), nn.ReLU(), nn.Linear(256, 5)])
    surgery.freeze(model, except_new=True)
    prefix, tail = quiet_split(model, x)
    assert prefix.method == "fx" and len(prefix.tap_names) == 1
    emb = prefix(x)[0]
    assert emb.shape == (2, 384)
    assert torch.equal(emb, want) != drop_top_two  # removing layers changes the embedding
    out = tail(*prefix(x))
    torch.testing.assert_close(out, eval_output(model, x), rtol=0, atol=1e-5)
    assert out.shape == (2, 5)
    assert_trains_exactly_the_new_modules(model, prefix, tail)
    hook_prefix, _ = quiet_split(model, x, method="hook")
    torch.testing.assert_close(hook_prefix(x)[0], emb, rtol=0, atol=1e-6)
