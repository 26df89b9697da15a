"""Method configs: merging option layers, type and value checks, YAML files and presets."""

import dataclasses

import pytest

from fasterase.config import MethodConfig, make_config, preset, read_yaml
from fasterase.errors import UserError
from fasterase.methods.configs import KPOPConfig


def one_line(err: pytest.ExceptionInfo) -> str:
    message = str(err.value)
    assert message and "\n" not in message, message
    return message


def test_defaults():
    cfg = make_config(KPOPConfig)
    assert cfg == KPOPConfig()
    assert cfg.steps == 100 and cfg.inject == "all" and cfg.concepts == []
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
    cfg = make_config(KPOPConfig, {"lr": 1, "prompt_weight": 1, "guidance": 7})
    assert cfg.lr == 1.0 and isinstance(cfg.lr, float)
    assert cfg.prompt_weight == 1.0 and isinstance(cfg.prompt_weight, float)
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


def test_every_packaged_preset_loads():
    from importlib import resources

    from fasterase.methods import CONFIGS

    names = sorted(p.name.removesuffix(".yaml") for p in resources.files("fasterase.presets").iterdir() if p.name.endswith(".yaml"))
    assert {"mace-sd14", "mace-sd14-celebrity", "mace-sd14-art", "mace-sd14-nudity", "uce-sd14"} <= set(names)
    for name in names:
        method, _, preset_name = name.partition("-")
        make_config(CONFIGS[method], preset(method, preset_name), {"concepts": ["circle"]})


def every_config_class():
    from fasterase.methods import CONFIGS

    return list(CONFIGS.values())


def test_redeclared_options_keep_their_range():
    """A method that declares an option again (for its own default) gives its range again."""
    for config_class in every_config_class():
        for f in dataclasses.fields(config_class):
            for base in config_class.__mro__[1:]:
                inherited = {g.name: g for g in dataclasses.fields(base)} if dataclasses.is_dataclass(base) else {}
                if f.name in inherited:
                    assert f.metadata == {**inherited[f.name].metadata, "help": f.metadata["help"]}, (config_class.__name__, f.name)


@pytest.mark.parametrize("template", ["a {} and a {}", "a {name}", "a {0}", "a {", "a }{"])
def test_templates_hold_exactly_one_field(template):
    with pytest.raises(UserError, match="must contain exactly one") as err:
        make_config(KPOPConfig, {"templates": [template]})
    one_line(err)


def bad_values(f: dataclasses.Field):
    """Values of the wrong type, sign or finiteness for the option `f`."""
    from hypothesis import strategies as st

    expected = f.default if f.default is not dataclasses.MISSING else f.default_factory()
    wrong_type = st.one_of(st.text(max_size=5), st.lists(st.integers(), min_size=1, max_size=2), st.none(), st.dictionaries(st.text(max_size=2), st.integers(), max_size=1))
    if isinstance(expected, bool):
        return st.one_of(wrong_type, st.integers(), st.floats())
    if isinstance(expected, (int, float)):
        low = f.metadata["at_least"]
        below = st.floats(max_value=low, exclude_max=not f.metadata["positive"], allow_nan=False) if isinstance(expected, float) else st.integers(max_value=int(low) - 1)
        strategies = [wrong_type, st.booleans(), below, st.sampled_from([float("nan"), float("inf"), float("-inf")])]
        if isinstance(expected, int):
            strategies += [st.floats(), st.integers(min_value=2**31)]  # a float is no int; past INT_LIMIT
        return st.one_of(*strategies)
    if isinstance(expected, list):
        return st.one_of(st.text(max_size=5), st.lists(st.one_of(st.integers(), st.none()), min_size=1, max_size=2), st.integers())
    return st.one_of(st.integers(), st.floats(), st.lists(st.text(max_size=2), max_size=2), st.none())


def test_every_bad_option_value_is_refused_in_one_line(monkeypatch):
    """A property over every option of every method: a value of the wrong type, sign or
    finiteness is a one-line UserError from the config layer alone, before any model loads."""
    from hypothesis import given, settings
    from hypothesis import strategies as st

    import fasterase.models.loading

    monkeypatch.setattr(fasterase.models.loading, "load_pipeline", lambda *a, **k: pytest.fail("a model was loaded"))
    fields = [(c, f) for c in every_config_class() for f in dataclasses.fields(c)]

    @settings(max_examples=400, deadline=None, derandomize=True)
    @given(st.sampled_from(fields).flatmap(lambda cf: st.tuples(st.just(cf), bad_values(cf[1]))))
    def check(case):
        (config_class, f), value = case
        with pytest.raises(UserError) as err:
            make_config(config_class, {"concepts": ["circle"], f.name: value})
        one_line(err)

    check()
