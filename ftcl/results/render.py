"""Rendering the tables of :mod:`ftcl.results.stats` for people: CSV (every number), Markdown and
LaTeX (``mean ± std`` and ``Δ [95 % interval]`` cells, a ``*`` where the interval excludes 0).
``report.html`` uses the same display tables (:mod:`ftcl.results.report`)."""

from __future__ import annotations

import math
import re
from collections.abc import Iterable, Sequence
from pathlib import Path

import pandas as pd
from tabulate import tabulate

from ftcl.results.read import STAGE_METRICS
from ftcl.results.stats import NONE, WELCH

#: the metrics of the ablation table, in column order (displays leave out those without values)
TABLE_METRICS: tuple[str, ...] = ("linear_top1", "knn_top1", "det_voc07_AP50", "det_voc07_AP", "det_coco_AP",
                                  "det_coco_AP50")
#: the metrics compared with the floor row (random init)
FLOOR_METRICS: tuple[str, ...] = ("linear_top1", "knn_top1", "det_voc07_AP50", "det_coco_AP")
METRIC_LABELS: dict[str, str] = {
    "linear_top1": "Linear top-1 (%)",
    "linear_top5": "Linear top-5 (%)",
    "linear_top1_last": "Linear top-1, last epoch (%)",
    "linear_top1_best": "Linear top-1, best epoch (%)",
    "knn_top1": "kNN top-1 (%)",
    "knn_top5": "kNN top-5 (%)",
    "det_voc07_AP50": "VOC07 AP50",
    "det_voc07_AP": "VOC07 AP",
    "det_voc07_AP75": "VOC07 AP75",
    "det_coco_AP": "COCO AP",
    "det_coco_AP50": "COCO AP50",
    "det_coco_AP75": "COCO AP75",
}
SHORT_LABELS: dict[str, str] = {m: label.removesuffix(" (%)").removesuffix(" top-1") for m, label in
                                METRIC_LABELS.items()}
MARK = "*"
#: the epoch a linear protocol reports (``eval.linear.report``), as its summary names it
_LINEAR_REPORT = re.compile(r"linear: [^;|]*\breport=(\w+)")
TEXT_COLUMNS = frozenset({"Row", "Group", "Metric", "Protocol", "vs", "Δ vs"})  # left-aligned


def number(value: float, digits: int, signed: bool = False) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "–"
    return f"{value:+.{digits}f}" if signed else f"{value:.{digits}f}"


def mean_std(mean: float, std: float, n: int, n_seeds: int, digits: int, latex: bool = False) -> str:
    if math.isnan(mean):
        return "–"
    text = f"{mean:.{digits}f}"
    if not math.isnan(std):
        text = f"${text} \\pm {std:.{digits}f}$" if latex else f"{text} ± {std:.{digits}f}"
    if n < n_seeds:
        text += f" ({n}/{n_seeds} seeds)"
    return text


def delta_cell(delta: float, low: float, high: float, method: str, excludes_zero: bool, digits: int) -> str:
    """``+1.23 [+0.40, +2.06] *``; ``(Welch)`` for unpaired seeds, ``(n<2)`` without an interval."""
    if math.isnan(delta):
        return "–"
    if method == NONE or math.isnan(low):
        return f"{number(delta, digits, True)} (n<2)"
    text = f"{number(delta, digits, True)} [{number(low, digits, True)}, {number(high, digits, True)}]"
    if method == WELCH:
        text += " (Welch)"
    return text + (f" {MARK}" if excludes_zero else "")


def linear_report(protocols: Iterable[str]) -> str | None:
    """``"best"`` or ``"last"`` when every linear protocol among ``protocols`` (rows' protocol
    summaries) reports the same epoch, else None (the protocol column or note then says it per row)."""
    reports = {m for text in protocols if text for m in _LINEAR_REPORT.findall(text)}
    return reports.pop() if len(reports) == 1 else None


