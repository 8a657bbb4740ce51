"""docs/CONFIGURATION.md is generated from the two schemas: it must be current, and every key a
user can set must carry a description there (a key added without one fails here)."""

import importlib.util
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
spec = importlib.util.spec_from_file_location("docs_generate", REPO / "docs" / "generate.py")
GENERATE = importlib.util.module_from_spec(spec)
spec.loader.exec_module(GENERATE)


def test_configuration_reference_is_current():
    doc = (REPO / "docs" / "CONFIGURATION.md").read_text()
    assert GENERATE.generated()[GENERATE.CONFIG_DOC] == doc, "out of date: run python docs/generate.py"


def test_every_settable_key_has_a_description_and_a_row():
    from ftcl.config import defaults, flatten
    from ftcl.config.schema import schema
    from ftcl.pipeline import schema as pipeline_schema

    doc = (REPO / "docs" / "CONFIGURATION.md").read_text()
    for root in (schema(), pipeline_schema()):
        for key, node in GENERATE.schema_keys(root, root):
            if not node.get("_section"):
                assert node.get("description"), f"schema key {key!r} has no description"
                assert f"| `{key}` |" in doc, f"{key} is missing from docs/CONFIGURATION.md"
    documented = {key for key, _ in GENERATE.schema_keys(schema(), schema())}
    assert set(flatten(defaults())) <= documented  # every default is a documented key


def test_a_key_without_description_is_caught():
    root = {"type": "object", "additionalProperties": False,
            "properties": {"a": {"type": "object", "additionalProperties": False,
                                 "properties": {"b": {"type": "integer", "minimum": 1}}}}}
    keys = dict(GENERATE.schema_keys(root, root))
    assert "a.b" in keys and not keys["a.b"].get("description") and keys["a"]["_section"]
    assert GENERATE._allowed(keys["a.b"]) == "integer, >= 1"
