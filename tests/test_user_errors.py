"""A new user's ordinary mistakes get a fastft error that names what was given and the line
that fixes it (issue 19, part C): data in near-miss forms, one unbatched sample, a model
whose forward takes several tensors, job configs (`fastft train` from the current folder,
unknown keys, early stopping) and fit_many's shared settings."""

from __future__ import annotations

import json
import re
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from torch import nn

import fastft
from fastft import jobs
from fastft.errors import DataError, FastFTValueError
from fastft.jobs import ConfigError

pytestmark = pytest.mark.usefixtures("fresh_registry")

X = torch.randn(24, 6, generator=torch.Generator().manual_seed(0))
Y = (X[:, 0] > 0).long()


def mlp_tuner(**kw):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 16), nn.ReLU(), nn.Linear(16, 4))
    return fastft.FineTuner(model, num_classes=2, verbose=False, cache="host", **kw)


class Conv(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3)
        self.fc = nn.Linear(4, 5)

    def forward(self, x):
        return self.fc(self.conv(x).mean((2, 3)))


class TwoInputs(nn.Module):
    def __init__(self):
        super().__init__()
        self.embed = nn.Embedding(10, 8)
        self.fc = nn.Linear(8, 5)

    def forward(self, ids, mask):
        return self.fc((self.embed(ids) * mask[..., None]).sum(1) / mask.sum(1, keepdim=True))


# ---------------------------------------------------------------------------- data forms
NEAR_MISSES = [
    ("numpy pair", (X.numpy(), Y.numpy()), ["pair of NumPy arrays", "torch.from_numpy(X)"]),
    ("numpy X", (X.numpy(), Y), ["X is a NumPy array", "torch.from_numpy(X)"]),
    ("numpy y", (X, Y.numpy()), ["y is a NumPy array", "torch.from_numpy(y)"]),
    ("list of samples", (list(X), Y), ["list of 24 tensors", "torch.stack(X)"]),
    ("labels as a list", (X, Y.tolist()), ["y is a Python list", "torch.tensor(y)"]),
    ("a dict", {"x": X, "y": Y}, ["dict with keys 'x', 'y'", "(X, y) pair", "(input, label)"]),
    ("inputs as a tuple", ((X, X), Y), ["tuple of 2 input tensors", "dict keyed by forward"]),
    ("no labels", X, ["no labels", "pass (X, y)"]),
    ("a dict of splits", {"train": (X, Y), "test": (X, Y)}, ["dict of splits", "data['train']"]),
]


@pytest.mark.parametrize(
    "data, words", [c[1:] for c in NEAR_MISSES], ids=[c[0] for c in NEAR_MISSES]
)
def test_data_in_a_near_miss_form_is_refused_with_the_fix(data, words):
    with pytest.raises(DataError) as err:
        mlp_tuner().fit(data, epochs=1)
    for word in words:
        assert word in str(err.value)


def test_evaluate_refuses_numpy_like_fit():
    ft = mlp_tuner()
    ft.fit((X, Y), epochs=1)
    with pytest.raises(DataError, match=r"torch\.from_numpy\(X\), torch\.from_numpy\(y\)"):
        ft.evaluate((X.numpy(), Y.numpy()))


def test_a_list_of_two_samples_is_still_a_dataset():
    """The near-miss checks must not catch a valid map-style dataset that is a list of
    (input, label) pairs, here one of length two."""
    data = [(X[0], Y[0]), (X[1], Y[1])]
    ft = mlp_tuner()
    ft.fit(data, epochs=1, batch_size=2)
    assert ft.evaluate(data)["accuracy"] in (0.0, 0.5, 1.0)


# ---------------------------------------------------------------------------- predict
def test_predict_refuses_numpy_and_a_list_with_the_fix():
    ft = mlp_tuner()
    ft.fit((X, Y), epochs=1)
    with pytest.raises(DataError, match=r"x is a NumPy array .*torch\.from_numpy\(x\)"):
        ft.predict(X[:3].numpy())
    with pytest.raises(DataError, match=r"torch\.stack\(x\)"):
        ft.predict(list(X[:3]))