def metric_label(metric: str, protocols: Iterable[str] = ()) -> str:
    """A metric's column label; the linear probe's names the epoch it reports (``Linear top-1, best
    epoch (%)``) when all rows agree on it."""
    label = METRIC_LABELS.get(metric, metric)
    which = linear_report(protocols) if metric in ("linear_top1", "linear_top5") else None
    return label.replace(" (%)", f", {which} epoch (%)") if which else label


def present_metrics(table: pd.DataFrame, metrics: Sequence[str] = TABLE_METRICS) -> list[str]:
    """The metrics with at least one value in the ablation table (the others are left out of displays)."""
    return [m for m in metrics if f"{m}_mean" in table and table[f"{m}_mean"].notna().any()]


_STAGE_SPLIT = re.compile("; (?=(?:" + "|".join(STAGE_METRICS) + "): )")


def shared_protocol(table: pd.DataFrame) -> str | None:
    """The protocol summary when no two rows disagree on a stage's protocol, else None.

    A row without a stage (e.g. no detection yet) does not disagree with the others.
    """
    by_stage: dict[str, set[str]] = {}
    for text in table["protocol"]:
        for part in _STAGE_SPLIT.split(text) if text else []:
            stage, _, summary = part.partition(": ")
            by_stage.setdefault(stage, set()).add(summary)
    if any(len(summaries) > 1 for summaries in by_stage.values()):
        return None
    return "; ".join(f"{stage}: {summaries.pop()}" for stage, summaries in by_stage.items()) or None


def _other_references(table: pd.DataFrame) -> bool:
    """Whether some row's deltas refer to a row other than the baseline (``compare_to``)."""
    baseline = table.attrs.get("baseline")
    return any(not pd.isna(ref) and ref != baseline for ref in table["reference"])


def display_ablation(table: pd.DataFrame, digits: int = 2, latex: bool = False) -> pd.DataFrame:
    """The ablation table as strings: ``mean ± std`` and ``Δ [interval]`` cells per metric.

    Metrics with no value at all are left out; a ``Group`` column appears when rows come from grids;
    the protocol column is kept only when rows differ (else :func:`table_notes` states it once).
    """
    baseline = table.attrs.get("baseline")
    metrics = present_metrics(table)
    shown = pd.DataFrame({"Row": table["row"]})
    if (table["group"] != table["row"]).any():
        shown["Group"] = table["group"]
    shown["Seeds"] = table["n_seeds"].astype(str)
    has_deltas = table["reference"].notna().any()
    if _other_references(table):
        shown["Δ vs"] = ["" if r["row"] == baseline else ("–" if pd.isna(r["reference"]) else r["reference"])
                         for _, r in table.iterrows()]
    for m in metrics:
        shown[metric_label(m, table["protocol"])] = [
            mean_std(r[f"{m}_mean"], r[f"{m}_std"], r[f"{m}_n"], r["n_seeds"], digits, latex)
            for _, r in table.iterrows()]
        if has_deltas:
            shown[f"Δ {SHORT_LABELS[m]} [95% CI]"] = [
                "reference" if pd.isna(r["reference"]) else delta_cell(
                    r[f"{m}_delta"], r[f"{m}_delta_low"], r[f"{m}_delta_high"], r[f"{m}_delta_method"],
                    bool(r[f"{m}_delta_excludes_zero"]), digits)
                for _, r in table.iterrows()
            ]
    if shared_protocol(table) is None:
        shown["Protocol"] = table["protocol"]
    return shown


