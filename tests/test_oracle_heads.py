"""The new layers fastft trains against :mod:`helpers.naive_reference`, edited by hand.

Each test builds the edited model itself, from the README's promise alone: the pretrained
body (an MLP, or a ResNet-style CNN whose frozen BatchNorm must use its running statistics)
followed by the new layers, ``requires_grad`` set by hand, the new layers initialised as
FineTuner documents its ``seed`` ("seeds the new layers' initialisation"). The reference then
runs the whole model on every batch with the documented batch order, optimizer, schedule
and loss; dropout in the new layers draws from torch's global generator, seeded identically
before both fits. With an fp32 cache, fastft's trained weights (and per-epoch losses) must
equal the reference's to ``ATOL`` (1e-5, like the other oracle tests).

Each test was checked by hand to fail under a deliberate change of the reference (noted as
"Fails if" in its docstring).
"""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

from fastft import FineTuner

from helpers.data import image_data, mlp_data
from helpers.models import make_mlp, make_mlp_stack, make_resnet
from helpers.naive_reference import naive_fit, new_layers

pytestmark = pytest.mark.filterwarnings(
    # The test models arrive in train mode, as a user's do; fastft says it uses eval mode.
    "ignore:fastft runs the frozen layers in eval mode:UserWarning"
)

ATOL = 1e-5
FIT = dict(epochs=3, batch_size=16, lr=0.01, weight_decay=0.01)
SEED, DROPOUT_SEED = 3, 11


# ---------------------------------------------------------------------------- hand-built models
def frozen(module: nn.Module) -> nn.Module:
    for p in module.parameters():
        p.requires_grad_(False)
    return module


def mlp_body() -> nn.Module:
    """make_mlp without its output layer: 12 -> 16 features (a frozen Dropout inside)."""
    return frozen(make_mlp()[:5])


def cnn_body() -> nn.Module:
    """make_resnet without its output layer: pooled 16 features, BatchNorm with statistics."""
    model = make_resnet()
    model.fc = nn.Identity()
    return frozen(model)


#: name -> (pretrained model for fastft, its hand-made body, body width, data, classes)
MODELS = {
    "mlp": (make_mlp, mlp_body, 16, lambda: mlp_data(80), 3),
    "cnn_batchnorm": (make_resnet, cnn_body, 16, lambda: image_data(48), 5),
}


def assert_same(got: nn.Module, want: nn.Module, *, atol: float = ATOL) -> None:
    """Every parameter and buffer of ``got`` equals ``want``'s (in registration order)."""
    g, w = list(got.state_dict().items()), list(want.state_dict().items())
    assert [t.shape for _, t in g] == [t.shape for _, t in w] and g
    for (name, a), (_, b) in zip(g, w):
        torch.testing.assert_close(a, b, rtol=0, atol=atol, msg=name)


def assert_moved(module: nn.Module, before: dict[str, torch.Tensor]) -> None:
    """The comparison is not between two untrained heads."""
    assert max((p - before[n]).abs().max().item() for n, p in module.state_dict().items()) > 1e-3


def fit_both(ft, data, ref_model, *, train_modules, **fit) -> tuple[list, list]:
    """``ft.fit`` and :func:`naive_fit` with the same settings and dropout seed; their
    per-epoch losses."""
    X, y = data
    torch.manual_seed(DROPOUT_SEED)
    history = ft.fit((X, y), **fit)
    torch.manual_seed(DROPOUT_SEED)
    losses = naive_fit(ref_model, X, y, train_modules=train_modules, seed=SEED, **fit)
    return [r["loss"] for r in history], losses


# ---------------------------------------------------------------------------- new layers
@pytest.mark.parametrize("case", sorted(MODELS))
def test_hidden_layers_with_dropout(case, tmp_path):
    """FineTuner(hidden=[12, 8], dropout=0.3): two hidden layers, each followed by dropout.

    Fails if: the reference uses dropout 0.2 or none, another dropout seed, or lr 0.011."""
    make_model, body, width, data, k = MODELS[case]
    ft = FineTuner(
        make_model(),
        num_classes=k,
        hidden=[12, 8],
        dropout=0.3,
        seed=SEED,
        cache_dtype="fp32",
        cache_dir=str(tmp_path),
        verbose=False,
    )
    head = nn.Sequential(*new_layers(width, k, [12, 8], dropout=0.3, seed=SEED))
    start = copy.deepcopy(head.state_dict())
    ref = nn.Sequential(body(), head)
    stats = copy.deepcopy(ref[0].state_dict())
    got, want = fit_both(ft, data(), ref, train_modules=[head], **FIT)
    assert got == pytest.approx(want, abs=ATOL)
    assert_same(ft.model.get_submodule("fc" if case.startswith("cnn") else "5"), head)
    assert_moved(head, start)
    assert_same(ref[0], frozen(body()))  # frozen BatchNorm kept its running statistics
    assert all(torch.equal(stats[n], t) for n, t in ref[0].state_dict().items())


