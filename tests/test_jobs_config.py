"""Job configs (fastft.jobs, `fastft train`): every malformed config is refused with a
ConfigError that names the problem, before any model is built or trained."""

from __future__ import annotations

import json

import pytest

from fastft import jobs
from fastft.jobs import ConfigError

GOOD = {
    "model": "helpers.jobfactories:small_model",
    "data": "helpers.jobfactories:splits",
    "output": "out",
}


def write(tmp_path, text: str, name: str = "job.json"):
    path = tmp_path / name
    path.write_text(text)
    return path


def test_a_good_config_loads_as_json_or_yaml(tmp_path):
    assert jobs.load_config(write(tmp_path, json.dumps(GOOD))) == GOOD
    yaml_text = "".join(f"{k}: '{v}'\n" for k, v in GOOD.items())
    assert jobs.load_config(write(tmp_path, yaml_text, "job.yaml")) == GOOD


@pytest.mark.parametrize(
    "text, name, message",
    [
        ("{not json", "job.json", "is not valid JSON"),
        ("[1, 2]", "job.json", "must hold a mapping of settings, not list"),
        ("- a\n- b\n", "job.yml", "must hold a mapping of settings, not list"),
        (json.dumps({**GOOD, "epochs": 3}), "job.json", r"unknown config keys \['epochs'\]"),
        (json.dumps({"model": "m:f", "data": "d:f"}), "job.json", "the config needs 'output'"),
    ],
    ids=["bad json", "json list", "yaml list", "unknown key", "missing key"],
)
def test_a_malformed_config_file_is_refused(tmp_path, text, name, message):
    with pytest.raises(ConfigError, match=message):
        jobs.load_config(write(tmp_path, text, name))


def test_a_missing_config_file_is_refused(tmp_path):
    with pytest.raises(ConfigError, match="no config file at"):
        jobs.load_config(tmp_path / "nowhere.json")


@pytest.mark.parametrize(
    "spec, message",
    [
        ("helpers.jobfactories.small_model", "must be 'package.module:function'"),
        (42, "must be 'package.module:function'"),
        ("no_such_module_xyz:f", "cannot import 'no_such_module_xyz'"),
        ("helpers.jobfactories:nothing", "has no 'nothing'"),
        ("fastft.jobs:KNOWN_KEYS", "is not callable"),
    ],
)
def test_a_spec_that_names_no_function_is_refused(spec, message):
    with pytest.raises(ConfigError, match=message):
        jobs.resolve(spec)


def test_resolve_gives_the_named_function():
    from helpers import jobfactories

    assert jobs.resolve("helpers.jobfactories:splits") is jobfactories.splits


@pytest.mark.parametrize(
    "change, message",
    [
        ({"data": "helpers.jobfactories:small_model"}, "must return a dict with 'train'"),
        ({"surgery": {"prune": 2}}, "surgery step 'prune' is not supported"),
    ],
    ids=["data not splits", "surgery step"],
)
def test_a_config_whose_parts_do_not_fit_is_refused_before_training(tmp_path, change, message):
    config = {**GOOD, "output": str(tmp_path / "out"), **change}
    with pytest.raises(ConfigError, match=message):
        jobs.run(config)
    assert not (tmp_path / "out").exists()  # nothing trained, nothing written
