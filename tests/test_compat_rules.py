"""The rules that make fastft a drop-in trainer for library models, one by one, and every row
of the failure table of issue 18 (what used to go wrong, and what happens now):

- a dict of inputs goes to ``forward`` as keywords when ``forward`` names its keys, as one
  argument otherwise (a tokenizer's ``BatchEncoding`` too); keys it does not take are refused;
- the head is found by the model's contract (timm ``get_classifier`` with a distillation
  head, Hugging Face ``config.num_labels``, a 1x1-conv classifier), sized from what reaches it
  after surgery, and an unknown classifier layout is an error, never a silent append;
- Hugging Face models: the cache holds what the head reads (ViT's CLS token, GPT-2's last
  non-pad token), ``export()`` keeps ``config.num_labels`` and ``save_pretrained`` /
  ``from_pretrained`` round-trip, unfreezing top blocks equals naive training;
- a Hugging Face ``datasets.Dataset`` trains like the same (X, y) tensors.

Plain-torch stand-ins (a timm-style distilled model, a squeezenet-style classifier, a
ResNet-style stem) always run; the library cases skip when the library does not import.
"""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader

import fastft
from fastft import surgery
from fastft.errors import DataError, SplitError, SurgeryError

from helpers.compat_models import TRANSFORMERS, VIT_CONFIG, VOCAB, require, text_batch
from helpers.naive_reference import naive_fit, trainable_state

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning", "ignore::FutureWarning")

FIT = dict(epochs=2, batch_size=8, lr=1e-2)


def case(family: str):
    return next(c for c in TRANSFORMERS if c.family == family)


def tuner(model: nn.Module, **kwargs) -> fastft.FineTuner:
    return fastft.FineTuner(model, cache_dtype="fp32", verbose=False, **kwargs)


def labels(n: int, classes: int = 5) -> torch.Tensor:
    return torch.randint(0, classes, (n,), generator=torch.Generator().manual_seed(3))


def assert_fits_like_naive(ft: fastft.FineTuner, X, y, call=None) -> None:
    """``ft``'s fit equals naive_fit of a copy of its edited model (before training)."""
    ft.prepare(X[:2] if torch.is_tensor(X) else {k: v[:2] for k, v in X.items()})
    naive = copy.deepcopy(ft.model)
    torch.manual_seed(5)
    ft.fit((X, y), **FIT)
    torch.manual_seed(5)
    model = naive if call is None else call(naive)
    new = [naive.get_submodule(n) for n in surgery.new_modules(naive)]
    naive_fit(model, X, y, train_modules=new, **FIT)
    want, got = trainable_state(naive), trainable_state(ft.model)
    assert want.keys() == got.keys()
    for key in want:
        torch.testing.assert_close(got[key], want[key], rtol=0, atol=1e-5, msg=key)


class HFLogits(nn.Module):
    def __init__(self, model):
        super().__init__()
        self.model = model

    def forward(self, x):
        return self.model(**x).logits


# ---------------------------------------------------------------------------- inputs
class KeywordModel(nn.Module):
    """forward(input_ids, attention_mask): a dict of both goes in as keywords."""

    def __init__(self):
        super().__init__()
        self.embed = nn.Embedding(VOCAB, 8)
        self.classifier = nn.Linear(8, 3)

    def forward(self, input_ids, attention_mask=None):
        h = self.embed(input_ids) * attention_mask[..., None]
        return self.classifier(h.sum(1) / attention_mask.sum(1, keepdim=True))


class OneDictModel(nn.Module):
    """forward(batch, **kwargs), like a SentenceTransformer: the dict is one argument."""

    def __init__(self):
        super().__init__()
        self.embed = nn.Embedding(VOCAB, 8)
        self.classifier = nn.Linear(8, 3)

    def forward(self, batch, **kwargs):
        return self.classifier(self.embed(batch["input_ids"]).mean(1))