def test_custom_head_with_dropout(tmp_path):
    """FineTuner(head=Sequential(Dropout(0.25), Linear)): a ready-made head with dropout.

    Fails if: the reference head runs in eval mode (no dropout) or uses another dropout seed."""
    torch.manual_seed(5)
    custom = nn.Sequential(nn.Dropout(0.25), nn.Linear(16, 3))
    head = copy.deepcopy(custom)
    start = copy.deepcopy(head.state_dict())
    ft = FineTuner(
        make_mlp(),
        head=custom,
        seed=SEED,
        cache_dtype="fp32",
        cache_dir=str(tmp_path),
        verbose=False,
    )
    ref = nn.Sequential(mlp_body(), head)
    got, want = fit_both(ft, mlp_data(80), ref, train_modules=[head], **FIT)
    assert got == pytest.approx(want, abs=ATOL)
    assert_same(ft.model[5], head)
    assert_moved(head, start)


def test_dropout_without_hidden_layers_is_documented_as_a_no_op(tmp_path):
    """``dropout`` is documented as "of the new hidden layers": with none, the new output
    layer is a plain Linear and nothing draws from the dropout stream.

    Fails if: the reference puts Dropout(0.3) before the output layer."""
    ft = FineTuner(
        make_mlp(),
        num_classes=3,
        dropout=0.3,
        seed=SEED,
        cache_dtype="fp32",
        cache_dir=str(tmp_path),
        verbose=False,
    )
    (head,) = new_layers(16, 3, seed=SEED)
    ref = nn.Sequential(mlp_body(), head)
    got, want = fit_both(ft, mlp_data(80), ref, train_modules=[head], **FIT)
    assert got == pytest.approx(want, abs=ATOL)
    assert_same(ft.model[5], head)


# ---------------------------------------------------------------------------- freeze= lists
def test_freeze_list_leaves_the_unlisted_layers_training(tmp_path):
    """freeze=["0", "2"] freezes those two Linear layers of the MLP stack "on top" of nothing:
    layer "4" keeps requires_grad and trains with the new head (hidden layer with dropout).

    Fails if: the reference also freezes layer 4, or freezes only layer 0."""
    ft = FineTuner(
        make_mlp_stack(),
        num_classes=3,
        hidden=[8],
        dropout=0.2,
        freeze=["0", "2"],
        seed=SEED,
        cache_dtype="fp32",
        cache_dir=str(tmp_path),
        verbose=False,
    )
    ref = make_mlp_stack()
    frozen(ref[0])
    frozen(ref[2])
    head = nn.Sequential(*new_layers(16, 3, [8], dropout=0.2, seed=SEED))
    ref[6] = head
    start = copy.deepcopy(ref.state_dict())
    got, want = fit_both(ft, mlp_data(80), ref, train_modules=[ref[4], head], **FIT)
    assert got == pytest.approx(want, abs=ATOL)
    assert_same(ft.model, ref)
    assert not torch.equal(ref[4].weight, start["4.weight"])  # the unlisted layer trained
    assert torch.equal(ref[2].weight, start["2.weight"])
    assert ft.cache.taps[0].shape == (32,)  # cached at layer 4's input


def test_freeze_list_on_a_cnn_trains_batchnorm_of_the_unlisted_block(tmp_path):
    """freeze= every module but layer2.1: that residual block trains, in train mode, its
    BatchNorm on batch statistics (updating its running statistics), as the naive loop does.

    Fails if: the reference keeps layer2.1's BatchNorm in eval mode, or freezes layer2.1."""
    listed = ["conv1", "bn1", "layer1", "layer2.0"]
    ft = FineTuner(
        make_resnet(),
        num_classes=5,
        freeze=listed,
        seed=SEED,
        cache_dtype="fp32",
        cache_dir=str(tmp_path),
        verbose=False,
    )
    ref = make_resnet()
    for name in listed:
        frozen(ref.get_submodule(name))
    (ref.fc,) = new_layers(16, 5, seed=SEED)
    start = copy.deepcopy(ref.state_dict())
    block = ref.layer2[1]
    got, want = fit_both(ft, image_data(48), ref, train_modules=[block, ref.fc], **FIT)
    assert got == pytest.approx(want, abs=ATOL)
    assert_same(ft.model, ref)
    assert not torch.equal(block.bn1.running_mean, start["layer2.1.bn1.running_mean"])
    assert torch.equal(ref.layer2[0].bn1.running_mean, start["layer2.0.bn1.running_mean"])


