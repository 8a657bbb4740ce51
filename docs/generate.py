"""Regenerate the generated parts of docs/ from their sources of truth.

    python docs/generate.py           # rewrite them
    python docs/generate.py --check   # exit 1 (naming the file) when one is out of date

- docs/PROTOCOLS.md: the protocol tables, from docs/protocols.yaml (between the ``protocols`` markers).
- docs/CONFIGURATION.md: every key of the pipeline config and of the run config, from the two schemas'
  descriptions, types, bounds and defaults (``ftcl/resources/{pipeline,config}.schema.yaml``,
  ``ftcl/resources/defaults.yaml``) and the stages each run-config key reruns (``x-stages``).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import yaml

DOCS = Path(__file__).resolve().parent
PROTOCOLS_DATA = DOCS / "protocols.yaml"
PROTOCOLS_DOC = DOCS / "PROTOCOLS.md"
BEGIN, END = "<!-- generated from {} by docs/generate.py: edit that file -->", "<!-- end of generated part -->"


SETTING_KEYS = {"setting", "reference", "text", "source", "rows", "key", "ftcl", "difference"}
REQUIRED_KEYS = {"setting", "reference", "source", "rows", "key"}


def load_protocols(path: Path = PROTOCOLS_DATA) -> dict:
    """docs/protocols.yaml, each setting checked for its fields (a stray one is usually an unquoted
    comma in a flow mapping)."""
    data = yaml.safe_load(path.read_text())
    for section in data["sections"]:
        for s in section["settings"]:
            extra, missing = set(s) - SETTING_KEYS, REQUIRED_KEYS - set(s)
            if extra or missing:
                raise ValueError(f"{path}: setting {s.get('setting')!r} of {section['title']!r} has unknown fields "
                                 f"{sorted(extra)} / lacks {sorted(missing)}; quote texts that hold commas")
    return data


def _value(value: object) -> str:
    if isinstance(value, dict | list):
        return yaml.safe_dump(value, default_flow_style=True, width=10_000).strip()
    return yaml.safe_dump(value).strip().removesuffix("\n...").strip()


def _rows(rows: object) -> str:
    if rows == "all":
        return "all"
    if rows == "baseline":
        return "baseline"
    return ", ".join(str(r) for r in rows)


def _cell(text: str) -> str:
    return str(text).replace("|", "\\|").replace("\n", " ")


def protocol_tables(data: dict) -> str:
    """The Markdown of every section of ``data`` (docs/protocols.yaml): title, intro, configs, table."""
    out = []
    for section in data["sections"]:
        out += [f"## {section['title']}", ""]
        if section.get("intro"):
            out += [section["intro"].strip(), ""]
        out += ["Applies to: " + ", ".join(f"`{c}`" for c in section["configs"]), ""]
        out += ["| setting | reference (source) | rows | key | ftcl value | difference |", "|---|---|---|---|---|---|"]
        for s in section["settings"]:
            reference = s.get("text") or _value(s["reference"])
            ftcl = s["ftcl"] if "ftcl" in s else s["reference"]
            cells = [s["setting"], f"{reference} ({s['source']})", _rows(s["rows"]), s.get("key") or "",
                     f"`{_value(ftcl)}`", s.get("difference") or "-"]
            out.append("| " + " | ".join(_cell(c) for c in cells) + " |")
        out.append("")
    return "\n".join(out)


def replace_generated(doc: str, source: str, body: str) -> str:
    """``doc`` with the text between the markers of ``source`` replaced by ``body``."""
    begin = BEGIN.format(source)
    head, found, rest = doc.partition(begin)
    if not found or END not in rest:
        raise SystemExit(f"markers for {source} not found in the document: add '{begin}' and '{END}'")
    return f"{head}{begin}\n\n{body.strip()}\n\n{END}{rest.partition(END)[2]}"


CONFIG_DOC = DOCS / "CONFIGURATION.md"
_BOUNDS = (("minimum", ">= {}"), ("exclusiveMinimum", "> {}"), ("maximum", "<= {}"), ("exclusiveMaximum", "< {}"))


def _allowed(node: dict) -> str:
    """What a schema node accepts, in words: its enum, or its types with their bounds."""
    if "enum" in node:
        return " | ".join(f"`{_value(v)}`" for v in node["enum"])
    types = node.get("type", "")
    text = " or ".join(types) if isinstance(types, list) else str(types)
    if types == "array" or "array" in types:
        items = node.get("items") if isinstance(node.get("items"), dict) else {}
        inner = _allowed(items) if items else ""
        size = (f"{node['minItems']}" if node.get("minItems") == node.get("maxItems") and "minItems" in node
                else "")
        text = text.replace("array", f"list{' of ' + size if size else ''}{' (' + inner + ')' if inner else ''}")
    bounds = [fmt.format(node[k]) for k, fmt in _BOUNDS if k in node]
    return text + (f", {', '.join(bounds)}" if bounds else "")


def schema_keys(root: dict, node: dict, prefix: str = "") -> list[tuple[str, dict]]:
    """``(dotted key, merged schema node)`` of every leaf under ``node`` (``$ref`` and ``allOf`` followed;
    objects with free-form keys, e.g. tags, are leaves), in the schema's order."""
    from ftcl.config.schema import merged_node, properties

    out = []
    for key, raw in (properties(node, root) or {}).items():
        sub, name = merged_node(raw, root), f"{prefix}{key}"
        items = sub.get("items") if isinstance(sub.get("items"), dict) else {}
        if properties(raw, root) and sub.get("additionalProperties") is False:
            out.append((name, {**sub, "_section": True}))
            out += schema_keys(root, raw, f"{name}.")
        elif properties(items, root):  # a list of objects (the ablation rows)
            out.append((name, sub))
            out += schema_keys(root, items, f"{name}[].")
        else:
            out.append((name, sub))
    return out


