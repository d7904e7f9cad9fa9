"""Comparison reports of regular vs deformable runs: statistics over seeds, verdicts, plots."""

from dcn_experiments.report.compare import collect_runs, pair_ratios, render_markdown, write_report

__all__ = ["collect_runs", "pair_ratios", "render_markdown", "write_report"]
