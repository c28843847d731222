"""The architectures of the compatibility suite (tests/test_compat_models.py), each built from
its library's own config class or constructor with tiny sizes and random weights: nothing is
downloaded (``HF_HUB_OFFLINE=1`` is set before transformers is imported).

A :class:`Case` names a family (the README's row), its library, a builder, the kind of inputs
and how the model is called on a dict (keywords for Hugging Face models, one argument for a
SentenceTransformer). Libraries are imported inside the builders: a test asks
:func:`require` first, which skips when the library does not import (timm and torchvision
need a torch build of their own; see docs/models.md).

:func:`text_batch` and :func:`image_batch` make the inputs: token ids padded on the right
with ``attention_mask`` (rows of different lengths), or images.
"""

from __future__ import annotations

import copy
import importlib
import os
import tempfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

os.environ.setdefault("HF_HUB_OFFLINE", "1")

VOCAB = 100
PAD = 0  # the pad token id of every text model here
SEQ = 12
IMAGE = 32


@dataclass
class Case:
    family: str  # the README's row
    library: str  # "transformers", "sentence-transformers", "timm", "torchvision"
    build: Callable[[], nn.Module]
    inputs: str = "text"  # "text" or "image"
    keywords: bool = True  # a dict goes to forward as keyword arguments
    note: str = ""  # what the case shows besides the family working
    variant: bool = False  # another form of a family listed already (not in the README list)

    @property
    def id(self) -> str:
        return f"{self.library}:{self.family}".replace(" ", "_")


def require(library: str):
    """The library's module, or a pytest skip when it does not import here."""
    import pytest

    name = {"sentence-transformers": "sentence_transformers"}.get(library, library)
    return pytest.importorskip(name)


