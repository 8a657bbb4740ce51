"""Config resolution and validation: bad input fails at once, naming key, value and what is allowed."""

import pytest

from ftcl import config
from ftcl.config import ConfigError


def test_defaults_are_valid_and_overrides_apply_in_order(tmp_path):
    f = tmp_path / "run.yaml"
    f.write_text("optim:\n  epochs: 7\nft:\n  positive:\n    mode: extrapolate\n")
    cfg = config.resolve(f, ["optim.epochs=3", "ft.positive.alpha=1.5"])
    assert cfg["optim"]["epochs"] == 3
    assert cfg["ft"]["positive"] == {**config.defaults()["ft"]["positive"], "mode": "extrapolate", "alpha": 1.5}


@pytest.mark.parametrize("override,needle", [
    ("ft.positive.alpha=0", "'ft.positive.alpha' has value 0; it must be > 0"),
    ("optim.epochs=-1", "'optim.epochs' has value -1; it must be >= 0"),
    ("data.dataset=mnist", "'data.dataset' has value 'mnist'; allowed: 'fashion-mnist'"),
    ("optim.batch_size=lots", "'optim.batch_size' has value 'lots' of type str; expected integer"),
    ("ft.positive.granularity=pixel", "allowed: 'iteration', 'sample', 'element'"),
    ("ft.negative.mode=extrapolate", "'ft.negative.mode' has value 'extrapolate'; allowed: 'none', 'interpolate'"),
])
def test_bad_values_name_key_value_and_allowed(override, needle):
    with pytest.raises(ConfigError) as err:
        config.resolve(overrides=[override])
    assert needle in str(err.value)


def test_unknown_override_key_suggests_the_right_one():
    with pytest.raises(ConfigError, match=r"unknown key 'ft.positve.mode' \(did you mean 'ft.positive'\?\)"):
        config.resolve(overrides=["ft.positve.mode=extrapolate"])


def test_unknown_key_in_file_is_named(tmp_path):
    f = tmp_path / "bad.yaml"
    f.write_text("optim:\n  epoch: 3\n")
    with pytest.raises(ConfigError, match=r"bad.yaml: unknown key 'optim.epoch' \(did you mean 'epochs'\?\)"):
        config.resolve(f)


def test_malformed_yaml_and_missing_file_name_the_file(tmp_path):
    f = tmp_path / "broken.yaml"
    f.write_text("optim: [unclosed\n")
    with pytest.raises(ConfigError, match="broken.yaml is not valid YAML"):
        config.resolve(f)
    with pytest.raises(ConfigError, match="nope.yaml does not exist"):
        config.resolve(tmp_path / "nope.yaml")
    with pytest.raises(ConfigError, match="must look like key=value"):
        config.resolve(overrides=["optim.epochs"])


def test_flatten_and_dotted_round_trip():
    nested = config.dotted_to_nested({"a.b": 1, "a.c.d": [1, 2], "e": "x"})
    assert nested == {"a": {"b": 1, "c": {"d": [1, 2]}}, "e": "x"}
    assert config.flatten(nested) == {"a.b": 1, "a.c.d": [1, 2], "e": "x"}
