"""The public call forms: settings by keyword, ``fit(config=FitConfig(...))``, and the old
positional forms refused with a message that names the keyword form."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import fastft
from fastft import FineTuner, FitConfig

from helpers.data import labelled


def tiny_model():
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(6, 16), nn.ReLU(), nn.Linear(16, 4))


def tiny_data(n=48):
    return labelled(n)


def head_weights(ft):
    return {k: v.clone() for k, v in ft.tail.state_dict().items()}


def test_positional_settings_of_the_constructor_name_the_keyword_form():
    with pytest.raises(fastft.CallFormError, match=r"FineTuner\(model, num_classes=\.\.\.\)"):
        FineTuner(tiny_model(), 3)
    with pytest.raises(TypeError):  # a CallFormError is still a TypeError for old except clauses
        FineTuner(tiny_model(), 3, [8])


def test_positional_settings_of_fit_name_the_keyword_form():
    ft = FineTuner(tiny_model(), num_classes=3, verbose=False)
    X, y = tiny_data()
    with pytest.raises(fastft.CallFormError, match=r"epochs=\.\.\., batch_size=\.\.\."):
        ft.fit((X, y), None, 2, 16)
    assert ft.history == [] or not ft.history  # nothing was trained by the refused call


def test_config_gives_the_same_weights_as_keywords():
    X, y = tiny_data()
    settings = dict(epochs=3, batch_size=16, lr=5e-2, optimizer="sgd", weight_decay=1e-3)
    by_keyword = FineTuner(tiny_model(), num_classes=3, seed=0, verbose=False)
    by_keyword.fit((X, y), **settings)
    by_config = FineTuner(tiny_model(), num_classes=3, seed=0, verbose=False)
    by_config.fit((X, y), config=FitConfig(**settings))
    assert by_config.fit_config == by_keyword.fit_config
    a, b = head_weights(by_keyword), head_weights(by_config)
    assert a.keys() == b.keys()
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=0, atol=0)
    # and the settings did matter: another lr trains other weights
    other = FineTuner(tiny_model(), num_classes=3, seed=0, verbose=False)
    other.fit((X, y), config=FitConfig(**{**settings, "lr": 1e-3}))
    assert any(not torch.equal(a[k], v) for k, v in head_weights(other).items())


def test_config_and_a_keyword_with_another_value_are_refused():
    ft = FineTuner(tiny_model(), num_classes=3, verbose=False)
    X, y = tiny_data()
    with pytest.raises(fastft.FastFTError, match="lr=.*set each setting in one place"):
        ft.fit((X, y), config=FitConfig(epochs=1, lr=1e-2), lr=1e-3)
    # the same value in both places is not a clash
    ft.fit((X, y), config=FitConfig(epochs=1, lr=1e-2, batch_size=16), lr=1e-2)
    assert ft.fit_config.lr == 1e-2 and len(ft.history) == 1


def test_config_must_be_a_fitconfig():
    ft = FineTuner(tiny_model(), num_classes=3, verbose=False)
    X, y = tiny_data()
    with pytest.raises(fastft.FastFTError, match="config= takes a fastft.FitConfig, got dict"):
        ft.fit((X, y), config={"epochs": 1})


def test_config_values_are_validated_like_keywords():
    ft = FineTuner(tiny_model(), num_classes=3, verbose=False)
    X, y = tiny_data()
    with pytest.raises(fastft.FastFTError, match="epochs must be ≥ 1, got 0"):
        ft.fit((X, y), config=FitConfig(epochs=0))


def test_unfreeze_is_a_method_not_a_module():
    # fastft.unfreeze used to be a module, so calling it failed with "module is not callable".
    assert not hasattr(fastft, "unfreeze") or callable(fastft.unfreeze)
    ft = FineTuner(tiny_model(), num_classes=3, verbose=False)
    assert callable(ft.unfreeze)