# ---------------------------------------------------------------------------- losses
def test_mse_regression_with_a_one_output_head(tmp_path):
    """loss="mse" with head=nn.Linear(16, 1) on float targets [N] (compared as [N, 1]).

    Fails if: the reference trains at lr 0.02 or with weight decay 0."""
    X, _ = mlp_data(80)
    y = (2 * X[:, 0] - X[:, 3]).float()
    torch.manual_seed(5)
    custom = nn.Linear(16, 1)
    head = copy.deepcopy(custom)
    ft = FineTuner(
        make_mlp(),
        head=custom,
        cache_dtype="fp32",
        seed=SEED,
        cache_dir=str(tmp_path),
        verbose=False,
    )
    ref = nn.Sequential(mlp_body(), head)
    got, want = fit_both(ft, (X, y), ref, train_modules=[head], loss="mse", **FIT)
    assert got == pytest.approx(want, abs=ATOL)
    assert_same(ft.model[5], head)
    assert got[-1] < got[0]


def test_bce_multi_label_with_hidden_dropout(tmp_path):
    """loss="bce" on 0/1 targets [N, 4] (several labels per sample), hidden layer + dropout.

    Fails if: the reference uses dropout off or another dropout seed."""
    X, _ = mlp_data(80)
    y = torch.stack([X[:, 0] > 0, X[:, 1] > 0, X[:, 0] + X[:, 2] > 0, X[:, 3] > 1], 1).float()
    ft = FineTuner(
        make_mlp(),
        num_classes=4,
        hidden=[8],
        dropout=0.3,
        seed=SEED,
        cache_dtype="fp32",
        cache_dir=str(tmp_path),
        verbose=False,
    )
    head = nn.Sequential(*new_layers(16, 4, [8], dropout=0.3, seed=SEED))
    ref = nn.Sequential(mlp_body(), head)
    got, want = fit_both(ft, (X, y), ref, train_modules=[head], loss="bce", **FIT)
    assert got == pytest.approx(want, abs=ATOL)
    assert_same(ft.model[5], head)


def test_ce_with_class_weights_and_label_smoothing(tmp_path):
    """loss="ce" with class_weights and label_smoothing on the CNN.

    Fails if: the reference drops the class weights or uses label_smoothing 0.05."""
    fit = dict(FIT, class_weights=[1.0, 2.0, 0.5, 1.0, 3.0], label_smoothing=0.1)
    ft = FineTuner(
        make_resnet(),
        num_classes=5,
        hidden=[8],
        seed=SEED,
        cache_dtype="fp32",
        cache_dir=str(tmp_path),
        verbose=False,
    )
    head = nn.Sequential(*new_layers(16, 5, [8], seed=SEED))
    ref = nn.Sequential(cnn_body(), head)
    got, want = fit_both(ft, image_data(48), ref, train_modules=[head], **fit)
    assert got == pytest.approx(want, abs=ATOL)
    assert_same(ft.model.fc, head)


# ---------------------------------------------------------------------------- schedules
@pytest.mark.parametrize(
    "scheduler, optimizer",
    [(None, "adam"), ("cosine", "sgd"), ("cosine", "adamw"), ("onecycle", "adamw"),
     ("onecycle", "sgd")],
)  # fmt: skip
def test_every_scheduler_and_optimizer(scheduler, optimizer, tmp_path):
    """Each of FitConfig's schedulers (None, cosine, onecycle) stepped per batch over the fit,
    with each optimizer; the new layers have dropout.

    Fails if: the reference steps the schedule once per epoch, or uses onecycle's default
    max_lr, or momentum 0.8 with SGD."""
    fit = dict(FIT, epochs=4, lr=0.05 if optimizer == "sgd" else 0.01)
    ft = FineTuner(
        make_mlp(),
        num_classes=3,
        hidden=[8],
        dropout=0.2,
        seed=SEED,
        cache_dtype="fp32",
        cache_dir=str(tmp_path),
        verbose=False,
    )
    head = nn.Sequential(*new_layers(16, 3, [8], dropout=0.2, seed=SEED))
    ref = nn.Sequential(mlp_body(), head)
    got, want = fit_both(
        ft, mlp_data(80), ref, train_modules=[head], scheduler=scheduler, optimizer=optimizer, **fit
    )
    assert got == pytest.approx(want, abs=ATOL)
    assert_same(ft.model[5], head)
