"""Results of a pipeline: read.py (run folders / MLflow -> one frame), stats.py (means, paired
intervals, deltas: pure), render.py (CSV / Markdown / LaTeX), plots.py, report.py (report.html),
command.py (``ftcl aggregate``, ``ftcl table``)."""
