"""Report figures as PNG bytes (matplotlib's Agg canvas through ``Figure``; no pyplot state).

File names are fixed by the caller; PNG metadata drops matplotlib's version so the bytes depend
only on the data and the matplotlib build.
"""
from __future__ import annotations

import io

import numpy as np
import pandas as pd
from matplotlib.figure import Figure

from harness.metrics import direction
from harness.report.stats import pareto_front
from harness.report.tables import final_values, held_out_split, labelled, ok_rows, strategies

CURVES = ("loss_perc", "loss_gen")
DPI = 110


def png_bytes(fig: Figure) -> bytes:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=DPI, bbox_inches="tight", metadata={"Software": None})
    return buf.getvalue()


def colours(names: list[str]) -> dict[str, str]:
    """A fixed colour per strategy (tab10 in the strategies' report order)."""
    return {s: f"C{i % 10}" for i, s in enumerate(names)}


def train_metric(df: pd.DataFrame, metric: str) -> pd.DataFrame:
    rows = ok_rows(df)
    return rows[(rows["split"] == "train") & (rows["metric"] == metric)]


def acc_vs_fd(df: pd.DataFrame) -> Figure | None:
    """head_acc (↑) against fd_ref (↓), one point per strategy × seed, Pareto front as a line."""
    split = held_out_split(df)
    acc, fd = final_values(df, "head_acc", split), final_values(df, "fd_ref", split)
    pts = pd.concat([acc.rename("acc"), fd.rename("fd")], axis=1, join="inner").dropna().reset_index()
    if pts.empty:
        return None
    fig = Figure(figsize=(5, 4))
    ax = fig.add_subplot()
    col = colours(strategies(df))
    for s, g in pts.groupby("strategy", sort=False):
        ax.scatter(g["fd"], g["acc"], color=col[s], label=s, s=28)
    front = pts[pareto_front(pts[["acc", "fd"]].to_numpy(),
                             [direction("head_acc"), direction("fd_ref")])].sort_values("fd")
    ax.plot(front["fd"], front["acc"], "k--", lw=1, label="Pareto front")
    ax.set(xlabel=f"{labelled('fd_ref')} (reference-feature Fréchet distance)",
           ylabel=labelled("head_acc"),
           title=f"accuracy vs generation quality ({split})")
    ax.legend(fontsize=8)
    return fig


def curve(df: pd.DataFrame, metric: str, ylabel: str | None = None) -> Figure | None:
    """``metric`` against step per strategy: mean over seeds, band from the seeds' min to max."""
    rows = train_metric(df, metric)
    if rows.empty:
        return None
    fig = Figure(figsize=(5.5, 3.5))
    ax = fig.add_subplot()
    col = colours(strategies(df))
    for s in strategies(rows):
        per_step = rows[rows["strategy"] == s].groupby(["step", "sweep", "seed"])["value"].mean()
        stats = per_step.groupby("step").agg(["mean", "min", "max"])
        ax.plot(stats.index, stats["mean"], color=col[s], label=s)
        ax.fill_between(stats.index, stats["min"], stats["max"], color=col[s], alpha=0.15, lw=0)
    ax.set(xlabel="step", ylabel=ylabel or metric, title=f"{metric} (mean over seeds, min–max band)")
    ax.legend(fontsize=8)
    return fig


def cos_hist(df: pd.DataFrame) -> Figure | None:
    """Histogram of the logged cos(g_p, g_g) per strategy on shared bins over [-1, 1]."""
    rows = train_metric(df, "cos")
    if rows.empty:
        return None
    fig = Figure(figsize=(5, 3.5))
    ax = fig.add_subplot()
    col, bins = colours(strategies(df)), np.linspace(-1, 1, 41)
    for s in strategies(rows):
        ax.hist(rows.loc[rows["strategy"] == s, "value"], bins=bins, histtype="stepfilled",
                alpha=0.35, color=col[s], edgecolor=col[s], label=s)
    ax.axvline(0, color="k", lw=0.8)
    ax.set(xlabel="cos(g_p, g_g)  (< 0: conflict)", ylabel="logged steps", title="gradient cosine")
    ax.legend(fontsize=8)
    return fig


def search_landscape(trials: pd.DataFrame, target: str = "head_acc") -> Figure | None:
    """One panel per searched parameter (at most 4): the target against its value, by strategy."""
    params = trials.attrs.get("params", [])[:4]
    if trials.empty or not params or target not in trials:
        return None
    fig = Figure(figsize=(3.6 * len(params), 3.2))
    col = colours(strategies(trials))
    for i, p in enumerate(params):
        ax = fig.add_subplot(1, len(params), i + 1)
        sub = trials[trials[p].notna()]  # trials of other strategies may lack the parameter
        x = pd.to_numeric(sub[p], errors="coerce")
        if x.isna().any():  # categorical: positions by sorted category
            cats = sorted(sub[p].map(str).unique())
            x = sub[p].map(str).map({c: k for k, c in enumerate(cats)})
            ax.set_xticks(range(len(cats)), cats, rotation=30, fontsize=7)
        for s, g in sub.assign(_x=x).groupby("strategy", sort=False):
            ax.scatter(g["_x"], g[target], color=col[s], label=s, s=20)
        ax.set(xlabel=p, ylabel=target if i == 0 else None)
    fig.axes[0].legend(fontsize=7)
    fig.suptitle(f"search landscape: val {labelled(target)}")
    return fig


def all_plots(df: pd.DataFrame, search: dict[str, pd.DataFrame]) -> dict[str, bytes]:
    """File name → PNG bytes for every figure the results support (missing data: no file)."""
    figs = {"acc_vs_fd.png": acc_vs_fd(df),
            **{f"curves_{m}.png": curve(df, m) for m in CURVES},
            "cos_hist.png": cos_hist(df),
            "damping.png": curve(df, "damping", "damping λ applied"),
            "update_change.png": curve(df, "update_change", "‖u − u_sum‖ / ‖u_sum‖"),
            "seg_conflict.png": curve(df, "seg_conflict", "share of tensors with cos < 0"),
            "seg_cos.png": curve(df, "seg_cos_median", "median per-tensor cos(g_p, g_g)"),
            "search_landscape.png": search_landscape(search.get("trials", pd.DataFrame()))}
    return {name: png_bytes(f) for name, f in figs.items() if f is not None}
