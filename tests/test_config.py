"""Config resolution and validation: bad input fails at once, naming key, value and what is allowed."""

import dataclasses
import typing

import pytest

from ftcl import config
from ftcl.config import ConfigError


def test_defaults_are_valid_and_overrides_apply_in_order(tmp_path):
    f = tmp_path / "run.yaml"
    f.write_text("optim:\n  epochs: 7\nft:\n  positive:\n    mode: extrapolate\n")
    cfg = config.resolve(f, ["optim.epochs=3", "ft.positive.alpha=1.5"])
    assert cfg.optim.epochs == 3
    assert config.to_dict(cfg.ft.positive) == {**config.defaults()["ft"]["positive"], "mode": "extrapolate",
                                               "alpha": 1.5}


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


def _schema_fields(node: dict, root: dict) -> dict[str, dict]:
    from ftcl.config.schema import properties

    return properties(node, root) or {}


def _check_agrees(cls, node: dict, root: dict, path: str) -> None:
    fields = {f.name: f for f in dataclasses.fields(cls)}
    props = _schema_fields(node, root)
    assert set(fields) == set(props), f"{path or 'run config'}: dataclass {cls.__name__} {sorted(fields)} vs schema " \
                                      f"{sorted(props)}"
    hints = typing.get_type_hints(cls)
    for name, sub in props.items():
        if dataclasses.is_dataclass(hints[name]):
            _check_agrees(hints[name], sub, root, f"{path}{name}.")


def test_the_typed_config_has_the_schemas_keys_one_class_per_object():
    """ftcl/config/types.py and the JSON schema describe the same keys (one list, checked)."""
    root = config.schema()
    _check_agrees(config.RunConfig, root, root, "")


def test_resolve_gives_a_frozen_typed_config_that_round_trips():
    cfg = config.resolve(overrides={"optim.milestones": [3, 5], "optim.lr_per_256": 1})
    assert cfg.optim.milestones == (3, 5) and isinstance(cfg.optim.lr_per_256, float)
    with pytest.raises(dataclasses.FrozenInstanceError):
        cfg.optim.epochs = 3  # type: ignore[misc]
    assert config.from_dict(config.RunConfig, config.to_dict(cfg)) == cfg
    assert config.replace(cfg, {"seed": 4}).seed == 4 and cfg.seed == 0


def test_cross_key_rules_are_checked_when_the_config_is_resolved_for_the_planned_processes():
    config.resolve(overrides={"optim.batch_size": 96})  # 96 / 8 sub-batches in one process
    with pytest.raises(ConfigError, match=r"'optim.batch_size' is 96.*5 processes"):
        config.resolve(overrides={"optim.batch_size": 96}, world=5)
    with pytest.raises(ConfigError, match="supervised"):
        config.resolve(overrides={"method.name": "supervised", "fa.enabled": True})
    # the detection rules only where detection runs
    fpn = {"detection.head": "fpn", "detection.anchor_sizes": [32]}
    config.resolve(overrides=fpn, stages=("pretrain",))
    with pytest.raises(ConfigError, match="detection.anchor_sizes"):
        config.resolve(overrides=fpn)


def test_the_key_shuffling_methods_rule_agrees_with_the_methods():
    from ftcl.config.rules import KEY_SHUFFLING_METHODS
    from ftcl.methods.byol import BYOL
    from ftcl.methods.moco import MoCo
    from ftcl.methods.simsiam import SimSiam
    from ftcl.methods.supervised import Supervised

    classes = {"moco": MoCo, "byol": BYOL, "simsiam": SimSiam, "supervised": Supervised}
    assert set(classes) == set(config.schema()["properties"]["method"]["properties"]["name"]["enum"])
    assert set(KEY_SHUFFLING_METHODS) == {name for name, cls in classes.items() if cls.shuffles_keys}


def test_a_resolved_file_is_read_back_only_while_its_digest_matches(tmp_path):
    cfg = config.resolve(overrides={"optim.epochs": 3})
    path = config.resolved.write(cfg, tmp_path / "pretrain.yaml", world=1)
    assert config.resolved.read(path) == (cfg, 1)
    assert config.resolve(path) == cfg  # also a plain config file for ftcl pretrain --config
    path.write_text(path.read_text().replace("epochs: 3", "epochs: 4"))
    with pytest.raises(ConfigError, match="changed after it was resolved"):
        config.resolved.read(path)
    (tmp_path / "plain.yaml").write_text("optim:\n  epochs: 3\n")
    with pytest.raises(ConfigError, match="not a resolved run config"):
        config.resolved.read(tmp_path / "plain.yaml")
