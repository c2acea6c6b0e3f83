"""``build_report``: results directories → report.md, report.html (self-contained), CSVs, PNGs.

The report is a list of sections (headings, paragraphs, tables, figures) rendered twice: as
Markdown with relative image links and as HTML with the images inlined as base64 data URIs.
Every file is written atomically (``harness.atomic``: temp file, fsync, os.replace).
"""
from __future__ import annotations

import base64
import html
import json
import math
from pathlib import Path
from typing import Any, Iterable

import pandas as pd

from harness import atomic
from harness.report import paper, prereg
from harness.report.plots import all_plots
from harness.report.search import PARETO, search_table
from harness.report.tables import (conflict_table, teacher_table, format_table, held_out_split, load, main_table,
                                   robust_labels, robustness_table, strategies)

FOOTNOTE = "fd_ref: Fréchet distance in the reference classifier's feature space, not FID"
CI_NOTE = ("mean ± 95% Student-t half-width over seeds, t_{0.975,n−1}·s/√n; n = seeds "
           "(a seed of each sweep counts once; several trials of one seed are averaged first); "
           "↑/↓ = direction; best per column in bold.")
DELTA_NOTE = ("paired difference against the baseline on the same seeds (strategy − {b}), "
              "mean ± 95% t half-width of the per-seed differences.")
IMPORTANCE_NOTE = ("importance is a correlation proxy (|Spearman ρ| or correlation ratio η with "
                   "val head_acc), not optuna's fANOVA: the results table keeps no study.")
MAX_TRIAL_ROWS = 50


CONFLICT_NOTE = ("update_change = ‖u − u_ref‖/‖u_ref‖: how far the strategy moved the update from "
                 "the plain sum with the same task weights, on the same gradients (0: it did "
                 "nothing; _mean over logged rows, _max the mean over seeds of each run's largest "
                 "logged value); a strategy that does not act cannot be told apart from summing. "
                 "cos, conflict and norm_ratio are the whole shared vector's. seg_*: per parameter "
                 "tensor, over the tensors both tasks reach (seg_shared: their share of all "
                 "tensors), means over logged rows of each step's share of tensors in conflict "
                 "(seg_conflict), 10th/50th/90th percentile of the per-tensor cos and median "
                 "per-tensor ‖g_p‖/‖g_g‖: conflict hidden in the whole vector's near-zero cos "
                 "shows here. Every arm that takes task gradients logs them, whatever its "
                 "granularity.")
ROBUST_NOTE = ("Head top-1 on the held-out images noised by q(x_t|x): x_t = √ᾱ_t·x + √(1−ᾱ_t)·ε, one "
               "fixed ε for every trial, arm and t, σ = √(1−ᾱ_t) in each column's name (eval.robust_t). "
               "The paper's test, in its latent space: top-1 51.1 → 37.2 from t = 0 to 50 for GenRep, "
               "40.3 → 4.6 for a Swin Transformer; in our pixel space t = 50 is σ ≈ 0.09, so the three "
               "t span about 0.1 to 0.5. The head reads x_t as it reads a clean image (at its own t_p, "
               "null label). Secondary metrics: no registered comparison; mean ± 95% t half-width over "
               "seeds, best per column in bold.")
TEACHER_NOTE = ("The zero-shot diffusion classifier's posterior, as the training teacher computes it "
                "(same estimator, τ fitted on val images when mc.tau is auto), on the held-out "
                "images: top-1 = mc_acc; NLL against log C (a uniform teacher) says whether it is "
                "a Bayes posterior or label smoothing.")


def write_atomic(path: Path, data: bytes | str) -> Path:
    """Text (UTF-8) or bytes, written atomically by ``harness.atomic``: never half a file."""
    return atomic.write_bytes(path, data.encode() if isinstance(data, str) else data)


def cell(v: Any) -> str:
    if isinstance(v, float):
        return "—" if math.isnan(v) else f"{v:.4g}"
    return "—" if v is None or v is pd.NA else str(v)


def as_strings(df: pd.DataFrame, markup: str) -> pd.DataFrame:
    """Every cell a string (floats to 4 significant figures), HTML-escaped for ``markup="html"``."""
    esc = html.escape if markup == "html" else (lambda s: s)
    out = df.map(lambda v: esc(cell(v)))
    out.columns = [esc(str(c)) for c in out.columns]
    return out


