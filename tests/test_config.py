"""Method configs: merging option layers, type and value checks, YAML files and presets."""

import dataclasses

import pytest

from fasterase.config import MethodConfig, make_config, preset, read_yaml
from fasterase.errors import UserError
from fasterase.methods.kpop import KPOPConfig


def one_line(err: pytest.ExceptionInfo) -> str:
    message = str(err.value)
    assert message and "\n" not in message, message
    return message


def test_defaults():
    cfg = make_config(KPOPConfig)
    assert cfg == KPOPConfig()
    assert cfg.steps == 150 and cfg.inject == "all" and cfg.concepts == []
    # Lists are fresh per instance.
    cfg.templates.append("{} again")
    assert "{} again" not in KPOPConfig().templates


def test_every_field_has_help():
    for f in dataclasses.fields(KPOPConfig):
        assert f.metadata.get("help"), f.name


def test_later_layers_win():
    cfg = make_config(
        KPOPConfig,
        {"steps": 10, "lr": 1e-3, "concepts": ["circle"]},
        {"steps": 20, "neutral": "ring"},
        {"steps": 30, "concepts": ["square", "star"]},
    )
    assert cfg.steps == 30
    assert cfg.lr == 1e-3
    assert cfg.neutral == "ring"
    assert cfg.concepts == ["square", "star"]
    assert cfg.prompt_mode == "concat"


def test_dashes_are_underscores():
    cfg = make_config(KPOPConfig, {"prompt-mode": "additive", "batch-size": 4})
    assert cfg.prompt_mode == "additive" and cfg.batch_size == 4


def test_unknown_option_lists_known_ones():
    with pytest.raises(UserError) as err:
        make_config(KPOPConfig, {"steps": 3}, {"stpes": 4})
    message = one_line(err)
    assert "stpes" in message
    for name in ("steps", "neutral", "prompt_mode", "inject", "concepts"):
        assert name in message


@pytest.mark.parametrize(
    "layer",
    [
        {"steps": "10"},
        {"neutral": ["ring"]},
        {"neutral": 3},
        {"concepts": "circle"},
        {"lr": "0.001"},
        {"templates": "a photo of a {}"},
    ],
)
def test_wrong_types(layer):
    with pytest.raises(UserError) as err:
        make_config(KPOPConfig, layer)
    assert list(layer)[0] in one_line(err)


@pytest.mark.parametrize("layer", [{"steps": 2.5}, {"batch_size": 4.0}])
def test_floats_rejected_for_ints(layer):
    # A float reaching an int field would fail later, mid-run, with a TypeError (range, randint).
    with pytest.raises(UserError) as err:
        make_config(KPOPConfig, layer)
    assert list(layer)[0] in one_line(err)


def test_bools_rejected_for_numbers():
    with pytest.raises(UserError):
        make_config(KPOPConfig, {"steps": True})
    with pytest.raises(UserError):
        make_config(KPOPConfig, {"lr": False})


def test_ints_accepted_for_floats():
    cfg = make_config(KPOPConfig, {"lr": 1, "prompt_weight": 0, "guidance": 7})
    assert cfg.lr == 1.0 and isinstance(cfg.lr, float)
    assert cfg.prompt_weight == 0.0 and isinstance(cfg.prompt_weight, float)
    assert cfg.guidance == 7.0 and isinstance(cfg.guidance, float)


@pytest.mark.parametrize(
    "layer",
    [
        {"steps": 0},
        {"steps": -5},
        {"prompt_mode": "x"},
        {"inject": "x"},
        {"trainable": "x"},
        {"templates": ["a photo of a thing"]},
        {"templates": []},
        {"concepts": ["circle", ""]},
        {"concepts": ["  "]},
        {"preserve": [""]},
        {"backend": "x"},
        {"dtype": "float64"},
        {"batch_size": 0},
        {"prompt_length": 0},
        {"negative_guidance": -0.5},
    ],
)
def test_invalid_values(layer):
    with pytest.raises(UserError) as err:
        make_config(KPOPConfig, layer)
    one_line(err)


def test_base_config_validates_too():
    with pytest.raises(UserError):
        make_config(MethodConfig, {"steps": 0})
    assert make_config(MethodConfig, {"concepts": ["circle"]}).concepts == ["circle"]


def test_read_yaml(tmp_path):
    path = tmp_path / "cfg.yaml"
    path.write_text("steps: 12\nconcepts: [circle, ring]\nprompt-mode: additive\n")
    data = read_yaml(path)
    assert data == {"steps": 12, "concepts": ["circle", "ring"], "prompt-mode": "additive"}
    cfg = make_config(KPOPConfig, data, {"steps": 5})
    assert cfg.steps == 5 and cfg.concepts == ["circle", "ring"] and cfg.prompt_mode == "additive"


def test_read_empty_yaml(tmp_path):
    path = tmp_path / "empty.yaml"
    path.write_text("# nothing set\n")
    assert read_yaml(path) == {}


def test_read_malformed_yaml_names_the_line(tmp_path):
    path = tmp_path / "bad.yaml"
    path.write_text("steps: 3\nneutral: ''\na: [1, 2\n")
    with pytest.raises(UserError) as err:
        read_yaml(path)
    message = one_line(err)
    assert "line" in message
    assert str(path) in message


def test_read_malformed_yaml_one_line(tmp_path):
    path = tmp_path / "bad.yaml"
    path.write_text("a: [1, 2")
    with pytest.raises(UserError) as err:
        read_yaml(path)
    assert "line 1" in one_line(err)


def test_read_yaml_list(tmp_path):
    path = tmp_path / "list.yaml"
    path.write_text("- steps\n- 3\n")
    with pytest.raises(UserError) as err:
        read_yaml(path)
    one_line(err)


def test_read_missing_yaml(tmp_path):
    path = tmp_path / "missing.yaml"
    with pytest.raises(UserError) as err:
        read_yaml(path)
    assert str(path) in one_line(err)


def test_unknown_preset():
    with pytest.raises(UserError) as err:
        preset("kpop", "nope")
    message = one_line(err)
    assert "nope" in message and "known" in message