@pytest.mark.parametrize("make", [KeywordModel, OneDictModel])
def test_a_dict_goes_in_as_keywords_or_as_one_argument_as_forward_takes_it(make):
    torch.manual_seed(0)
    X, y = text_batch(16), labels(16)
    ft = tuner(make(), num_classes=5, hidden=[4])
    if make is KeywordModel:
        assert_fits_like_naive(ft, X, y, call=lambda m: _Keywords(m))
    else:
        assert_fits_like_naive(ft, X, y)
    assert ft.predict(X).shape == (16, 5)


class _Keywords(nn.Module):
    def __init__(self, model):
        super().__init__()
        self.model = model

    def forward(self, x):
        return self.model(**x)


def test_input_keys_forward_does_not_take_are_refused_by_name():
    X = {**text_batch(8), "offsets": torch.zeros(8, 2)}
    ft = tuner(KeywordModel(), num_classes=5)
    with pytest.raises(DataError, match="'offsets'.*drop those keys"):
        ft.fit((X, labels(8)), epochs=1)


def test_a_tokenizers_batch_encoding_trains_predicts_and_exports(tmp_path):
    t = require("transformers")
    vocab = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"] + [f"w{i}" for i in range(VOCAB - 5)]
    (tmp_path / "vocab.txt").write_text("\n".join(vocab))
    tokenizer = t.BertTokenizerFast(vocab_file=str(tmp_path / "vocab.txt"))
    texts = [" ".join(f"w{(7 * i + j) % 90}" for j in range(2 + i % 7)) for i in range(16)]
    enc = tokenizer(texts, padding=True, return_tensors="pt")
    assert isinstance(enc, t.BatchEncoding) and "token_type_ids" in enc
    torch.manual_seed(0)
    ft = tuner(case("BERT").build(), num_classes=5, hidden=[8])
    ft.fit((enc, labels(16)), **FIT)
    exported = ft.export()
    with torch.no_grad():
        torch.testing.assert_close(exported(**enc).logits, ft.predict(enc), rtol=0, atol=1e-5)


# ---------------------------------------------------------------------------- the head
class DistilledTimmStyle(nn.Module):
    """timm's contract: get_classifier() returns the class and the distillation head; in
    eval mode the model averages them (deit_*_distilled)."""

    def __init__(self):
        super().__init__()
        self.body = nn.Sequential(nn.Linear(6, 12), nn.ReLU())
        self.num_classes = 10
        self.head = nn.Linear(6, 10)
        self.head_dist = nn.Linear(6, 10)

    def get_classifier(self):
        return self.head, self.head_dist

    def reset_classifier(self, num_classes):
        raise AssertionError("fastft replaces the heads itself")

    def forward(self, x):
        h = self.body(x)
        return (self.head(h[:, :6]) + self.head_dist(h[:, 6:])) / 2


def test_a_distilled_model_gets_both_heads_replaced_through_its_contract():
    """Row: timm deit_tiny_distilled left its distillation head at 1000 classes."""
    torch.manual_seed(0)
    X, y = torch.randn(16, 6), labels(16)
    ft = tuner(DistilledTimmStyle(), num_classes=5, hidden=[4])
    assert (ft.tuned.head_spec.name, ft.tuned.head_spec.also) == ("head", ["head_dist"])
    assert sorted(surgery.new_modules(ft.model)) == ["head", "head_dist"]
    assert ft.model.num_classes == 5
    assert_fits_like_naive(ft, X, y)
    assert ft.export()(X).shape == (16, 5)
    with pytest.raises(fastft.FastFTError, match="several.*distillation"):
        ft.fit_many([{"lr": 1e-3}], (X, y), epochs=1)


