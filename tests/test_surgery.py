"""fastft.surgery: replace the output layer, add or remove hidden layers, freeze what is not new.

Every edit is made in place on a plain nn.Module, records the modules it adds as new (by
marking the module objects, so the record survives later renames), and leaves a model that
deep-copies, pickles and loads into a hand-built plain structure.
"""

from __future__ import annotations

import collections
import copy
import io

import pytest
import torch
from torch import nn

from fastft.errors import SurgeryError
from fastft.model import surgery

from helpers.data import image_batch, mlp_batch, token_batch
from helpers.models import (
    ResNetish,
    make_dict_encoder,
    make_dynamic,
    make_mlp,
    make_resnet,
    make_text_encoder,
    make_vit,
)


def trainable(model: nn.Module) -> set[str]:
    return {n for n, p in model.named_parameters() if p.requires_grad}


def params_of(model: nn.Module, prefix: str) -> set[str]:
    return {n for n, _ in model.named_parameters() if n.startswith(prefix + ".")}


# ---------------------------------------------------------------------------- find_head
class HeadsHead(nn.Module):  # torchvision ViT: heads = Sequential(OrderedDict(head=Linear))
    def __init__(self):
        super().__init__()
        self.body = nn.Linear(4, 8)
        self.heads = nn.Sequential(collections.OrderedDict(head=nn.Linear(8, 3)))


class Scored(nn.Module):  # Hugging Face *ForSequenceClassification (decoder models)
    def __init__(self):
        super().__init__()
        self.model = nn.Linear(4, 8)
        self.score = nn.Linear(8, 3, bias=False)


class TimmStyle(nn.Module):  # timm ClassifierHead: head.fc
    def __init__(self):
        super().__init__()
        self.stem = nn.Linear(4, 8)
        self.head = nn.Module()
        self.head.global_pool = nn.Identity()
        self.head.fc = nn.Linear(8, 3)


class VGGStyle(nn.Module):  # classifier = Sequential ending in Linear (then a parameterless layer)
    def __init__(self):
        super().__init__()
        self.features = nn.Sequential(nn.Linear(4, 8), nn.ReLU())
        self.classifier = nn.Sequential(
            nn.Linear(8, 8), nn.ReLU(), nn.Dropout(), nn.Linear(8, 3), nn.Softmax(-1)
        )


@pytest.mark.parametrize(
    "make, expected",
    [
        (make_resnet, "fc"),
        (make_mlp, "5"),
        (make_vit, "head"),
        (make_text_encoder, "classifier.1"),
        (HeadsHead, "heads.head"),
        (Scored, "score"),
        (TimmStyle, "head.fc"),
        (VGGStyle, "classifier.3"),
    ],
)
def test_find_head_usual_layouts(make, expected):
    model = make()
    name, module = surgery.find_head(model)
    assert name == expected
    assert module is model.get_submodule(expected) and isinstance(module, nn.Linear)


def test_find_head_none_lists_the_linear_layers():
    with pytest.raises(SurgeryError) as err:
        surgery.find_head(make_dict_encoder())
    msg = str(err.value)
    assert "layers.2.linear2" in msg and "name=" in msg and "append_head" in msg


def test_find_head_skips_a_sequential_whose_last_weighted_layer_is_not_linear():
    model = nn.Sequential(nn.Linear(4, 8), nn.Conv1d(8, 8, 1))
    with pytest.raises(SurgeryError, match="no output layer"):
        surgery.find_head(model)


# ---------------------------------------------------------------------------- replace_head
def test_replace_head_with_num_classes_keeps_in_features_and_records_new():
    model = make_resnet()
    new = surgery.replace_head(model, num_classes=4)
    assert model.fc is new and (new.in_features, new.out_features) == (16, 4)
    assert surgery.new_modules(model) == ["fc"]
    assert model(image_batch()).shape == (4, 4)


def test_replace_head_copies_bias_setting_dtype_and_device():
    model = Scored().double()
    new = surgery.replace_head(model, num_classes=7)
    assert new.bias is None and new.weight.dtype == torch.float64