def test_predict_on_one_unbatched_sample_says_unsqueeze():
    # An MLP would run quietly on a 1-d input and return 1-d logits: refused too.
    ft = mlp_tuner()
    ft.fit((X, Y), epochs=1)
    with pytest.raises(DataError, match=r"one fewer .*\(2\).*x\.unsqueeze\(0\)"):
        ft.predict(X[0])
    torch.testing.assert_close(ft.predict(X[0].unsqueeze(0)), ft.predict(X[:3])[:1])

    images = torch.randn(10, 3, 8, 8, generator=torch.Generator().manual_seed(2))
    torch.manual_seed(0)
    conv = fastft.FineTuner(Conv(), num_classes=2, verbose=False, cache="host")
    conv.fit((images, torch.arange(10) % 2), epochs=1)
    with pytest.raises(DataError, match=r"x has 3 dimensions, one fewer .*\(4\).*unsqueeze\(0\)"):
        conv.predict(images[0])
    assert conv.predict(images[0].unsqueeze(0)).shape == (1, 2)


def test_predict_after_load_notes_the_batch_dimension_when_the_model_fails(tmp_path):
    # After load() no batch shape is known: the model's own error keeps its type, with a note.
    images = torch.randn(10, 3, 8, 8, generator=torch.Generator().manual_seed(2))
    torch.manual_seed(0)
    ft = fastft.FineTuner(Conv(), num_classes=2, verbose=False, cache="host")
    ft.fit((images, torch.arange(10) % 2), epochs=1)
    ft.save(str(tmp_path / "ft.pt"))
    torch.manual_seed(0)
    loaded = fastft.FineTuner.load(str(tmp_path / "ft.pt"), Conv(), verbose=False)
    with pytest.raises(Exception) as err:
        loaded.predict(images[0])
    assert any("unsqueeze(0)" in note for note in getattr(err.value, "__notes__", []))


# ---------------------------------------------------------------------------- several inputs
def test_a_forward_of_two_tensors_is_explained():
    g = torch.Generator().manual_seed(3)
    ids, mask = torch.randint(0, 10, (16, 5), generator=g), torch.ones(16, 5)
    y = torch.arange(16) % 2

    def tuner():
        torch.manual_seed(0)
        return fastft.FineTuner(TwoInputs(), num_classes=2, verbose=False, cache="host")

    with pytest.raises(DataError) as err:
        tuner().fit((ids, y), epochs=1)
    assert "forward(ids, mask) takes 2 tensors" in str(err.value)
    assert "{'ids': ids, 'mask': mask}" in str(err.value)
    with pytest.raises(
        DataError, match=r"needs ids, mask, which the inputs dict \(keys 'a', 'b'\)"
    ):
        tuner().fit(({"a": ids, "b": mask}, y), epochs=1)
    # What the message says to do works.
    ft = tuner()
    ft.fit(({"ids": ids, "mask": mask}, y), epochs=1)
    assert ft.predict({"ids": ids[:3], "mask": mask[:3]}).shape == (3, 2)


# ---------------------------------------------------------------------------- job configs
GOOD = {"model": "helpers.jobfactories:small_model", "data": "helpers.jobfactories:splits"}


def test_the_jobs_docstring_example_is_a_valid_config():
    doc = jobs.__doc__
    block = doc[doc.index("::\n") + 3 :]
    block = block[: block.index("\n\n", block.index("}"))]
    config = json.loads(textwrap.dedent(block))
    assert set(config) <= jobs.KNOWN_KEYS
    jobs.check_config(config)  # every finetuner/fit/early_stopping key is a valid one