class SqueezeStyle(nn.Module):
    """torchvision squeezenet: the classifier is a 1x1 convolution, then ReLU and pooling."""

    def __init__(self):
        super().__init__()
        self.features = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU())
        self.classifier = nn.Sequential(
            nn.Dropout(0.5), nn.Conv2d(8, 10, 1), nn.ReLU(), nn.AdaptiveAvgPool2d(1)
        )

    def forward(self, x):
        return torch.flatten(self.classifier(self.features(x)), 1)


def test_a_1x1_conv_classifier_is_replaced_not_appended_to():
    """Row: squeezenet kept its 1000-class classifier frozen and got a head after its logits."""
    torch.manual_seed(0)
    X, y = torch.randn(16, 3, 6, 6), labels(16)
    ft = tuner(SqueezeStyle(), num_classes=5, hidden=[4])
    assert isinstance(ft.model, SqueezeStyle)  # not wrapped: nothing appended
    assert surgery.new_modules(ft.model) == ["classifier.1"]
    convs = [m for m in ft.model.classifier[1].modules() if isinstance(m, nn.Conv2d)]
    assert [(c.in_channels, c.out_channels, c.kernel_size) for c in convs] == [
        (8, 4, (1, 1)),
        (4, 5, (1, 1)),
    ]
    assert_fits_like_naive(ft, X, y)
    assert surgery.replace_head(SqueezeStyle(), num_classes=3).kernel_size == (1, 1)


class Block(nn.Module):
    def __init__(self, c_in: int, c_out: int):
        super().__init__()
        self.conv = nn.Conv2d(c_in, c_out, 3, padding=1)

    def forward(self, x):
        return torch.relu(self.conv(x))


class StagedNet(nn.Module):
    """A ResNet-style network whose last stage (blocks, widths unknown to surgery) widens
    8 -> 16 channels before ``fc``."""

    def __init__(self):
        super().__init__()
        self.stem = nn.Conv2d(3, 8, 3, padding=1)
        self.layer1 = nn.Sequential(Block(8, 8))
        self.layer2 = nn.Sequential(Block(8, 16))
        self.fc = nn.Linear(16, 10)

    def forward(self, x):
        x = self.layer2(self.layer1(self.stem(x)))
        return self.fc(x.mean((2, 3)))


def test_new_layers_are_sized_from_what_reaches_them_after_surgery(tmp_path):
    """Row: resnet18 without layer4 gave 'mat1 and mat2 shapes cannot be multiplied'."""
    torch.manual_seed(0)
    X, y = torch.randn(16, 3, 6, 6), labels(16)
    model = StagedNet()
    surgery.remove_layers(model, ["layer2"])
    ft = tuner(model, num_classes=5, hidden=[4])
    assert_fits_like_naive(ft, X, y)
    assert ft.tuned.head_spec.in_features == 8 and ft.model.fc[0].in_features == 8
    # Saved and loaded: the head is rebuilt at the width it was trained with, no probe.
    ft.save(str(tmp_path / "head.pt"))
    again = StagedNet()
    surgery.remove_layers(again, ["layer2"])
    loaded = fastft.FineTuner.load(str(tmp_path / "head.pt"), again, verbose=False)
    torch.testing.assert_close(loaded.predict(X), ft.predict(X), rtol=0, atol=1e-6)


def test_a_head_module_that_does_not_fit_the_cut_is_an_error_naming_both_widths():
    model = StagedNet()
    surgery.remove_layers(model, ["layer2"])
    ft = tuner(model, head=nn.Linear(16, 5))
    with pytest.raises(SurgeryError, match="now give 8 features.*takes 16"):
        ft.fit((torch.randn(8, 3, 6, 6), labels(8)), epochs=1)


class ConvClassifier(nn.Module):
    def __init__(self):
        super().__init__()
        self.features = nn.Conv2d(3, 8, 3)
        self.classifier = nn.Sequential(nn.Conv2d(8, 10, 3), nn.AdaptiveAvgPool2d(1), nn.Flatten())

    def forward(self, x):
        return self.classifier(self.features(x))