def table_notes(table: pd.DataFrame) -> list[str]:
    """One-line notes printed under the ablation table (the smoke note first when the table is a smoke
    run's, :func:`write_tables`; what ± and Δ mean, the shared protocol)."""
    confidence = table.attrs.get("confidence", 0.95)
    notes = [table.attrs["smoke"]] if table.attrs.get("smoke") else []
    notes.append("mean ± sample std (ddof=1) over seeds")
    baseline = table.attrs.get("baseline")
    if table["reference"].notna().any():
        against = ("the row in column 'Δ vs'" + (f" (default: the baseline row {baseline})" if baseline else "")
                   if _other_references(table) else f"the baseline row {baseline}")
        notes.append(
            f"Δ: difference to {against}, paired by seed (mean of the per-seed differences) with its "
            f"{confidence:.0%} Student t interval [low, high]; {MARK}: the interval excludes 0. A Δ without {MARK} "
            "is within seed-to-seed noise. (Welch): the rows share fewer than 2 seeds, Welch's interval on "
            "the means; (n<2): too few seeds for an interval")
    protocol = shared_protocol(table)
    if protocol:
        notes.append(f"protocol: {protocol}")
    return notes


def display_paper(paper: pd.DataFrame, digits: int = 2, latex: bool = False,
                  protocols: Iterable[str] = ()) -> pd.DataFrame:
    """The paper comparison as strings: ours (mean ± std), published, difference; ``protocols``: the
    rows' protocol summaries (the linear probe's label names the epoch they report)."""
    protocols = list(protocols)
    return pd.DataFrame({
        "Row": paper["row"],
        "Metric": [metric_label(m, protocols) for m in paper["metric"]],
        "Ours": [mean_std(r["ours_mean"], r["ours_std"], r["n_seeds"], r["n_seeds"], digits, latex)
                 for _, r in paper.iterrows()],
        "Seeds": paper["n_seeds"].astype(str),
        "Published": [number(v, digits) for v in paper["published"]],
        "Ours − published": [number(v, digits, signed=True) for v in paper["difference"]],
    })


def display_against(lines: pd.DataFrame, digits: int = 2) -> pd.DataFrame:
    """The comparison with one reference row (the floor) as strings: one line per row, a
    ``Δ [interval]`` column per metric."""
    rows = list(dict.fromkeys(lines["row"]))
    shown = pd.DataFrame({"Row": rows})
    for metric in dict.fromkeys(lines["metric"]):
        part = lines[lines["metric"] == metric].set_index("row")
        shown[f"Δ {SHORT_LABELS.get(metric, metric)} [95% CI]"] = [
            delta_cell(part.loc[r, "delta"], part.loc[r, "low"], part.loc[r, "high"], part.loc[r, "method"],
                       bool(part.loc[r, "excludes_zero"]), digits) if r in part.index else "–"
            for r in rows
        ]
    return shown


def to_markdown(shown: pd.DataFrame, notes: Sequence[str] = ()) -> str:
    align = ["left" if col in TEXT_COLUMNS else "right" for col in shown.columns]
    text = tabulate(shown, headers="keys", tablefmt="pipe", showindex=False, disable_numparse=True,
                    colalign=align)
    return text + "".join(f"\n\n{note}" if i == 0 else f"\n{note}" for i, note in enumerate(notes)) + "\n"


_LATEX_ESCAPES = {
    "\\": r"\textbackslash{}", "&": r"\&", "%": r"\%", "$": r"\$", "#": r"\#", "_": r"\_",
    "{": r"\{", "}": r"\}", "~": r"\textasciitilde{}", "^": r"\textasciicircum{}",
    "Δ": r"$\Delta$", "±": r"$\pm$", "–": "--", "−": "$-$",
}


def latex_escape(text: str) -> str:
    return "".join(_LATEX_ESCAPES.get(ch, ch) for ch in str(text))


def to_latex(shown: pd.DataFrame, notes: Sequence[str] = (), math_columns: Iterable[str] = ()) -> str:
    """A booktabs ``tabular`` (needs ``\\usepackage{booktabs}``), to ``\\input`` inside a table float.

    Cells of ``math_columns`` already hold LaTeX (``$m \\pm s$``) and are not escaped.
    """
    math_columns = set(math_columns)
    align = "".join("l" if col in TEXT_COLUMNS else "r" for col in shown.columns)
    lines = [f"% {latex_escape(note)}" for note in notes]
    lines += [f"\\begin{{tabular}}{{{align}}}", r"\toprule"]
    lines.append(" & ".join(latex_escape(col) for col in shown.columns) + r" \\")
    lines.append(r"\midrule")
    for _, r in shown.iterrows():
        cells = [
            str(r[col]).replace(" (", r" \,(", 1) if col in math_columns and str(r[col]).startswith("$")
            else latex_escape(r[col])
            for col in shown.columns
        ]
        lines.append(" & ".join(cells) + r" \\")
    lines += [r"\bottomrule", r"\end{tabular}"]
    return "\n".join(lines) + "\n"


