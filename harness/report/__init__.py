"""``genrep-bench report``: pure functions from results tables to tables, plots and files.

- ``load(paths)``: one or several sweeps' results with a ``sweep`` column.
- ``main_table`` / ``format_table``: means ± 95% t CI over seeds, paired Δ vs ``sum``, cost.
- ``conflict_table``: conflict fraction, cos mean/median, damping applied.
- ``search_table``: trials, best configuration, Pareto front, importance proxy.
- ``prereg`` / ``paper``: with a pre-registration in the results (the sweep's ``preregistration``
  section): the pre-registered comparisons (paired Δ, p, Holm over the family's triples, MDE at α
  and α/m, TOST, verdict), the controls (and a banner when one failed), the held-out curves' mean
  level, and the paper-shaped ablation tables.
- ``build_report(results_dirs, out_dir)``: report.md, report.html, CSVs and PNGs.
"""
from harness.report.build import build_report
from harness.report.search import search_table
from harness.power import t_quantile
from harness.report.stats import mean_ci, paired_delta, pareto_front
from harness.report.tables import conflict_table, format_table, load, main_table

__all__ = ["build_report", "conflict_table", "format_table", "load", "main_table", "mean_ci",
           "paired_delta", "pareto_front", "search_table", "t_quantile"]