def text_batch(n: int, seed: int = 0, with_type_ids: bool = False) -> dict[str, torch.Tensor]:
    """Token ids in 5..VOCAB-1, right-padded with PAD to SEQ, lengths 3..SEQ."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(5, VOCAB, (n, SEQ), generator=g)
    lengths = torch.randint(3, SEQ + 1, (n,), generator=g)
    mask = (torch.arange(SEQ)[None, :] < lengths[:, None]).long()
    batch = {"input_ids": ids * mask + PAD * (1 - mask), "attention_mask": mask}
    if with_type_ids:
        batch["token_type_ids"] = torch.zeros_like(ids)
    return batch


def image_batch(n: int, seed: int = 0, size: int = IMAGE) -> torch.Tensor:
    return torch.randn(n, 3, size, size, generator=torch.Generator().manual_seed(seed))


# ---------------------------------------------------------------------------- transformers
_TEXT = dict(
    vocab_size=VOCAB,
    hidden_size=32,
    num_hidden_layers=2,
    num_attention_heads=2,
    intermediate_size=64,
    max_position_embeddings=64,
    num_labels=3,
    pad_token_id=PAD,
)


def _hf(model_cls: str, config_cls: str, **config) -> Callable[[], nn.Module]:
    def build() -> nn.Module:
        t = importlib.import_module("transformers")
        return getattr(t, model_cls)(getattr(t, config_cls)(**config)).train()

    return build


_DECODER = dict(
    vocab_size=VOCAB,
    hidden_size=32,
    intermediate_size=64,
    num_hidden_layers=2,
    num_attention_heads=2,
    num_key_value_heads=2,
    max_position_embeddings=64,
    num_labels=3,
    pad_token_id=PAD,
)
VIT_CONFIG = dict(
    image_size=IMAGE,
    patch_size=8,
    hidden_size=32,
    num_hidden_layers=2,
    num_attention_heads=2,
    intermediate_size=64,
    num_labels=3,
)

TRANSFORMERS = [
    Case("BERT", "transformers", _hf("BertForSequenceClassification", "BertConfig", **_TEXT)),
    Case(
        "DistilBERT",
        "transformers",
        _hf(
            "DistilBertForSequenceClassification",
            "DistilBertConfig",
            vocab_size=VOCAB,
            dim=32,
            n_layers=2,
            n_heads=2,
            hidden_dim=64,
            max_position_embeddings=64,
            num_labels=3,
            pad_token_id=PAD,
        ),
    ),
    Case(
        "RoBERTa",
        "transformers",
        _hf("RobertaForSequenceClassification", "RobertaConfig", **_TEXT),
    ),
    Case(
        "ALBERT",
        "transformers",
        _hf("AlbertForSequenceClassification", "AlbertConfig", embedding_size=16, **_TEXT),
    ),
    Case(
        "ELECTRA",
        "transformers",
        _hf("ElectraForSequenceClassification", "ElectraConfig", embedding_size=32, **_TEXT),
    ),
    Case(
        "DeBERTa-v2",
        "transformers",
        _hf("DebertaV2ForSequenceClassification", "DebertaV2Config", **_TEXT),
    ),
    Case(
        "MPNet",
        "transformers",
        _hf("MPNetForSequenceClassification", "MPNetConfig", **_TEXT),
    ),
    Case(
        "GPT-2",
        "transformers",
        _hf(
            "GPT2ForSequenceClassification",
            "GPT2Config",
            vocab_size=VOCAB,
            n_embd=32,
            n_layer=2,
            n_head=2,
            n_positions=64,
            num_labels=3,
            pad_token_id=PAD,
            bos_token_id=1,
            eos_token_id=1,
        ),
        note="last-token pick: one row per sample cached",
    ),
    Case("Llama", "transformers", _hf("LlamaForSequenceClassification", "LlamaConfig", **_DECODER)),
    Case("Qwen2", "transformers", _hf("Qwen2ForSequenceClassification", "Qwen2Config", **_DECODER)),
    Case(
        "OPT",
        "transformers",
        _hf(
            "OPTForSequenceClassification",
            "OPTConfig",
            vocab_size=VOCAB,
            hidden_size=32,
            word_embed_proj_dim=32,
            ffn_dim=64,
            num_hidden_layers=2,
            num_attention_heads=2,
            max_position_embeddings=64,
            num_labels=3,
            pad_token_id=PAD,
            bos_token_id=1,
            eos_token_id=1,
        ),
    ),
    Case(
        "ViT",
        "transformers",
        _hf("ViTForImageClassification", "ViTConfig", **VIT_CONFIG),
        inputs="image",
        note="CLS token only cached",
    ),
    Case(
        "DeiT",
        "transformers",
        _hf("DeiTForImageClassification", "DeiTConfig", **VIT_CONFIG),
        inputs="image",
    ),
    Case(
        "ConvNeXt",
        "transformers",
        _hf(
            "ConvNextForImageClassification",
            "ConvNextConfig",
            hidden_sizes=[8, 16],
            depths=[1, 1],
            num_stages=2,
            num_labels=3,
        ),
        inputs="image",
    ),
    Case(
        "ResNet",
        "transformers",
        _hf(
            "ResNetForImageClassification",
            "ResNetConfig",
            embedding_size=8,
            hidden_sizes=[8, 16],
            depths=[1, 1],
            num_labels=3,
        ),
        inputs="image",
    ),
    Case(
        "Swin",
        "transformers",
        _hf(
            "SwinForImageClassification",
            "SwinConfig",
            image_size=IMAGE,
            patch_size=4,
            embed_dim=16,
            depths=[1, 1],
            num_heads=[2, 2],
            window_size=4,
            num_labels=3,
        ),
        inputs="image",
    ),
]


# ---------------------------------------------------------------------------- sentence-transformers
def tiny_sentence_transformer(folder: Path) -> nn.Module:
    """A SentenceTransformer (BERT + mean pooling) saved to and loaded from ``folder``."""
    t = importlib.import_module("transformers")
    st = importlib.import_module("sentence_transformers")
    st_models = importlib.import_module("sentence_transformers.models")
    vocab = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"] + [f"w{i}" for i in range(VOCAB - 5)]
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "vocab.txt").write_text("\n".join(vocab))
    t.BertTokenizerFast(vocab_file=str(folder / "vocab.txt")).save_pretrained(folder)
    config = {k: v for k, v in _TEXT.items() if k != "num_labels"}
    t.BertModel(t.BertConfig(**config)).save_pretrained(folder)
    encoder = st_models.Transformer(str(folder), max_seq_length=SEQ)
    return st.SentenceTransformer(
        modules=[encoder, st_models.Pooling(32, "mean")], device="cpu"
    ).train()


_BUILT: dict[str, nn.Module] = {}


def _sentence_transformer() -> nn.Module:
    if "st" not in _BUILT:  # built once per process (it is saved and loaded), then copied
        with tempfile.TemporaryDirectory(prefix="fastft-st-") as folder:
            _BUILT["st"] = tiny_sentence_transformer(Path(folder))
    return copy.deepcopy(_BUILT["st"])


SENTENCE_TRANSFORMERS = [
    Case(
        "SentenceTransformer (BERT, mean pooling)",
        "sentence-transformers",
        _sentence_transformer,
        keywords=False,
        note="no classifier: head appended to sentence_embedding",
    ),
]


# ---------------------------------------------------------------------------- timm
def _timm(name: str, **kwargs) -> Callable[[], nn.Module]:
    def build() -> nn.Module:
        return importlib.import_module("timm").create_model(name, pretrained=False, **kwargs)

    return build


def _mixer() -> nn.Module:
    mixer = importlib.import_module("timm.models.mlp_mixer")
    return mixer.MlpMixer(img_size=IMAGE, patch_size=8, num_blocks=2, embed_dim=32)


_TIMM_VIT = dict(img_size=IMAGE, patch_size=8, embed_dim=32, depth=2, num_heads=2)

TIMM = [
    Case("ResNet", "timm", _timm("resnet10t"), inputs="image"),
    Case("ViT", "timm", _timm("vit_tiny_patch16_224", **_TIMM_VIT), inputs="image"),
    Case(
        "DeiT distilled",
        "timm",
        _timm("deit_tiny_distilled_patch16_224", **_TIMM_VIT),
        inputs="image",
        note="both heads replaced (get_classifier)",
    ),
    Case("ConvNeXt", "timm", _timm("convnext_atto"), inputs="image"),
    Case("MobileNetV3", "timm", _timm("mobilenetv3_small_050"), inputs="image"),
    Case("EfficientNet", "timm", _timm("efficientnet_b0"), inputs="image"),
    Case("RegNet", "timm", _timm("regnetx_002"), inputs="image"),
    Case("MLP-Mixer", "timm", _mixer, inputs="image"),
    Case(
        "ResNet, num_classes=0",
        "timm",
        _timm("resnet10t", num_classes=0),
        inputs="image",
        note="no classifier: head appended",
        variant=True,
    ),
]


# ---------------------------------------------------------------------------- torchvision
def _tv(build: Callable) -> Callable[[], nn.Module]:
    def make() -> nn.Module:
        return build(importlib.import_module("torchvision").models)

    return make


def _resnet18_without_layer4(models) -> nn.Module:
    surgery = importlib.import_module("fastft").surgery
    model = models.resnet18()
    surgery.remove_layers(model, ["layer4"])
    return model


def _small_vit(models) -> nn.Module:
    return models.VisionTransformer(
        image_size=IMAGE, patch_size=8, num_layers=2, num_heads=2, hidden_dim=32, mlp_dim=64
    )


def _small_convnext(models) -> nn.Module:
    cn = importlib.import_module("torchvision.models.convnext")
    return cn.ConvNeXt([cn.CNBlockConfig(16, 32, 1), cn.CNBlockConfig(32, None, 1)])


TORCHVISION = [
    Case("ResNet-18", "torchvision", _tv(lambda m: m.resnet18()), inputs="image"),
    Case(
        "ResNet-18 without layer4",
        "torchvision",
        _tv(_resnet18_without_layer4),
        inputs="image",
        note="head sized from the cut (256)",
        variant=True,
    ),
    Case(
        "SqueezeNet",
        "torchvision",
        _tv(lambda m: m.squeezenet1_0()),
        inputs="image",
        note="1x1-conv classifier replaced",
    ),
    Case("MobileNetV3", "torchvision", _tv(lambda m: m.mobilenet_v3_small()), inputs="image"),
    Case("ViT", "torchvision", _tv(_small_vit), inputs="image"),
    Case(
        "DenseNet",
        "torchvision",
        _tv(lambda m: m.DenseNet(growth_rate=8, block_config=(2, 2), num_init_features=16)),
        inputs="image",
    ),
    Case("ConvNeXt", "torchvision", _tv(_small_convnext), inputs="image"),
]

CASES = TRANSFORMERS + SENTENCE_TRANSFORMERS + TIMM + TORCHVISION