def test_an_unknown_classifier_layout_is_an_error_never_an_append():
    with pytest.raises(SurgeryError) as err:
        tuner(ConvClassifier(), num_classes=5)
    msg = str(err.value)
    assert "classifier = Sequential" in msg and "head_name=" in msg and "never appends" in msg
    ft = tuner(ConvClassifier(), num_classes=5, head=nn.Conv2d(8, 5, 3), head_name="classifier.0")
    ft.fit((torch.randn(8, 3, 7, 7), labels(8)), epochs=1)
    assert ft.predict(torch.randn(2, 3, 7, 7)).shape == (2, 5)


# ---------------------------------------------------------------------------- Hugging Face
def test_hf_vit_caches_the_cls_token_only_and_gpt2_the_last_non_pad_token():
    require("transformers")
    torch.manual_seed(0)
    vit = tuner(case("ViT").build(), num_classes=5)
    vit.fit((torch.randn(8, 3, 32, 32), labels(8)), epochs=1)
    assert vit.prefix.method == "hook" and [tuple(t.shape) for t in vit.cache.taps] == [(32,)]
    gpt2 = tuner(case("GPT-2").build(), num_classes=5)
    X = text_batch(8)
    gpt2.fit((X, labels(8)), epochs=1)
    assert gpt2.prefix.tap_names == ["score.input.last_token"]
    assert [tuple(t.shape) for t in gpt2.cache.taps] == [(32,)]
    # left padding: the pick follows the model's own rule
    left = {k: v.flip(1) for k, v in X.items()}
    torch.testing.assert_close(gpt2.predict(left), gpt2.export()(**left).logits, rtol=0, atol=1e-5)


def test_two_heads_combined_in_untraceable_code_are_refused_with_what_to_use():
    """HF DeiT with teacher: a class and a distillation head on two tokens, averaged in code
    fx cannot trace; both heads are found (config.num_labels) and the split says why not."""
    t = require("transformers")
    torch.manual_seed(0)
    ft = tuner(t.DeiTForImageClassificationWithTeacher(t.DeiTConfig(**VIT_CONFIG)), num_classes=5)
    assert ft.tuned.head_spec.also == ["distillation_classifier"]
    with pytest.raises(SplitError, match="read different inputs.*single-head form"):
        ft.fit((torch.randn(8, 3, 32, 32), labels(8)), epochs=1)


class TokenMixingHead(nn.Module):
    def __init__(self):
        super().__init__()
        self.lin = nn.Linear(32, 5)

    def forward(self, h):
        return self.lin(h - h.mean(1, keepdim=True))


def test_a_decoder_with_a_head_that_mixes_tokens_is_refused_with_the_reason():
    require("transformers")
    ft = tuner(case("GPT-2").build(), head=TokenMixingHead())
    with pytest.raises(SplitError, match="not position-wise"):
        ft.fit((text_batch(8), labels(8)), epochs=1)


def test_hf_export_keeps_the_model_class_config_and_save_pretrained(tmp_path):
    t = require("transformers")
    torch.manual_seed(0)
    model = case("BERT").build()
    model.config.id2label = {0: "neg", 1: "mid", 2: "pos"}
    model.config.label2id = {v: k for k, v in model.config.id2label.items()}
    same = tuner(copy.deepcopy(model), num_classes=3)
    assert same.model.config.id2label[2] == "pos"  # same number of classes: names kept
    ft = tuner(model, num_classes=5)
    X, y = text_batch(16), labels(16)
    ft.fit((X, y), **FIT)
    exported = ft.export()
    assert type(exported) is t.BertForSequenceClassification
    assert exported.config.num_labels == 5 and len(exported.config.id2label) == 5
    exported.save_pretrained(tmp_path)
    reloaded = t.BertForSequenceClassification.from_pretrained(tmp_path).eval()
    with torch.no_grad():
        torch.testing.assert_close(reloaded(**X).logits, ft.predict(X), rtol=0, atol=1e-5)