def config_reference() -> str:
    """docs/CONFIGURATION.md's generated part: one table per top-level section of each schema."""
    from ftcl.config import defaults, flatten
    from ftcl.config.schema import schema, stages_of
    from ftcl.pipeline import schema as pipeline_schema

    run_defaults = flatten(defaults())
    out = ["## The pipeline config", "",
           "The file given to `snakemake --configfile` (default `config/config.yaml`).", ""]
    pipe = pipeline_schema()
    out += ["| key | accepted | default | description |", "|---|---|---|---|"]
    for key, node in schema_keys(pipe, pipe):
        if node.get("_section"):
            continue
        default = f"`{_value(node['default'])}`" if "default" in node else ""
        out.append("| " + " | ".join(_cell(c) for c in (f"`{key}`", _allowed(node), default,
                                                           node.get("description", ""))) + " |")
    run = schema()
    out += ["", "## The run config", "",
            "What `defaults` and each row's `overrides` set, and what `ftcl pretrain --config` reads. "
            "*Reruns*: the pipeline stages whose results depend on the key; changing it reruns them "
            "(and what reads their results) and nothing else.", ""]
    current = None
    for key, node in schema_keys(run, run):
        top = key.split(".")[0]
        if top != current:
            current = top
            section = run["properties"][top]
            out += ["", f"### `{top}`", ""]
            if section.get("description") and node.get("_section"):
                out += [section["description"], ""]
            out += ["| key | accepted | default | reruns | description |", "|---|---|---|---|---|"]
        if node.get("_section"):
            continue
        default = f"`{_value(run_defaults[key])}`" if key in run_defaults else ""
        reruns = ", ".join(stages_of(key)) or "nothing"
        out.append("| " + " | ".join(_cell(c) for c in (f"`{key}`", _allowed(node), default, reruns,
                                                           node.get("description", ""))) + " |")
    return "\n".join(out) + "\n"


def generated() -> dict[Path, str]:
    """Every generated file with the text it should hold."""
    doc = PROTOCOLS_DOC.read_text()
    config_doc = CONFIG_DOC.read_text()
    return {PROTOCOLS_DOC: replace_generated(doc, "docs/protocols.yaml", protocol_tables(load_protocols())),
            CONFIG_DOC: replace_generated(config_doc, "ftcl/resources/*.schema.yaml", config_reference())}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--check", action="store_true", help="only check that the generated parts are current")
    args = parser.parse_args(argv)
    stale = [path for path, text in generated().items() if path.read_text() != text]
    if args.check:
        for path in stale:
            print(f"{path} is out of date: run python docs/generate.py", file=sys.stderr)
        return 1 if stale else 0
    for path, text in generated().items():
        path.write_text(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