def smoke_note(tables_dir: str | Path) -> str | None:
    """The smoke note of the experiment whose ``tables/`` is ``tables_dir``: from the pipeline config
    aggregation reads beside it (``<experiment>/pipeline.yaml``), None when that is not a smoke config."""
    import yaml

    from ftcl.pipeline import smoke

    path = Path(tables_dir).parent / "pipeline.yaml"
    try:
        cfg = yaml.safe_load(path.read_text()) if path.is_file() else None
    except (OSError, yaml.YAMLError):
        return None
    return smoke.note(cfg) if isinstance(cfg, dict) else None


def write_tables(table: pd.DataFrame, paper: pd.DataFrame | None, floor: pd.DataFrame | None,
                 tables_dir: str | Path, digits: int = 2, note: str | None = None) -> list[Path]:
    """Write ``ablation.{csv,md,tex}``, and ``paper.*`` / ``floor.*`` when they have lines. The CSV
    files keep every number (means, stds, intervals, the interval method).

    ``note`` (default: :func:`smoke_note`, a smoke run's "Smoke run of ...: amounts shrunk, not
    results") is the first line of every Markdown table and a LaTeX comment atop every ``.tex``; the CSV
    files stay plain data. It is also kept in ``table.attrs["smoke"]``, so :func:`table_notes` (the
    printed table, report.html) starts with it."""
    tables_dir = Path(tables_dir)
    tables_dir.mkdir(parents=True, exist_ok=True)
    note = note if note is not None else smoke_note(tables_dir)
    if note:
        table.attrs["smoke"] = note
    notes = [n for n in table_notes(table) if n != note]
    tex_math = [metric_label(m, table["protocol"]) for m in present_metrics(table)]
    outputs = {
        "ablation.csv": table.to_csv(index=False, float_format="%.4f"),
        "ablation.md": to_markdown(display_ablation(table, digits), notes),
        "ablation.tex": to_latex(display_ablation(table, digits, latex=True), notes, tex_math),
    }
    if paper is not None and len(paper):
        outputs |= {
            "paper.csv": paper.to_csv(index=False, float_format="%.4f"),
            "paper.md": to_markdown(display_paper(paper, digits, protocols=table["protocol"])),
            "paper.tex": to_latex(display_paper(paper, digits, latex=True, protocols=table["protocol"]), (), ["Ours"]),
        }
    if floor is not None and len(floor):
        floor_notes = floor_table_notes(floor)
        outputs |= {
            "floor.csv": floor.to_csv(index=False, float_format="%.4f"),
            "floor.md": to_markdown(display_against(floor, digits), floor_notes),
            "floor.tex": to_latex(display_against(floor, digits), floor_notes),
        }
    written = []
    for name, text in outputs.items():
        if note and name.endswith(".md"):
            text = f"{note}\n\n{text}"
        elif note and name.endswith(".tex"):
            text = f"% {latex_escape(note)}\n{text}"
        path = tables_dir / name
        path.write_text(text)
        written.append(path)
    return written


def floor_table_notes(floor: pd.DataFrame) -> list[str]:
    reference = floor["reference"].iloc[0] if len(floor) else "?"
    return [f"Δ: difference to the floor row {reference} (a randomly initialised backbone, evaluated the same "
            f"way), paired by seed, with its 95% Student t interval; {MARK}: the interval excludes 0, i.e. the "
            "row learned something a random backbone does not have"]
