"""The compatibility suite: models people fine-tune, from their own libraries, as a drop-in.

Each architecture of :mod:`helpers.compat_models` (Hugging Face transformers text encoders,
decoders with padding and vision classifiers; a SentenceTransformer; timm and torchvision
models where they import) is built from a tiny config with random weights and given to
``FineTuner(model, num_classes=5, hidden=[16], cache_dtype="fp32")`` as is, with its inputs
as its library takes them (a tokenizer-style dict, an image batch). For each:

- ``fit`` equals naive frozen training of the same edited model (the whole model run on
  every batch, same batch order: :func:`helpers.naive_reference.naive_fit`) to 1e-5;
- the frozen part ran once per sample (a hook on the first frozen layer counts samples);
- the frozen weights did not change;
- ``export()`` gives back the user's model class, whose output (its logits) equals
  ``predict()``.

``FASTFT_COMPAT_RESULTS=path.json`` records every passing case in that file (merged with
what it holds, so that runs in several environments add up); ``python
tests/helpers/compat_table.py path.json`` then writes docs/models.md and the README's
summary. An ordinary run writes nothing.
"""

from __future__ import annotations

import copy
import json
import os
import platform
from pathlib import Path

import pytest
import torch
from torch import nn

import fastft
from fastft import surgery

from helpers.compat_models import CASES, Case, image_batch, require, text_batch
from helpers.naive_reference import naive_fit, trainable_state

N, BATCH, EPOCHS, LR = 16, 8, 2, 1e-2
NUM_CLASSES, HIDDEN = 5, [16]

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning", "ignore::FutureWarning")


class Logits(nn.Module):
    """The model called the way its library calls it (``model(**batch)`` for Hugging Face,
    ``model(batch)`` otherwise), returning the logits tensor of whatever it returns."""

    def __init__(self, model: nn.Module, keywords: bool):
        super().__init__()
        self.model, self.keywords = model, keywords

    def forward(self, x):
        out = self.model(**x) if self.keywords and isinstance(x, dict) else self.model(x)
        if isinstance(out, torch.Tensor):
            return out
        if isinstance(out, dict) and "logits" in out:  # a ModelOutput is a dict too
            return out["logits"]
        return getattr(out, "logits", None) if hasattr(out, "logits") else out[0]


def inputs_of(case: Case, n: int = N):
    return text_batch(n) if case.inputs == "text" else image_batch(n)


def rows(x, k: int):
    return {key: v[:k] for key, v in x.items()} if isinstance(x, dict) else x[:k]


def first_frozen_layer(model: nn.Module, example, keywords: bool) -> tuple[str, nn.Module]:
    """The first layer with weights, all frozen, that runs on the batch (a stem, embeddings)."""
    order: list[tuple[str, nn.Module]] = []
    handles = []
    for name, m in model.named_modules():
        own = list(m.parameters(recurse=False))
        if name and own and not any(p.requires_grad for p in own):

            def hook(mod, args, name=name):
                t = next((a for a in args if torch.is_tensor(a)), None)
                if t is not None and t.dim() and t.shape[0] == 2:
                    order.append((name, mod))

            handles.append(m.register_forward_pre_hook(hook))
    modes = {m: m.training for m in model.modules()}
    try:
        with torch.no_grad():
            Logits(model.eval(), keywords)(example)
    finally:
        for h in handles:
            h.remove()
        for m, mode in modes.items():
            m.training = mode
    assert order, "no frozen layer ran"
    return order[0]


class SampleCounter:
    """A global forward pre-hook adding up the batch sizes one layer sees."""

    def __init__(self, layer: nn.Module):
        self.layer, self.samples = layer, 0

    def __call__(self, module, args):
        if module is self.layer:
            self.samples += int(next(a for a in args if torch.is_tensor(a)).shape[0])


def record(case: Case, ft: fastft.FineTuner) -> None:
    """Add the case to $FASTFT_COMPAT_RESULTS (only when set)."""
    target = os.environ.get("FASTFT_COMPAT_RESULTS")
    if not target:
        return
    path = Path(target)
    results = json.loads(path.read_text()) if path.exists() else {}
    module = {"sentence-transformers": "sentence_transformers"}.get(case.library, case.library)
    version = getattr(__import__(module), "__version__", "?")
    versions = {"torch": torch.__version__.split("+")[0], case.library: version.split("+")[0]}
    spec = ft.tuned.head_spec
    results[case.id] = {
        "family": case.family,
        "library": case.library,
        "model": type(ft.export()).__name__,
        "head": spec.name if spec.mode == "replace" else "appended",
        "split": ft.prefix.method,
        "cached": [list(t.shape) for t in ft.cache.taps],
        "note": case.note,
        "versions": versions,
        "python": platform.python_version(),
    }
    path.write_text(json.dumps(results, indent=1, sort_keys=True))


@pytest.mark.parametrize("case", CASES, ids=lambda c: c.id)
def test_a_library_model_fits_like_naive_frozen_training(case):
    require(case.library)
    X = inputs_of(case)
    y = torch.randint(0, NUM_CLASSES, (N,), generator=torch.Generator().manual_seed(1))
    torch.manual_seed(0)
    model = case.build()
    model_class = type(model)
    ft = fastft.FineTuner(
        model, num_classes=NUM_CLASSES, hidden=HIDDEN, cache_dtype="fp32", verbose=False
    )
    ft.prepare(rows(X, 2))  # attach the head (an encoder's needs data), size it from the cut
    naive = copy.deepcopy(ft.model)
    frozen = {n: p.detach().clone() for n, p in ft.model.named_parameters() if not p.requires_grad}
    name, stem = first_frozen_layer(ft.model, rows(X, 2), case.keywords)
    seen = SampleCounter(stem)
    # A global hook: one on the module would be part of the model (and of the cache key).
    handle = torch.nn.modules.module.register_module_forward_pre_hook(seen)
    try:
        torch.manual_seed(2)
        ft.fit((X, y), epochs=EPOCHS, batch_size=BATCH, lr=LR)
    finally:
        handle.remove()
    assert seen.samples == N, f"the frozen layer {name!r} saw {seen.samples} samples, not {N}"

    torch.manual_seed(2)
    naive_fit(
        Logits(naive, case.keywords),
        X,
        y,
        train_modules=[naive.get_submodule(n) for n in surgery.new_modules(naive)],
        epochs=EPOCHS,
        batch_size=BATCH,
        lr=LR,
    )
    want, got = trainable_state(naive), trainable_state(ft.model)
    assert want.keys() == got.keys() and want
    for key in want:
        torch.testing.assert_close(got[key], want[key], rtol=0, atol=1e-5, msg=key)
    for key, before in frozen.items():
        assert torch.equal(ft.model.get_parameter(key), before), f"frozen {key} changed"

    exported = ft.export()
    if ft.tuned.head_spec.mode == "replace":
        assert type(exported) is model_class
    with torch.no_grad():
        out = Logits(exported, case.keywords)(X)
    assert out.shape == (N, NUM_CLASSES)
    torch.testing.assert_close(out, ft.predict(X), rtol=0, atol=1e-5)
    record(case, ft)
