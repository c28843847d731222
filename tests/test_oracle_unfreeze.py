"""Progressive unfreezing against the naive reference, the blocks unfrozen by hand.

docs/guide.md: ``fit(unfreeze=[(epoch, n)])`` makes the top ``n`` blocks trainable before that
(0-based) epoch and ``lr_decay=d`` gives block *k* from the top ``lr * d**k``; BatchNorm in
an unfrozen block keeps its running statistics unless ``train_bn=True``. The fitting module
documents the stages: each trains like a fit of its own epochs (fresh optimizer and
schedule, batch order drawn from the seed again). The reference does exactly that by hand:
head-only epochs, then ``requires_grad_(True)`` on the top blocks, decayed parameter
groups, the blocks in train mode (their BatchNorm in eval mode), and one :func:`naive_fit`
per stage; dropout in the new layers goes on drawing from the global generator. fastft's
weights (new layers and blocks) and per-epoch losses must equal the reference's to 1e-5.
"""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

from fastft import FineTuner

from helpers.data import image_data, mlp_data
from helpers.models import make_mlp_stack, make_resnet
from helpers.naive_reference import decayed_groups, naive_fit, new_layers

ATOL = 1e-5
SEED, DROPOUT_SEED = 3, 11
FIT = dict(batch_size=16, lr=0.01, weight_decay=0.01)
BN = nn.modules.batchnorm._BatchNorm

pytestmark = pytest.mark.filterwarnings(
    "ignore:fastft runs the frozen layers in eval mode:UserWarning"  # models arrive in train mode
)


def frozen(module: nn.Module) -> nn.Module:
    for p in module.parameters():
        p.requires_grad_(False)
    return module


def mlp_reference() -> tuple[nn.Module, nn.Module, list[nn.Module]]:
    """make_mlp_stack with its output layer replaced by hand: (model, head, blocks bottom-up)."""
    model = frozen(make_mlp_stack())
    model[6] = nn.Sequential(*new_layers(16, 3, [8], dropout=0.2, seed=SEED))
    return model, model[6], [model[0], model[2], model[4]]


def cnn_reference() -> tuple[nn.Module, nn.Module, list[nn.Module]]:
    model = frozen(make_resnet())
    model.fc = nn.Sequential(*new_layers(16, 5, [8], dropout=0.2, seed=SEED))
    return model, model.fc, [model.layer1[0], model.layer1[1], model.layer2[0], model.layer2[1]]


CASES = {
    "mlp_stack": (make_mlp_stack, mlp_reference, lambda: mlp_data(64), ["0", "2", "4"]),
    "cnn_batchnorm": (
        make_resnet,
        cnn_reference,
        lambda: image_data(40),
        ["layer1.0", "layer1.1", "layer2.0", "layer2.1"],
    ),
}


def tuner(case: str, tmp_path) -> FineTuner:
    make_model = CASES[case][0]
    return FineTuner(
        make_model(),
        num_classes=5 if case.startswith("cnn") else 3,
        hidden=[8],
        dropout=0.2,
        seed=SEED,
        cache_dtype="fp32",
        cache_dir=str(tmp_path),
        verbose=False,
    )


def naive_stages(case, schedule, epochs, *, lr_decay, train_bn=False):
    """The reference model trained stage by stage; (model, per-epoch losses). Dropout draws
    from the global generator seeded with DROPOUT_SEED once the model is built."""
    _, make_ref, data, _ = CASES[case]
    X, y = data()
    model, head, blocks = make_ref()  # make_* seed the global generator: seed after them
    torch.manual_seed(DROPOUT_SEED)
    bounds = [e for e, _ in schedule] + [epochs]
    stages = ([(0, None)] if schedule[0][0] > 0 else []) + list(schedule)
    ends = ([schedule[0][0]] if schedule[0][0] > 0 else []) + bounds[1:]
    losses: list[float] = []
    for (first, n), end in zip(stages, ends):
        top = [] if not n else blocks[-n:][::-1]  # top block first
        for b in blocks:
            b.requires_grad_(any(b is t for t in top))
        bns = [] if train_bn else [m for b in top for m in b.modules() if isinstance(m, BN)]
        groups = decayed_groups([head], top, FIT["lr"], 1.0 if lr_decay is None else lr_decay)
        losses += naive_fit(
            model,
            X,
            y,
            train_modules=[head, *top],
            keep_eval=bns,
            param_groups=groups,
            epochs=end - first,
            seed=SEED,
            **FIT,
        )
    return model, losses


@pytest.mark.parametrize(
    "case, schedule, epochs",
    [("mlp_stack", [(2, 1)], 4), ("mlp_stack", [(1, 1), (3, 2)], 5),
     ("cnn_batchnorm", [(2, 2)], 3)],
)  # fmt: skip
def test_unfreeze_schedule_equals_unfreezing_by_hand(case, schedule, epochs, tmp_path):
    """Fails if: the reference decays by 0.25 instead of 0.5, unfreezes one epoch later,
    draws a later stage's batch order from another seed than the fit's, or lets BatchNorm of
    the blocks use batch statistics."""
    ft = tuner(case, tmp_path)
    X, y = CASES[case][2]()
    start = copy.deepcopy(ft.model.state_dict())
    torch.manual_seed(DROPOUT_SEED)
    history = ft.fit((X, y), epochs=epochs, unfreeze=schedule, lr_decay=0.5, **FIT)
    ref, losses = naive_stages(case, schedule, epochs, lr_decay=0.5)

    assert [r["loss"] for r in history] == pytest.approx(losses, abs=ATOL)
    got, want = ft.model.state_dict(), list(ref.state_dict().values())
    assert len(got) == len(want)
    for (name, a), b in zip(got.items(), want):
        torch.testing.assert_close(a, b, rtol=0, atol=ATOL, msg=name)
    # Not vacuous: the deepest unfrozen block trained, the block under it did not.
    moved = [n for n, t in got.items() if not torch.equal(t, start[n])]
    names = CASES[case][3]
    deepest = len(names) - max(n for _, n in schedule)
    assert any(n.startswith(names[deepest] + ".") for n in moved)
    assert not any(n.startswith(names[deepest - 1] + ".") for n in moved)


def test_manual_unfreeze_with_train_bn_equals_training_the_block_by_hand(tmp_path):
    """ft.unfreeze(1, train_bn=True), then fit: the top residual block trains with the head,
    its BatchNorm on batch statistics (running statistics updated).

    Fails if: the reference keeps that BatchNorm in eval mode, or trains the block at 0.5 lr."""
    ft = tuner("cnn_batchnorm", tmp_path)
    X, y = image_data(40)
    assert ft.unfreeze(1, train_bn=True) == ["layer2.1"]
    torch.manual_seed(DROPOUT_SEED)
    ft.fit((X, y), epochs=3, **FIT)
    model, head, blocks = cnn_reference()
    blocks[-1].requires_grad_(True)
    torch.manual_seed(DROPOUT_SEED)
    naive_fit(model, X, y, train_modules=[head, blocks[-1]], epochs=3, seed=SEED, **FIT)
    for (name, a), b in zip(ft.model.state_dict().items(), model.state_dict().values()):
        torch.testing.assert_close(a, b, rtol=0, atol=ATOL, msg=name)
    assert not torch.equal(
        ft.model.layer2[1].bn1.running_mean, make_resnet().layer2[1].bn1.running_mean
    )