@pytest.mark.parametrize(
    "section, words",
    [
        ({"fit": {"epoch": 3}}, ["unknown 'fit' key 'epoch' (did you mean 'epochs'?)", "lr"]),
        ({"finetuner": {"classes": 3}}, ["unknown 'finetuner' key 'classes'", "num_classes"]),
        (
            {"fit": {"early_stopping": {"patients": 2}}},
            ["'early_stopping' key 'patients'", "patience", "monitor", "min_delta"],
        ),
        ({"fit": {"early_stopping": "3"}}, ["a patience (an int", "not str"]),
        ({"fit": {"callbacks": []}}, ["unknown 'fit' key 'callbacks'"]),
    ],
    ids=["fit", "finetuner", "early_stopping dict", "early_stopping str", "python-only"],
)
def test_an_unknown_key_lists_the_valid_ones(tmp_path, section, words):
    path = tmp_path / "job.json"
    path.write_text(json.dumps({**GOOD, "output": str(tmp_path / "out"), **section}))
    with pytest.raises(ConfigError) as err:
        jobs.load_config(path)
    for word in words:
        assert word in str(err.value)
    with pytest.raises(ConfigError):  # run() checks too, before anything is built
        jobs.run({**GOOD, "output": str(tmp_path / "out"), **section})
    assert not (tmp_path / "out").exists()


def test_kwargs_that_are_not_mappings_and_unknown_splits_are_refused(tmp_path):
    with pytest.raises(ConfigError, match="'model_kwargs' must be a mapping .*not list"):
        jobs.run({**GOOD, "model_kwargs": [12], "output": str(tmp_path / "out")})
    # A split named 'validation' would be ignored silently: refused before training.
    (tmp_path / "renamed.py").write_text(
        "from helpers.jobfactories import splits\n"
        "def data():\n"
        "    s = splits()\n"
        "    return {'train': s['train'], 'validation': s['test']}\n"
    )
    config = {**GOOD, "data": "renamed:data", "output": str(tmp_path / "out")}
    (tmp_path / "job.json").write_text(json.dumps(config))
    sys.modules.pop("renamed", None)
    with pytest.raises(ConfigError, match=r"\['train', 'validation'\].*'validation' to 'val'"):
        jobs.run_file(tmp_path / "job.json")
    sys.modules.pop("renamed", None)
    assert not (tmp_path / "out").exists()


def test_early_stopping_is_configurable_in_a_job(tmp_path):
    # min_delta larger than any loss: epoch 1 is the best, epoch 2 the first without progress.
    fit = {"epochs": 6, "batch_size": 16, "lr": 0.01}
    config = {
        **GOOD,
        "finetuner": {"num_classes": 3, "verbose": False, "cache": "host"},
        "output": str(tmp_path / "out"),
    }
    stopping = {"patience": 1, "monitor": "loss", "min_delta": 100.0, "restore_best": True}
    jobs.run({**config, "fit": {**fit, "early_stopping": stopping}})
    history = json.loads((tmp_path / "out" / "history.json").read_text())
    assert [r["epoch"] for r in history] == [1, 2]
    jobs.run({**config, "fit": fit})
    assert len(json.loads((tmp_path / "out" / "history.json").read_text())) == 6


FACTORIES = """
import torch
from torch import nn

def model():
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 5))

def data():
    g = torch.Generator().manual_seed(0)
    X = torch.randn(32, 4, generator=g)
    return {{"train": (X, (X[:, 0] > 0).long())}}

WHERE = {where!r}
"""


def fastft_script() -> Path:
    script = Path(sys.executable).parent / "fastft"
    if not script.exists():
        pytest.skip("the fastft console script is not installed next to this Python")
    return script