@pytest.mark.parametrize(
    "family, block", [("BERT", "bert.encoder.layer.1"), ("GPT-2", "transformer.h.1")]
)
def test_hf_unfreezing_the_top_block_equals_naive_training(family, block):
    require("transformers")
    torch.manual_seed(0)
    X, y = text_batch(16), labels(16)
    ft = tuner(case(family).build(), num_classes=5)
    ft.prepare({k: v[:2] for k, v in X.items()})
    naive = copy.deepcopy(ft.model)
    torch.manual_seed(7)
    ft.fit((X, y), epochs=3, batch_size=8, lr=1e-2, unfreeze=[(1, 1)])
    assert ft.prefix.method == "replay" and ft.prefix.tap_names[0] == f"{block}.input"

    torch.manual_seed(7)
    head = [naive.get_submodule(n) for n in surgery.new_modules(naive)]
    naive_fit(HFLogits(naive), X, y, train_modules=head, epochs=1, batch_size=8, lr=1e-2)
    top = naive.get_submodule(block)
    top.requires_grad_(True)
    naive_fit(HFLogits(naive), X, y, train_modules=[*head, top], epochs=2, batch_size=8, lr=1e-2)
    want, got = trainable_state(naive), trainable_state(ft.model)
    assert want.keys() == got.keys()
    for key in want:
        torch.testing.assert_close(got[key], want[key], rtol=0, atol=1e-5, msg=key)


# ---------------------------------------------------------------------------- datasets
def test_a_hf_dataset_trains_like_the_same_tensors():
    datasets = require("datasets")
    require("transformers")
    X, y = text_batch(16), labels(16)
    columns = {
        "text": [f"sample {i}" for i in range(16)],
        **{k: v.tolist() for k, v in X.items()},
        "label": y.tolist(),
    }
    ds = datasets.Dataset.from_dict(columns)
    results = []
    for data in (
        (X, y),
        ds,
        ds.with_format("torch"),
        DataLoader(ds.with_format("torch", columns=[*X, "label"]), batch_size=4),
    ):
        torch.manual_seed(0)
        ft = tuner(case("BERT").build(), num_classes=5)
        ft.fit(data, **FIT)
        results.append(ft.predict(X))
        assert ft.evaluate(data)["accuracy"] >= 0
    for out in results[1:]:
        torch.testing.assert_close(out, results[0], rtol=0, atol=1e-6)


def test_a_hf_dataset_without_labels_or_with_ragged_rows_says_what_to_do():
    datasets = require("datasets")
    ft = tuner(KeywordModel(), num_classes=5)
    no_labels = datasets.Dataset.from_dict({"input_ids": [[5, 6], [7, 8]]})
    with pytest.raises(DataError, match="no 'label' or 'labels' column"):
        ft.fit(no_labels, epochs=1)
    ragged = datasets.Dataset.from_dict(
        {"input_ids": [[5, 6], [7, 8, 9]], "attention_mask": [[1, 1], [1, 1, 1]], "label": [0, 1]}
    )
    with pytest.raises(DataError, match="padding='max_length'"):
        ft.fit(ragged, epochs=1)


def test_a_dict_batch_with_a_labels_entry_is_split():
    X, y = text_batch(16), labels(16)
    rows = [{**{k: v[i] for k, v in X.items()}, "labels": y[i]} for i in range(16)]
    loader = DataLoader(rows, batch_size=8, collate_fn=torch.utils.data.default_collate)
    torch.manual_seed(0)
    a = tuner(KeywordModel(), num_classes=5)
    a.fit(loader, **FIT)
    torch.manual_seed(0)
    b = tuner(KeywordModel(), num_classes=5)
    b.fit((X, y), **FIT)
    torch.testing.assert_close(a.predict(X), b.predict(X), rtol=0, atol=1e-6)
