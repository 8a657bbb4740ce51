"""Regenerate the generated parts of docs/ from their sources of truth.

    python docs/generate.py           # rewrite them
    python docs/generate.py --check   # exit 1 (naming the file) when one is out of date

- docs/PROTOCOLS.md: the protocol tables, from docs/protocols.yaml (between the ``protocols`` markers).
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


def generated() -> dict[Path, str]:
    """Every generated file with the text it should hold."""
    doc = PROTOCOLS_DOC.read_text()
    return {PROTOCOLS_DOC: replace_generated(doc, "docs/protocols.yaml", protocol_tables(load_protocols()))}


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