def test_fastft_train_imports_factories_from_the_config_folder_then_cwd(tmp_path):
    script = fastft_script()
    (tmp_path / "conf").mkdir()
    (tmp_path / "userfactories.py").write_text(FACTORIES.format(where="cwd"))
    (tmp_path / "conf" / "conffactories.py").write_text(FACTORIES.format(where="conf"))
    # A module of the same name in both: the config's folder comes first.
    (tmp_path / "conf" / "userfactories.py").write_text(FACTORIES.format(where="conf"))
    job = {
        "model": "userfactories:model",
        "data": "conffactories:data",
        "finetuner": {"num_classes": 2, "verbose": False, "cache": "host"},
        "fit": {"epochs": 2, "batch_size": 8},
        "output": "out",
    }
    (tmp_path / "conf" / "job.json").write_text(json.dumps(job))
    out = subprocess.run(
        [str(script), "train", "conf/job.json"],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert out.returncode == 0, out.stderr
    assert len(json.loads((tmp_path / "out" / "history.json").read_text())) == 2
    # Which userfactories ran: the one next to the config.
    with jobs.import_path(tmp_path / "conf" / "job.json"):
        sys.modules.pop("userfactories", None)
        try:
            assert jobs.resolve("userfactories:model").__module__ == "userfactories"
            assert sys.modules["userfactories"].WHERE == "conf"
        finally:
            sys.modules.pop("userfactories", None)
    assert str(tmp_path / "conf") not in sys.path  # the path is restored after the job

    # cwd only, and an unknown fit key: one line with the valid keys, exit status 2.
    (tmp_path / "job.json").write_text(json.dumps({**job, "fit": {"epoch": 2}}))
    out = subprocess.run(
        [str(script), "train", "job.json"],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert out.returncode == 2
    assert "did you mean 'epochs'?" in out.stderr and "Traceback" not in out.stderr


# ---------------------------------------------------------------------------- fit_many
def test_fit_many_takes_a_shared_lr_that_a_config_overrides():
    ft = mlp_tuner()
    fit = dict(epochs=3, batch_size=8, keep_best=False)
    shared = ft.fit_many([{"hidden": [8]}, {"hidden": [8], "lr": 1e-3}], (X, Y), lr=0.1, **fit)
    own = ft.fit_many([{"hidden": [8], "lr": 0.1}, {"hidden": [8], "lr": 1e-3}], (X, Y), **fit)
    default = ft.fit_many([{"hidden": [8]}], (X, Y), **fit)
    losses = [[[r["loss"] for r in h] for h in s.histories] for s in (shared, own, default)]
    assert losses[0] == losses[1]  # the shared lr is what a config's own lr 0.1 gives
    assert [r["lr"] for r in shared.histories[0]] == [0.1] * 3
    assert [r["lr"] for r in shared.histories[1]] == [1e-3] * 3  # the config's own wins
    assert losses[0][0] != losses[2][0]  # and not the default lr


def test_fit_many_shared_weight_decay_reaches_the_optimizer():
    ft = mlp_tuner()
    fit = dict(epochs=2, batch_size=8, keep_best=False, lr=0.05)
    shared = ft.fit_many([{}], (X, Y), weight_decay=0.5, **fit)
    own = ft.fit_many([{"weight_decay": 0.5}], (X, Y), **fit)
    none = ft.fit_many([{}], (X, Y), **fit)
    loss = [[r["loss"] for r in s.histories[0]] for s in (shared, own, none)]
    assert loss[0] == loss[1] and loss[0] != loss[2]


@pytest.mark.parametrize(
    "call, words",
    [
        (lambda ft: ft.fit_many([{}], (X, Y), epoch=2), ["unknown keyword epoch", "epochs", "lr"]),
        (
            lambda ft: ft.fit_many([{"epochs": 2}], (X, Y)),
            ["unknown epochs", "keywords of fit_many", "label_smoothing"],
        ),
        (lambda ft: ft.fit_many([0.1], (X, Y)), ["list of dicts", "got a float"]),
    ],
    ids=["shared", "per config", "not a dict"],
)
def test_fit_many_lists_the_keys_it_takes(call, words):
    with pytest.raises(FastFTValueError) as err:
        call(mlp_tuner())
    for word in words:
        assert re.search(re.escape(word), str(err.value))