def test_replace_head_with_module_and_name():
    model = make_text_encoder()
    head = nn.Sequential(nn.Linear(16, 32), nn.ReLU(), nn.Linear(32, 2))
    assert surgery.replace_head(model, module=head, name="classifier") is head
    assert model.classifier is head
    assert surgery.new_modules(model) == ["classifier"]
    assert model(token_batch()).shape == (4, 2)


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(), "exactly one of"),
        (dict(num_classes=3, module=nn.Linear(2, 3)), "exactly one of"),
        (dict(num_classes=0), "positive int"),
        (dict(num_classes=3, name="bn1"), "cannot infer the input width"),
        (dict(module="not a module"), "must be an nn.Module"),
    ],
)
def test_replace_head_bad_arguments(kwargs, match):
    with pytest.raises(SurgeryError, match=match):
        surgery.replace_head(make_resnet(), **kwargs)


def test_unknown_name_suggests_close_names():
    with pytest.raises(SurgeryError, match=r"unknown module 'fcc'; did you mean 'fc'"):
        surgery.replace_head(make_resnet(), num_classes=3, name="fcc")
    with pytest.raises(SurgeryError, match=r"did you mean 'layer1.0.bn2'"):
        surgery.insert_layers(make_resnet(), after="layer1.0.bn_2", modules=[nn.Identity()])


# ---------------------------------------------------------------------------- append_head
def test_append_head_on_a_dict_encoder_picks_the_embedding():
    encoder = make_dict_encoder()
    x = token_batch()
    model = surgery.append_head(encoder, [nn.Linear(16, 8), nn.ReLU(), nn.Linear(8, 5)])
    assert isinstance(model, surgery.EncoderWithHead) and model.encoder is encoder
    assert [type(m) for m in model.head] == [nn.Linear, nn.ReLU, nn.Linear]
    assert surgery.new_modules(model) == ["head"]
    model.eval()
    with torch.no_grad():
        assert torch.equal(model(x), model.head(encoder(x)["sentence_embedding"]))


def test_append_head_on_a_tensor_encoder_and_one_module():
    encoder = nn.Sequential(nn.Linear(12, 6), nn.Tanh())
    head = nn.Linear(6, 2)
    model = surgery.append_head(encoder, head, output_key=None)
    assert model.head is head
    x = mlp_batch()
    assert torch.equal(model(x), head(encoder(x)))


def test_append_head_missing_key_lists_the_keys():
    model = surgery.append_head(make_dict_encoder(), nn.Linear(16, 2), output_key="pooled")
    with pytest.raises(SurgeryError, match="no key 'pooled'.*token_count, sentence_embedding"):
        model(token_batch())


# ---------------------------------------------------------------------------- insert_layers
def test_insert_in_a_numbered_sequential_renumbers():
    model = make_mlp()
    new = [nn.Linear(16, 16), nn.ReLU()]
    names = surgery.insert_layers(model, after="4", modules=new)
    assert names == ["5", "6"] and model[5] is new[0] and model[6] is new[1]
    assert isinstance(model[7], nn.Linear) and model[7].out_features == 3
    assert surgery.new_modules(model) == ["5", "6"]
    assert model(mlp_batch()).shape == (4, 3)


def test_insert_in_a_named_sequential_keeps_names():
    model = nn.Sequential(
        collections.OrderedDict(fc1=nn.Linear(4, 8), act=nn.ReLU(), out=nn.Linear(8, 2))
    )
    assert surgery.insert_layers(model, after="act", modules=nn.Linear(8, 8)) == ["act_new"]
    assert list(model._modules) == ["fc1", "act", "act_new", "out"]


def test_insert_elsewhere_wraps_the_target():
    model = make_resnet()
    bn2 = model.layer1[1].bn2
    conv = nn.Conv2d(8, 8, 1)
    assert surgery.insert_layers(model, after="layer1.1.bn2", modules=[conv]) == ["layer1.1.bn2.1"]
    wrapped = model.layer1[1].bn2
    assert type(wrapped) is nn.Sequential and wrapped[0] is bn2 and wrapped[1] is conv
    assert surgery.new_modules(model) == ["layer1.1.bn2.1"]
    assert model(image_batch()).shape == (4, 10)


