"""Reports of a sweep: runs.py loads the runs, plots.py draws the figures, report.py fits, compares and
writes report.md + report.html; `lmu-jax report` (commands.py)."""