def md_table(df: pd.DataFrame) -> str:
    cols = [df.index.name or ""] + list(df.columns)
    lines = ["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    for idx, row in df.iterrows():
        cells = [str(idx)] + [str(v).replace("|", "\\|") for v in row]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def html_table(df: pd.DataFrame) -> str:
    """One header row: the index becomes the first column under its name (pandas would put the
    name on a second, otherwise empty header row); a header may break after "_" (<wbr>), so a
    wide table shrinks to the page instead of scrolling sideways. Cells are already escaped."""
    out = df.rename_axis(df.index.name or "").reset_index(allow_duplicates=True)
    out.columns = [str(c).replace("_", "_<wbr>") for c in out.columns]
    return out.to_html(escape=False, border=0, classes="t", index=False)


def header(df: pd.DataFrame) -> list[dict]:
    """Sweeps, seeds per strategy, held-out split, git sha(s), versions."""
    trials = df.drop_duplicates(["sweep", "trial"])
    done = trials[trials["status"] == "ok"]
    seeds = ", ".join(f"{s}: n={len(done[done['strategy'] == s][['sweep', 'seed']].drop_duplicates())}"
                      for s in strategies(trials))
    vers = sorted({json.dumps({k: v for k, v in json.loads(x).items() if v}, sort_keys=True)
                   for x in trials["versions"].dropna() if x})
    out = [{"p": f"Sweeps: {', '.join(sorted(df['sweep'].unique()))}. Seeds per strategy "
                 f"(completed (sweep, seed) runs): {seeds}. Held-out split: {held_out_split(df)}."},
           {"p": f"git sha: {', '.join(sorted(map(str, trials['git_sha'].unique())))}. "
                 f"Versions: {'; '.join(vers) or 'unknown'}."}]
    return out


def warm_start(results_dirs: list) -> list[dict]:
    """The warm start each sweep started from (``init.json`` beside its results: harness.warmstart),
    named by its cache key or directory, its steps and its zero-shot top-1; none: no line."""
    lines = []
    for d in results_dirs:
        path = (Path(d) if Path(d).is_dir() else Path(d).parent) / "init.json"
        if path.exists():
            w = json.loads(path.read_text())
            what = (f"pretrain {w['key']}, {w['steps']} steps from seed {w['seed']} on the "
                    f"{w['loss']} loss" if w.get("source") == "pretrain" else f"checkpoint {w['dir']}")
            acc = (f", zero-shot top-1 of its diffusion classifier {w['mc_acc']:.3f} ± "
                   f"{w.get('mc_acc_stderr', float('nan')):.3f}" if "mc_acc" in w else "")
            lines.append({"p": f"Warm start ({path.parent.name}): {what} (weights sha256 "
                               f"{w['digest'][:12]}){acc}. Every arm and seed started from it."})
    return lines


def failed_trials(df: pd.DataFrame) -> list[dict]:
    """The failed trials' table (none: no section)."""
    trials = df.drop_duplicates(["sweep", "trial"])
    failed = trials[trials["status"] != "ok"]
    if not len(failed):
        return []
    return [{"p": f"{len(failed)} failed trial(s), left out of every statistic:"},
            {"table": failed.set_index("trial")[["sweep", "strategy", "seed", "error"]]
             .assign(error=lambda d: d["error"].astype(str).str.slice(0, 200))}]


def sections(df: pd.DataFrame, tables: dict[str, pd.DataFrame], search: dict[str, pd.DataFrame],
             images: Iterable[str], baseline: str) -> list[dict]:
    main = tables["main"]
    out = [{"h1": f"genrep-bench report: {', '.join(sorted(df['sweep'].unique()))}"},
           *control_banner(tables), *header(df),
           *preregistered(tables), *failed_trials(df),
           {"h2": "Main results"}, {"p": CI_NOTE},
           {"table": {m: format_table(main, "mean", m) for m in ("md", "html")}},
           {"h2": f"Δ against {baseline}"}, {"p": DELTA_NOTE.format(b=baseline)},
           {"table": {m: format_table(main, "delta", m) for m in ("md", "html")}},
           *robustness(tables.get("robustness")),
           {"h2": "Gradient conflict"}, {"p": CONFLICT_NOTE},
           {"table": tables["conflict"].set_index("strategy")}]
    if not tables["teacher"].empty:
        out += [{"h2": "The Monte Carlo teacher"}, {"p": TEACHER_NOTE},
                {"table": {m: format_table(tables["teacher"], "mean", m) for m in ("md", "html")}}]
    if not search["trials"].empty:
        trials = search["trials"]
        out += [{"h2": "Search"}, {"h3": "Best configuration (mean val head_acc over seeds)"},
                {"table": search["best"].set_index("strategy")}, {"h3": f"Pareto front ({PARETO})"},
                {"table": search["pareto"].set_index("trial")}, {"h3": "Parameter importance"},
                {"p": IMPORTANCE_NOTE}, {"table": search["importance"].set_index("param")},
                {"h3": f"Trials ({len(trials)}; first {MAX_TRIAL_ROWS} here, all in search_trials.csv)"},
                {"table": trials.head(MAX_TRIAL_ROWS).set_index("trial")}]
    out += [{"h2": "Figures"}, *({"img": name} for name in images), {"foot": FOOTNOTE}]
    return out


def robustness(table: pd.DataFrame | None) -> list[dict]:
    """The robustness section (head top-1 on noised inputs, each column with its σ); none
    without ``head_acc_t<t>`` rows."""
    if table is None or table.empty:
        return []
    labels = robust_labels(table)
    return [{"h2": "Robustness: the head on noised inputs"}, {"p": ROBUST_NOTE},
            {"table": {m: format_table(table, "mean", m, labels) for m in ("md", "html")}}]


def control_banner(tables: dict[str, Any]) -> list[dict]:
    """First thing in the report when a registered control failed: the run cannot be trusted."""
    lines = prereg.banner(tables["controls"]) if "controls" in tables else []
    return [{"h2": lines[0]}, *({"p": line} for line in lines[1:])] if lines else []


def both(table: pd.DataFrame, fmt) -> dict[str, pd.DataFrame]:
    """A formatted table as Markdown and as HTML strings (``fmt`` gives the cells)."""
    out = {m: as_strings(fmt(table), m) for m in ("md", "html")}
    out["html"].index = out["html"].index.map(lambda v: html.escape(str(v)))  # row names are free text
    return out


def preregistered(tables: dict[str, Any]) -> list[dict]:
    """The paper-shaped tables (first, when the pre-registration names ablation rows), the
    pre-registered comparisons and the curves' mean level; nothing without a pre-registration."""
    p, note = tables.get("preregistration"), tables.get("prereg_note")
    if p is None:
        return [{"p": note}] if note else []
    out = []
    if len(tables["ablation"]):
        out += [{"h2": "The paper's ablation table, on our arms"}, {"p": paper.PAPER_NOTE},
                {"table": both(tables["ablation"], lambda t: paper.format_ablation(t, p))},
                {"h3": "Direction: the paper's and ours"}, {"p": paper.DIRECTION_NOTE},
                {"table": both(tables["ablation_direction"], paper.format_direction)}]
    out += [{"h2": "Pre-registered comparisons"}, {"p": prereg.note(p)},
            {"table": both(tables["prereg"], lambda t: prereg.format_prereg(t, p))}]
    if len(tables["controls"]):
        out += [{"h3": "Controls"}, {"p": prereg.CONTROLS_NOTE},
                {"table": both(tables["controls"], prereg.format_controls)}]
    if len(tables["aa"]):
        out += [{"h3": "The A/A arm on every held-out metric"}, {"p": prereg.aa_note(tables["aa"], p)},
                {"table": both(tables["aa"], prereg.format_aa)}]
    if len(tables["auc"]):
        out += [{"h3": "Held-out curves: end value and mean level"}, {"p": prereg.AUC_NOTE},
                {"table": both(tables["auc"], lambda t: prereg.format_auc(t, p.baseline))}]
    return out


def render_md(secs: list[dict]) -> str:
    parts = []
    for s in secs:
        kind, v = next(iter(s.items()))
        if kind in ("h1", "h2", "h3"):
            parts.append("#" * int(kind[1]) + " " + v)
        elif kind == "p":
            parts.append(v)
        elif kind == "table":
            t = v["md"] if isinstance(v, dict) else as_strings(v, "md")
            parts.append(md_table(t) if len(t) else "(none)")
        elif kind == "img":
            parts.append(f"![{Path(v).stem}]({v})")
        elif kind == "foot":
            parts.append(f"---\n\n<sub>{v}</sub>")
    return "\n\n".join(parts) + "\n"


# tables: smaller type, headers that break after "_" (html_table's <wbr>) and at spaces, the
# first column (row names) to the left; one that still cannot fit scrolls in its own box, never
# the page
STYLE = ("body{font-family:sans-serif;max-width:1100px;margin:2em auto;padding:0 1em}"
         ".wide{max-width:100%;overflow-x:auto}"
         "table.t{border-collapse:collapse;margin:1em 0;font-size:.8em}table.t td,table.t th{"
         "border:1px solid #ccc;padding:2px 5px;text-align:right}table.t th{vertical-align:bottom}"
         "table.t td:first-child,table.t th:first-child{text-align:left}"
         "img{max-width:100%;display:block;margin:1em 0}"
         ".foot{font-size:smaller;color:#555;border-top:1px solid #ccc;padding-top:.5em}")


def render_html(secs: list[dict], images: dict[str, bytes]) -> str:
    body = []
    for s in secs:
        kind, v = next(iter(s.items()))
        if kind in ("h1", "h2", "h3"):
            body.append(f"<{kind}>{html.escape(v)}</{kind}>")
        elif kind == "p":
            body.append(f"<p>{html.escape(v)}</p>")
        elif kind == "table":
            t = v["html"] if isinstance(v, dict) else as_strings(v, "html")
            body.append(f'<div class="wide">{html_table(t)}</div>' if len(t) else "<p>(none)</p>")
        elif kind == "img":
            data = base64.b64encode(images[v]).decode("ascii")
            body.append(f'<img alt="{html.escape(v)}" src="data:image/png;base64,{data}">')
        elif kind == "foot":
            body.append(f'<p class="foot">{html.escape(v)}</p>')
    title = html.escape(secs[0].get("h1", "genrep-bench report"))
    return (f'<!DOCTYPE html>\n<html><head><meta charset="utf-8"><title>{title}</title>'
            f"<style>{STYLE}</style></head><body>\n" + "\n".join(body) + "\n</body></html>\n")


def prereg_tables(df: pd.DataFrame) -> dict[str, Any]:
    """The pre-registration the results carry and its tables (``prereg``, ``auc``, ``controls``,
    ``aa``, ``ablation``, ``ablation_direction``); only a note, or nothing, without one."""
    p, note = prereg.preregistration(df)
    if p is None:
        return {"prereg_note": note} if note else {}
    main = prereg.prereg_table(df, p)
    return {"preregistration": p, "prereg": main, "auc": prereg.auc_table(df, p),
            "controls": prereg.controls_table(main, p), "aa": prereg.aa_table(df, p),
            "ablation": paper.ablation_table(df, p),
            "ablation_direction": paper.direction_table(df, p, main)}


def build_report(results_dirs: list, out_dir, baseline: str = "sum") -> dict[str, Path]:
    """Write report.md, report.html, one CSV per table and the PNGs into ``out_dir``.

    Returns file name → path (``report.md``, ``report.html``, ``main.csv``, ``conflict.csv``,
    ``teacher.csv``, ``robustness.csv`` (a header only where the results have none of its rows),
    ``search_*.csv`` when a search was run; ``prereg.csv``, ``auc.csv``, ``ablation.csv``,
    ``ablation_direction.csv`` when the sweep pre-registered its comparisons and the data has
    them; and each PNG the data supports).
    """
    out_dir = Path(out_dir)
    df = load(results_dirs)
    tables = {"main": main_table(df, baseline=baseline), "conflict": conflict_table(df),
              "teacher": teacher_table(df, baseline=baseline),
              "robustness": robustness_table(df, baseline=baseline)}
    extra = prereg_tables(df)
    search = search_table(df)
    images = all_plots(df, search)
    paths = {name: write_atomic(out_dir / name, data) for name, data in images.items()}
    csvs = {**tables, **{k: v for k, v in extra.items() if isinstance(v, pd.DataFrame) and len(v)},
            **{f"search_{k}": v for k, v in search.items() if not v.empty}}
    tables |= extra
    for name, t in csvs.items():
        paths[f"{name}.csv"] = write_atomic(out_dir / f"{name}.csv", t.to_csv(index=False))
    secs = sections(df, tables, search, images, baseline)
    secs = [secs[0], *warm_start(results_dirs), *secs[1:]]  # after the title: what it started from
    paths["report.md"] = write_atomic(out_dir / "report.md", render_md(secs))
    paths["report.html"] = write_atomic(out_dir / "report.html", render_html(secs, images))
    return paths