def test_insert_into_a_module_list_wraps_the_entry():
    model = make_vit()
    surgery.insert_layers(model, after="blocks.0", modules=[nn.Linear(16, 16)])
    assert len(model.blocks) == 3 and type(model.blocks[0]) is nn.Sequential
    assert model(image_batch()).shape == (4, 5)


def test_new_names_follow_later_surgery():
    model = make_mlp()
    surgery.insert_layers(model, after="4", modules=[nn.Linear(16, 16)])
    surgery.replace_head(model, num_classes=2)
    assert surgery.new_modules(model) == ["5", "6"]
    surgery.remove_layers(model, ["2"])  # the dropout: everything after it shifts down by one
    assert surgery.new_modules(model) == ["4", "5"]
    surgery.freeze(model, except_new=True)
    assert trainable(model) == {"4.weight", "4.bias", "5.weight", "5.bias"}


def test_insert_layers_bad_arguments():
    with pytest.raises(SurgeryError, match="one or more nn.Module"):
        surgery.insert_layers(make_mlp(), after="1", modules=[])
    with pytest.raises(SurgeryError, match="non-empty string"):
        surgery.insert_layers(make_mlp(), after="", modules=[nn.ReLU()])


# ---------------------------------------------------------------------------- remove_layers
def test_remove_top_transformer_layers_keeps_the_rest():
    model = make_text_encoder()
    kept = model.layers[0]
    removed = surgery.remove_layers(model, ["layers.1", "layers.2"])
    assert list(removed) == ["layers.1", "layers.2"]
    assert len(model.layers) == 1 and model.layers[0] is kept
    assert model(token_batch()).shape == (4, 4)


def test_remove_from_a_sequential_renumbers():
    model = make_mlp()
    surgery.remove_layers(model, "2")
    assert [type(m) for m in model] == [nn.Linear, nn.ReLU, nn.Linear, nn.ReLU, nn.Linear]
    assert list(model._modules) == ["0", "1", "2", "3", "4"]


def test_remove_that_breaks_the_widths_is_refused_and_changes_nothing():
    model = make_mlp()
    before = list(model)
    with pytest.raises(
        SurgeryError, match=r"model\.0 \(output width 32\) feeding model\.5 \(input width 16\)"
    ):
        surgery.remove_layers(model, ["3", "4"])
    assert list(model) == before


def test_remove_elsewhere_replaces_with_identity():
    model = make_resnet()
    surgery.remove_layers(model, "layer1.0.bn2")
    assert isinstance(model.layer1[0].bn2, nn.Identity)
    assert model(image_batch()).shape == (4, 10)


def test_remove_with_identity_that_changes_width_is_refused():
    with pytest.raises(SurgeryError, match="maps width 3 to 16"):
        surgery.remove_layers(make_vit(), "patch_embed")


def test_remove_checked_on_example_inputs_is_undone_on_failure():
    model = make_resnet().eval()
    x = image_batch()
    want = model(x)
    # layer2.0 maps 8 -> 16 channels: a width the static check cannot see inside a block.
    with pytest.raises(
        SurgeryError, match="no longer runs on the example inputs.*nothing was removed"
    ):
        surgery.remove_layers(model, ["layer2.0"], example_inputs=x)
    assert len(model.layer2) == 2 and torch.equal(model(x), want)


@pytest.mark.parametrize(
    "names, match",
    [
        (["layer3"], r"unknown module 'layer3'; did you mean 'layer2', 'layer1'"),
        ([], "at least one"),
        (["fc", "fc"], "twice"),
    ],
)
def test_remove_layers_bad_names(names, match):
    with pytest.raises(SurgeryError, match=match):
        surgery.remove_layers(make_resnet(), names)


