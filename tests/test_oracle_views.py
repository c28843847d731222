"""Augmented views (``views=K`` with a random ``transform=``) against the naive reference.

What is documented, and what the reference does with it:

- **The view draw.** docs/guide.md: "``views=K`` caches K views per sample; each epoch uses one";
  the engine draws it per sample: after the epoch's ``randperm(N, generator=g)``, the same
  seeded generator draws ``view = randint(K, (N,))`` and sample ``i`` is read from its view
  ``view[i]`` that epoch. :func:`helpers.naive_reference.batch_order` reproduces both draws.
- **The views themselves.** A random transform is "seeded per chunk from ``seed``" (through
  torch's global generator, and a ``generator=`` keyword when the transform takes one;
  docs/cache-key.md); *which* seed each chunk gets is not documented. So the reference does
  not take fastft's cached features: it applies the transform itself, to the raw inputs, with
  the seeds fastft handed the transform (read from the ``generator=`` it received), and runs
  the frozen body on them every batch. With the default ``extract_batch_size`` (256) and
  fewer samples, each view is one call of the transform, in view order 0..K-1.

The transforms record the seeds they see, which changes their state: fastft then warns that
their caches cannot be reused (a CacheReuseWarning, which this test does not need).
"""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

from fastft import FineTuner

from helpers.data import image_data, mlp_data
from helpers.models import make_mlp, make_resnet
from helpers.naive_reference import naive_fit, new_layers

pytestmark = [
    pytest.mark.filterwarnings("ignore::fastft.errors.CacheReuseWarning"),  # the recording
    pytest.mark.filterwarnings("ignore:fastft runs the frozen layers in eval mode:UserWarning"),
]

ATOL = 1e-5
SEED, DROPOUT_SEED, VIEWS = 3, 11, 3
FIT = dict(epochs=4, batch_size=16, lr=0.01, weight_decay=0.01)
SEEN: list[int] = []  # the seed of every generator fastft passed a transform


def noise(x: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    return x + 0.5 * torch.randn(x.shape, generator=generator)


def flip_and_noise(x: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    flip = torch.rand(x.shape[0], generator=generator) < 0.5
    return noise(torch.where(flip[:, None, None, None], x.flip(-1), x), generator)


def recording(augment):
    def transform(x, generator=None):
        SEEN.append(generator.initial_seed())
        return augment(x, generator)

    return transform


def frozen(module: nn.Module) -> nn.Module:
    for p in module.parameters():
        p.requires_grad_(False)
    return module


def cnn_body() -> nn.Module:
    model = make_resnet()
    model.fc = nn.Identity()
    return frozen(model)


CASES = {
    "mlp": (make_mlp, lambda: frozen(make_mlp()[:5]), "5", noise, lambda: mlp_data(64)),
    "cnn_batchnorm": (make_resnet, cnn_body, "fc", flip_and_noise, lambda: image_data(40)),
}


@pytest.mark.parametrize("case", sorted(CASES))
def test_views_equal_the_reference_applying_the_transform_itself(case, tmp_path):
    """K=3 views, one drawn per sample per epoch, dropout in the new hidden layer.

    Fails if: the reference reads view (v + 1) % K instead of v, or only view 0."""
    make_model, body, head_name, augment, data = CASES[case]
    X, y = data()
    k = int(y.max()) + 1
    SEEN.clear()
    ft = FineTuner(
        make_model(),
        num_classes=k,
        hidden=[8],
        dropout=0.2,
        views=VIEWS,
        transform=recording(augment),
        seed=SEED,
        cache_dtype="fp32",
        cache_dir=str(tmp_path),
        verbose=False,
    )
    torch.manual_seed(DROPOUT_SEED)
    history = ft.fit((X, y), **FIT)

    seeds = list(dict.fromkeys(SEEN))  # in order of first use: view 0, 1, 2
    assert len(seeds) == VIEWS
    views = [augment(X, torch.Generator().manual_seed(s)) for s in seeds]
    assert not torch.allclose(views[0], views[1])  # the views differ
    head = nn.Sequential(*new_layers(16, k, [8], dropout=0.2, seed=SEED))
    start = copy.deepcopy(head.state_dict())
    ref = nn.Sequential(body(), head)
    torch.manual_seed(DROPOUT_SEED)
    losses = naive_fit(ref, X, y, train_modules=[head], seed=SEED, views=views, **FIT)

    assert [r["loss"] for r in history] == pytest.approx(losses, abs=ATOL)
    got = ft.model.get_submodule(head_name).state_dict()
    for name, want in head.state_dict().items():
        torch.testing.assert_close(got[name], want, rtol=0, atol=ATOL, msg=name)
    assert max((head.state_dict()[n] - start[n]).abs().max().item() for n in start) > 1e-3
