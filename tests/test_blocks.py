"""fastft.model.blocks on the layouts of common vision models: torchvision's ResNet (also
wrapped in a Sequential), ViT layouts of torchvision and timm, stages of blocks (ConvNeXt,
Swin, EfficientNet); and a block unfrozen then frozen again is marked trained.
"""

from __future__ import annotations

from collections import OrderedDict

import torch
from torch import nn

from fastft.model.blocks import find_blocks, trained_blocks, unfreeze_blocks, unfrozen_blocks
from fastft.model.surgery import freeze, replace_head

from helpers.models import make_mlp_stack


# ---------------------------------------------------------------------------- find_blocks
class _Bottleneck(nn.Module):
    def __init__(self, c_in, c, downsample=False):
        super().__init__()
        self.conv1, self.bn1 = nn.Conv2d(c_in, c, 1, bias=False), nn.BatchNorm2d(c)
        self.conv2, self.bn2 = nn.Conv2d(c, c, 3, padding=1, bias=False), nn.BatchNorm2d(c)
        self.conv3, self.bn3 = nn.Conv2d(c, 4 * c, 1, bias=False), nn.BatchNorm2d(4 * c)
        self.relu = nn.ReLU()
        self.downsample = (
            nn.Sequential(nn.Conv2d(c_in, 4 * c, 1, bias=False), nn.BatchNorm2d(4 * c))
            if downsample
            else None
        )

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
            blocks = [_Bottleneck(c_in, 4 * i, downsample=True)] + [
                _Bottleneck(16 * i, 4 * i) for _ in range(n - 1)
            ]
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
    assert [n for n, _ in find_blocks(wrapped)] == [
        f"{i + 3}.{j}" for i, n in enumerate((3, 4, 6, 3), start=1) for j in range(n)
    ]
    replace_head(model, num_classes=2)
    freeze(model, except_new=True)
    assert unfreeze_blocks(model, 2) == ["layer4.1", "layer4.2"]
    assert (
        model.layer4[2].bn3.weight.requires_grad and not model.layer4[0].conv1.weight.requires_grad
    )


class _EncoderBlock(nn.Module):
    def __init__(self, dim=8):
        super().__init__()
        self.ln_1, self.mlp = (
            nn.LayerNorm(dim),
            nn.Sequential(nn.Linear(dim, dim), nn.GELU(), nn.Linear(dim, dim)),
        )

    def forward(self, x):
        return x + self.mlp(self.ln_1(x))


def test_find_blocks_on_vit_layouts():
    class TorchvisionViT(nn.Module):  # encoder.layers: a Sequential of named EncoderBlocks
        def __init__(self):
            super().__init__()
            self.conv_proj = nn.Conv2d(3, 8, 4, 4)
            self.encoder = nn.Module()
            self.encoder.layers = nn.Sequential(
                OrderedDict((f"encoder_layer_{i}", _EncoderBlock()) for i in range(4))
            )
            self.encoder.ln = nn.LayerNorm(8)
            self.heads = nn.Sequential(OrderedDict(head=nn.Linear(8, 10)))

    class TimmViT(nn.Module):  # blocks: a Sequential; norm and head after it
        def __init__(self):
            super().__init__()
            self.patch_embed = nn.Conv2d(3, 8, 4, 4)
            self.blocks = nn.Sequential(*[_EncoderBlock() for _ in range(4)])
            self.norm, self.head = nn.LayerNorm(8), nn.Linear(8, 10)

    assert [n for n, _ in find_blocks(TorchvisionViT())] == [
        f"encoder.layers.encoder_layer_{i}" for i in range(4)
    ]
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
    assert names == [
        "features.0",
        "features.1.0",
        "features.1.1",
        "features.1.2",
        "features.2",
        "features.3.0",
        "features.3.1",
        "features.4",
        "features.5",
    ]
    # An MLP written as a Sequential of (Linear, ReLU) pairs: the pairs are the blocks.
    mlp = nn.Sequential(*[nn.Sequential(nn.Linear(4, 4), nn.ReLU()) for _ in range(3)])
    assert [n for n, _ in find_blocks(mlp)] == ["0", "1", "2"]


# ---------------------------------------------------------------------------- unfreeze_blocks
def test_a_refrozen_block_is_marked_trained():
    model = make_mlp_stack()
    replace_head(model, num_classes=2)
    unfreeze_blocks(model, 2)
    unfreeze_blocks(model, 1)
    unfreeze_blocks(model, 0)
    assert not list(unfrozen_blocks(model))
    assert {id(m) for m in trained_blocks(model)} == {id(model[2]), id(model[4])}