# ---------------------------------------------------------------------------- freeze / unfreeze
def test_freeze_except_new_leaves_exactly_the_new_parameters():
    model = make_vit()
    surgery.replace_head(model, num_classes=3)
    surgery.insert_layers(model, after="blocks.1", modules=[nn.Linear(16, 16)])
    frozen = surgery.freeze(model, except_new=True)
    assert trainable(model) == {"head.weight", "head.bias", "blocks.1.1.weight", "blocks.1.1.bias"}
    assert "cls_token" in frozen and "head.weight" not in frozen


def test_freeze_by_names_patterns_and_depth():
    model = make_resnet()
    assert set(surgery.freeze(model, names="layer1")) == params_of(model, "layer1")
    surgery.unfreeze(model)
    surgery.freeze(model, patterns=["layer*.0.bn?"])
    assert trainable(model) == {n for n, _ in model.named_parameters()} - {
        n
        for n, _ in model.named_parameters()
        if n.split(".")[0] in ("layer1", "layer2")
        and n.split(".")[1] == "0"
        and n.split(".")[2] in ("bn1", "bn2")
    }
    surgery.unfreeze(model)
    surgery.freeze(model, depth=2)  # conv1 and bn1: the first two top-level modules with weights
    assert {n for n, p in model.named_parameters() if not p.requires_grad} == {
        "conv1.weight",
        "bn1.weight",
        "bn1.bias",
    }


def test_freeze_a_single_parameter_and_unfreeze_by_pattern():
    model = make_mlp()
    surgery.freeze(model)
    assert trainable(model) == set()
    assert surgery.unfreeze(model, patterns="5") == ["5.weight", "5.bias"]
    surgery.freeze(model, names="5.bias")
    assert trainable(model) == {"5.weight"}


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(names=["layer1.0.bn3"]), r"did you mean 'layer1.0.bn2', 'layer1.0.bn1'"),
        (
            dict(patterns=["layer9*"]),
            r"matches no parameter or module.*not a no-op.*close to it: .layer2., .layer1.",
        ),
        (dict(depth=99), "only 5 top-level modules"),
        (dict(depth=-1), "non-negative"),
    ],
)
def test_freeze_bad_selection(kwargs, match):
    with pytest.raises(SurgeryError, match=match):
        surgery.freeze(make_resnet(), **kwargs)


# ---------------------------------------------------------------------------- summary
def test_summary_table():
    model = make_resnet()
    surgery.replace_head(model, num_classes=4)
    surgery.freeze(model, except_new=True)
    surgery.unfreeze(model, names="layer2.1")
    rows = {line.split()[0]: line.split() for line in surgery.summary(model).splitlines()}
    assert rows["fc"][-1] == "new" and rows["fc"][2] == "68"
    assert rows["layer1"][-1] == "frozen" and rows["layer1"][3] == "0"
    assert rows["layer2"][-2:] == ["partly", "trainable"]
    assert rows["relu"][-1] == "-"
    n = sum(p.numel() for p in model.parameters())
    assert rows["total"][1] == f"{n:,}"


# ---------------------------------------------------------------------------- still a plain model
def test_edited_model_is_plain_torch():
    model = make_resnet()
    surgery.replace_head(model, num_classes=4)
    surgery.insert_layers(model, after="layer1.1.bn2", modules=[nn.Conv2d(8, 8, 1)])
    surgery.freeze(model, except_new=True)
    model.eval()
    x = image_batch()
    want = model(x)
    assert torch.equal(copy.deepcopy(model)(x), want)
    buf = io.BytesIO()
    torch.save(model, buf)
    buf.seek(0)
    assert torch.equal(torch.load(buf, weights_only=False)(x), want)
    # The same structure built by hand, with no fastft involved, loads the state dict.
    fresh = ResNetish(num_classes=4)
    fresh.layer1[1].bn2 = nn.Sequential(nn.BatchNorm2d(8), nn.Conv2d(8, 8, 1))
    fresh.load_state_dict(model.state_dict(), strict=True)
    assert torch.equal(fresh.eval()(x), want)


def test_dynamic_model_surgery_works_without_tracing():
    model = make_dynamic()
    surgery.replace_head(model, num_classes=5)
    assert surgery.new_modules(model) == ["head"] and model(mlp_batch()).shape == (4, 5)
