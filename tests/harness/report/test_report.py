"""harness.report on a small synthetic results table with hand-computed means, CIs and fronts.

Grid sweep: strategies sum, pcgrad, genrep × seeds 0, 1, 2 (+ one failed genrep trial, seed 3).
  val head_acc  sum    [0.70, 0.80, 0.90]  mean 0.80, CI = t_{.975,2}·s/√3 = 4.3027·0.1/1.7321 = 0.2484
                genrep [0.72, 0.84, 0.96]  mean 0.84; paired d = [0.02, 0.04, 0.06]:
                                           mean 0.04, s_d = 0.02, CI = 4.3027·0.02/1.7321 = 0.04968
                pcgrad [0.65, 0.80, 0.80]  mean 0.75
  val fd_ref    sum [10, 12, 14] (12), genrep [8, 9, 10] (9), pcgrad [7, 7, 7] (7, CI 0): lowest best
  train rows at steps 10 and 20: conflict genrep [1, 0] per seed → 0.5, pcgrad [1, 1] → 1, sum [0, 0]
  update_change 0.01·(seed+1)·(j+1) at row j: mean 0.03, each run's max 0.02·(seed+1) → mean 0.04;
  seg_conflict 0.1·(strategy index+1)·(j+1): genrep (index 2) [0.3, 0.6] → 0.45
  rss_mb [100, 200] per trial → peak 200; step_time = 0.1·(1 + strategy index).
  images_per_s is the run's running total (images so far / seconds so far): 1000 at step 10, then
  64/step_time at step 20 → the last, 320 for pcgrad (a mean of the rows would say 660).
  robustness: head_acc_t50 = head_acc − 0.1, head_acc_t300 = head_acc − 0.4 (σ 0.0910, 0.4630).
"""
from __future__ import annotations

import json
import math
import re
import subprocess
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from harness import results
from harness.report import (build_report, conflict_table, format_table, load, main_table,
                            mean_ci, paired_delta, pareto_front, search_table, t_quantile)
from harness.report.tables import summary

T2 = 4.302652729911275  # scipy.stats.t.ppf(0.975, 2)
HEAD = {"sum": [0.70, 0.80, 0.90], "genrep": [0.72, 0.84, 0.96], "pcgrad": [0.65, 0.80, 0.80]}
FD = {"sum": [10, 12, 14], "genrep": [8, 9, 10], "pcgrad": [7, 7, 7]}
CONFLICT = {"sum": [0, 0], "genrep": [1, 0], "pcgrad": [1, 1]}
COS = {"sum": [0.5, 0.3], "genrep": [-0.4, 0.2], "pcgrad": [-0.2, -0.6]}


def trial_rows(strategy, seed, final, train=(), status="ok", params=None, k=4):
    cfg = {"strategy": {"name": strategy, "options": {}}, "seed": seed, "method": {"mc": {"k": k}}}
    if params:
        cfg["params"] = params
    name = f"{strategy}-seed{seed}-{abs(hash(json.dumps(cfg, sort_keys=True))) % 10**6}"
    fields = results.trial_fields(cfg, name, "hash", status, "" if status == "ok" else "Boom: x",
                                  "abc123", json.dumps({"torch": "2.5", "ray": None}))
    history = [*train, *([{"step": 20, "split": "val", **final}] if final else [])]
    rows = results.long_rows(history, fields)
    if status != "ok":
        rows.append({**fields, "step": -1, "split": "status", "metric": "failed", "value": 1.0,
                     "stderr": float("nan"), "higher_is_better": False})
    return rows


def grid_rows():
    rows = []
    for i, s in enumerate(["sum", "pcgrad", "genrep"]):
        for seed in range(3):
            train = [{"step": st, "split": "train", "loss_perc": 2.0 - j - 0.1 * seed,
                      "loss_gen": 1.0 - 0.2 * j, "cos": COS[s][j], "conflict": CONFLICT[s][j],
                      "damping": 0.5 if s == "genrep" else 1.0, "step_time": 0.1 * (1 + i),
                      "images_per_s": 64 / (0.1 * (1 + i)) if j else 1000.0, "mc_evals": 8.0, "rss_mb": 100.0 * (j + 1),
                      "update_change": 0.01 * (seed + 1) * (j + 1), "seg_conflict": 0.1 * (i + 1) * (j + 1)}
                     for j, st in enumerate((10, 20))]
            robust = {"head_acc_t50": HEAD[s][seed] - 0.1, "head_acc_t300": HEAD[s][seed] - 0.4,
                      "noise_sigma_t50": 0.0910, "noise_sigma_t300": 0.4630}
            rows += trial_rows(s, seed, {"head_acc": HEAD[s][seed], "fd_ref": FD[s][seed], **robust}, train)
    # a failed trial with wild partial rows: must not enter any statistic
    rows += trial_rows("genrep", 3, None, [{"step": 10, "split": "train", "conflict": 0.0,
                                            "step_time": 99.0, "cos": 0.9}], status="failed")
    return rows


# search: genrep, seed 0, damping λ₀ ∈ {0, .25, .5, 1}; objectives (head_acc ↑, fd_ref ↓, step_time ↓)
SEARCH = {0.0: (0.80, 10.0, 0.2), 0.25: (0.85, 12.0, 0.2), 0.5: (0.82, 11.0, 0.3), 1.0: (0.75, 9.0, 0.1)}


def search_rows():
    rows = []
    for lam, (acc, fd, st) in SEARCH.items():
        train = [{"step": 10, "split": "train", "step_time": st}]
        rows += trial_rows("genrep", 0, {"head_acc": acc, "fd_ref": fd}, train,
                           params={"strategy.options.damping": lam})
    return rows


@pytest.fixture(scope="module")
def dirs(tmp_path_factory):
    root = tmp_path_factory.mktemp("results")
    results.write_parquet_atomic(results.frame(grid_rows()), root / "grid" / "results.parquet")
    results.write_parquet_atomic(results.frame(search_rows()), root / "search" / "results.parquet")
    return root / "grid", root / "search"


@pytest.fixture(scope="module")
def grid(dirs):
    return load([dirs[0]])


@pytest.fixture(scope="module")
def table(grid):
    return main_table(grid)


def cell(table, strategy, metric):
    return table[(table["strategy"] == strategy) & (table["metric"] == metric)].iloc[0]


def test_t_quantile_against_the_table():
    # t_{0.975, df} from the printed table (NIST/SEMATECH e-Handbook, §1.3.6.7.2), 3 decimals
    for df, table in ((1, 12.706), (2, 4.303), (5, 2.571), (10, 2.228), (30, 2.042), (10**6, 1.960)):
        assert t_quantile(df) == pytest.approx(table, abs=5e-4)
    assert t_quantile(2) == pytest.approx(0.95 * math.sqrt(2 / (1 - 0.95**2)), rel=1e-12)  # closed form
    assert math.isnan(t_quantile(0))


def test_mean_ci_by_hand():
    mean, half, n = mean_ci([0.8, 0.9, 1.0])
    # s = 0.1 (deviations ±0.1, 0; Σ = 0.02, /2 = 0.01); half = 4.303·0.1/√3 = 0.2484
    assert (mean, n) == (pytest.approx(0.9), 3)
    assert half == pytest.approx(4.303 * 0.1 / math.sqrt(3), abs=1e-4)
    assert math.isnan(mean_ci([0.5])[1]) and mean_ci([])[2] == 0
    d, d_half, m = paired_delta([0.72, 0.84, 0.96], [0.70, 0.80, 0.90])
    assert (d, m) == (pytest.approx(0.04), 3) and d_half == pytest.approx(T2 * 0.02 / math.sqrt(3))


def test_load_keeps_sweep_names(dirs):
    df = load(list(dirs))
    assert set(df["sweep"]) == {"grid", "search"}
    assert len(df) == len(load([dirs[0]])) + len(load([dirs[1] / "results.parquet"]))


def test_main_table_means_cis_and_paired_delta(table):
    s = cell(table, "sum", "head_acc")
    assert (s["mean"], s["n"]) == (pytest.approx(0.8), 3)
    assert s["ci"] == pytest.approx(T2 * 0.1 / math.sqrt(3))  # 0.2484
    assert math.isnan(s["delta"])
    g = cell(table, "genrep", "head_acc")
    assert g["n"] == 3  # the failed seed-3 trial is left out
    assert g["delta"] == pytest.approx(0.04) and g["delta_n"] == 3
    assert g["delta_ci"] == pytest.approx(T2 * 0.02 / math.sqrt(3))  # 0.04968, paired
    assert g["delta_ci"] < g["ci"]  # pairing removes the shared seed-to-seed spread
    assert cell(table, "pcgrad", "fd_ref")["ci"] == 0.0
    assert cell(table, "genrep", "fd_ref")["delta"] == pytest.approx(-3.0)


def test_main_table_cost_columns(table):
    assert cell(table, "sum", "rss_mb")["mean"] == 200.0  # peak per trial, not the mean 150
    assert cell(table, "genrep", "step_time")["mean"] == pytest.approx(0.3)  # not 99 (failed)
    assert cell(table, "pcgrad", "images_per_s")["mean"] == pytest.approx(320.0)  # the last row: the total
    assert cell(table, "sum", "mc_evals")["mean"] == 8.0
    assert set(table.loc[table["metric"] == "step_time", "kind"]) == {"cost"}


def test_robustness_table_names_each_columns_noise(grid):
    from harness.report.tables import robust_labels, robustness_table

    r = robustness_table(grid)
    assert list(dict.fromkeys(r["metric"])) == ["head_acc", "head_acc_t50", "head_acc_t300"]  # by t
    t50 = cell(r, "sum", "head_acc_t50")
    assert t50["mean"] == pytest.approx(0.7) and t50["ci"] == pytest.approx(T2 * 0.1 / math.sqrt(3))
    assert cell(r, "genrep", "head_acc_t300")["delta"] == pytest.approx(0.04)  # paired, as head_acc
    assert cell(r, "sum", "head_acc_t300")["sigma"] == pytest.approx(0.4630)
    labels = robust_labels(r)
    assert labels == {"head_acc": "head_acc (clean) ↑", "head_acc_t50": "head_acc_t50 (σ = 0.091) ↑",
                      "head_acc_t300": "head_acc_t300 (σ = 0.463) ↑"}
    md = format_table(r, "mean", "md", labels)
    assert list(md.columns) == ["n", *labels.values()]
    assert md.loc["genrep", "head_acc_t50 (σ = 0.091) ↑"] == "**0.74 ± 0.30**"
    assert robustness_table(grid[~grid["metric"].str.startswith("head_acc_t")]).empty


def test_best_respects_direction(table):
    best = table[table["best"]].set_index("metric")["strategy"]
    assert best["head_acc"] == "genrep"  # higher is better
    assert best["fd_ref"] == "pcgrad"  # lower is better: 7 < 9 < 12
    assert best["step_time"] == "sum"
    md = format_table(table, "mean", "md")
    assert md.loc["pcgrad", "fd_ref ↓"].startswith("**7.000 ± 0.000**")
    assert md.loc["genrep", "head_acc ↑"] == "**0.84 ± 0.30**"
    assert md.loc["sum", "head_acc ↑"] == "0.80 ± 0.25"  # 2 significant figures of the CI
    assert md.loc["sum", "n"] == "3"
    html = format_table(table, "mean", "html")
    assert html.loc["genrep", "head_acc ↑"].startswith("<strong>")


def test_format_delta(table):
    d = format_table(table, "delta", "plain")
    assert d.loc["sum", "head_acc ↑"] == "(baseline)"
    assert d.loc["genrep", "head_acc ↑"] == "+0.040 ± 0.050"


def test_pareto_front_by_hand():
    # (acc ↑, fd ↓): (0.9, 5) dominates (0.8, 6); (0.95, 8) and (0.7, 3) are trade-offs;
    # (0.9, 5) duplicated: both kept; a NaN row is never on the front
    pts = [[0.9, 5], [0.8, 6], [0.95, 8], [0.7, 3], [0.9, 5], [np.nan, 1]]
    assert pareto_front(pts, [True, False]).tolist() == [True, False, True, True, True, False]
    assert pareto_front([[1, 1], [2, 2]], [True, True]).tolist() == [False, True]
    assert pareto_front([[1, 1], [2, 2]], [False, False]).tolist() == [True, False]


def test_conflict_table(grid):
    c = conflict_table(grid).set_index("strategy")
    assert c.loc["genrep", "conflict_frac"] == 0.5  # failed trial's 0.0 row excluded
    assert c.loc["pcgrad", "conflict_frac"] == 1.0 and c.loc["sum", "conflict_frac"] == 0.0
    assert c.loc["genrep", "cos_mean"] == pytest.approx(-0.1)
    assert c.loc["pcgrad", "cos_median"] == pytest.approx(-0.4)
    assert c.loc["genrep", "damping_mean"] == 0.5 and c.loc["genrep", "seeds"] == 3
    assert c.loc["sum", "update_change_mean"] == pytest.approx(0.03)
    assert c.loc["sum", "update_change_max"] == pytest.approx(0.04)
    assert c.loc["genrep", "seg_conflict"] == pytest.approx(0.45)
    assert math.isnan(c.loc["genrep", "seg_cos_median"])  # not logged: no value, no error


def test_search_table(dirs):
    s = search_table(load([dirs[1]]))
    trials = s["trials"]
    assert trials.attrs["params"] == ["strategy.options.damping"] and len(trials) == 4
    best = s["best"].iloc[0]
    assert float(best["strategy.options.damping"]) == 0.25 and best["head_acc"] == 0.85
    # every point trades off: .25 has the best acc, 1.0 the best fd and time, 0 beats .25 on fd,
    # .5 beats .25 on fd and 0 on acc, so none is dominated (see the next test for one that is)
    assert sorted(s["pareto"]["strategy.options.damping"].astype(float)) == [0.0, 0.25, 0.5, 1.0]
    imp = s["importance"]
    assert imp["param"].tolist() == ["strategy.options.damping"] and imp["share"].iloc[0] == 1.0
    assert "spearman" in imp["method"].iloc[0]


def test_search_pareto_drops_dominated(dirs):
    extra = trial_rows("genrep", 0, {"head_acc": 0.70, "fd_ref": 13.0},
                       [{"step": 10, "split": "train", "step_time": 0.4}],
                       params={"strategy.options.damping": 0.75})
    df = pd.concat([load([dirs[1]]), results.frame(extra).assign(sweep="search")], ignore_index=True)
    pareto = search_table(df)["pareto"]
    assert 0.75 not in pareto["strategy.options.damping"].astype(float).tolist()


def test_search_pareto_takes_the_teacher_forwards_when_they_vary():
    """Cost = mc_evals (deterministic) when the trials differ in it, else step_time: chain B is
    dominated on forwards (same acc and fd, more forwards) though it is faster per step."""
    def rows(chain, acc, fd, evals, st):
        train = [{"step": 10, "split": "train", "step_time": st, "mc_evals": evals}]
        return trial_rows("genrep", 0, {"head_acc": acc, "fd_ref": fd}, train,
                          params={"method.mc.chain_steps": chain})
    df = results.frame(rows(20, 0.8, 10.0, 100.0, 0.3) + rows(40, 0.8, 10.0, 200.0, 0.1)
                       + rows(80, 0.9, 10.0, 400.0, 0.5)).assign(sweep="mcmc")
    s = search_table(df)
    assert s["pareto"]["method.mc.chain_steps"].astype(int).tolist() == [80, 20]
    assert {"mc_evals", "step_time"} <= set(s["trials"])
    same = results.frame(rows(20, 0.8, 10.0, 8.0, 0.3) + rows(40, 0.8, 10.0, 8.0, 0.1)).assign(sweep="s")
    assert search_table(same)["pareto"]["method.mc.chain_steps"].astype(int).tolist() == [40]


def test_search_leaves_grid_sweeps_out(dirs):
    trials = search_table(load(list(dirs)))["trials"]
    assert set(trials["sweep"]) == {"search"} and len(trials) == 4


def test_search_detects_varying_config_field():
    rows = [r for k in (2, 8) for r in trial_rows("genrep", 0, {"head_acc": 0.5 + k / 100}, k=k)]
    s = search_table(results.frame(rows).assign(sweep="mc"))
    assert s["trials"].attrs["params"] == ["method.mc.k"]


def test_no_search_gives_empty_frames(grid):
    assert all(v.empty for v in search_table(grid).values())


@pytest.fixture(scope="module")
def report(dirs, tmp_path_factory):
    out = tmp_path_factory.mktemp("report")
    return out, build_report(list(dirs), out)


def test_build_report_files(report):
    out, paths = report
    for name in ("report.md", "report.html", "main.csv", "conflict.csv", "search_trials.csv",
                 "search_pareto.csv", "acc_vs_fd.png", "curves_loss_perc.png",
                 "curves_loss_gen.png", "cos_hist.png", "damping.png", "search_landscape.png",
                 "update_change.png", "seg_conflict.png"):
        assert paths[name] == out / name and paths[name].stat().st_size > 0, name
    assert not [p for p in out.iterdir() if p.name.startswith(".")]  # no temp files left
    md = paths["report.md"].read_text()
    assert "fd_ref: Fréchet distance in the reference classifier's feature space, not FID" in md
    assert "![acc_vs_fd](acc_vs_fd.png)" in md and "grid, search" in md and "abc123" in md
    assert "1 failed trial(s)" in md and "| genrep |" in md
    assert "## Robustness" in md and "| strategy | n | head_acc (clean) ↑ | head_acc_t50 (σ = 0.091) ↑ |" in md
    html = paths["report.html"].read_text()
    assert "<table" in html and "data:image/png;base64," in html and 'src="acc_vs_fd.png"' not in html
    assert pd.read_csv(paths["main.csv"]).shape[0] > 0
    assert set(pd.read_csv(paths["robustness.csv"])["metric"]) == {"head_acc", "head_acc_t50", "head_acc_t300"}


def test_html_tables_have_one_header_row_led_by_the_index_name(report):
    """pandas' to_html puts the index name on a second header row, empty but for that name: the
    report folds it into the first header row's corner cell; headers may break after "_"."""
    html = report[1]["report.html"].read_text()
    heads = re.findall(r"<thead>(.*?)</thead>", html, re.S)
    assert len(heads) >= 5 and all(h.count("<tr") == 1 for h in heads)
    firsts = [re.search(r"<th[^>]*>(.*?)</th>", h, re.S)[1] for h in heads]
    assert firsts[:2] == ["trial", "strategy"]  # the failed trials', then the main table
    assert "update_<wbr>change_<wbr>mean" in html


def test_cli_report(dirs, tmp_path, capsys):
    from harness.cli import main

    assert main(["report", str(dirs[0]), "--out", str(tmp_path / "r")]) == 0
    out = capsys.readouterr().out
    assert str(tmp_path / "r" / "report.md") in out and "0.80 ± 0.25" in out


CHROMIUM = Path("/usr/bin/chromium")


@pytest.mark.skipif(not CHROMIUM.exists(),
                    reason="needs /usr/bin/chromium: scripts/test.sh installs Debian's chromium where it can")
def test_report_html_renders_in_chromium(report, tmp_path):
    """The self-contained HTML in a real headless browser: the DOM it builds has the tables and
    every figure as an embedded image (none left as a file link), the page renders, and at 1300 px
    nothing scrolls sideways (the old CSS: 2,331 px wide, for the search and conflict tables)."""
    html = report[1]["report.html"]
    flags = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
             "--disable-background-networking", "--disable-component-update", "--disable-sync",
             f"--user-data-dir={tmp_path / 'chromium'}"]
    dom = subprocess.run([str(CHROMIUM), *flags, "--dump-dom", html.as_uri()], capture_output=True,
                         text=True, timeout=120, check=True).stdout
    assert dom.count("<table") >= 3 and "| strategy |" not in dom  # rendered tables, not Markdown
    assert dom.count("<img") >= 5 and dom.count('src="data:image/png;base64,') == dom.count("<img")
    probe = tmp_path / "probe.html"  # the page's own width, read by a script in a copy of it
    probe.write_text(html.read_text().replace(
        "</body>", "<script>document.title = 'W' + document.documentElement.scrollWidth</script></body>"))
    dom = subprocess.run([str(CHROMIUM), *flags, "--window-size=1300,2400", "--dump-dom", probe.as_uri()],
                         capture_output=True, text=True, timeout=120, check=True).stdout
    assert int(re.search(r"<title>W(\d+)</title>", dom)[1]) <= 1300
    shot = tmp_path / "report.png"
    subprocess.run([str(CHROMIUM), *flags, f"--screenshot={shot}", "--window-size=1300,2400",
                    html.as_uri()], capture_output=True, timeout=120, check=True)
    assert shot.stat().st_size > 20_000  # a page with figures, not a blank one


def test_cli_summary_takes_each_trials_last_evaluation_on_the_reporting_split():
    """The sweep's printed summary: not a mean over every evaluation (step 0's untrained network
    included), and test over val when both are there. sum: seeds [0.8, 0.6] at the end (0.7),
    0.1 at step 0 and 0.4 midway; val rows 0.99 are the choosing split's."""
    rows = []
    for seed, end in ((0, 0.8), (1, 0.6)):
        history = [{"step": 0, "split": "test", "head_acc": 0.1}, {"step": 10, "split": "test", "head_acc": 0.4},
                   {"step": 20, "split": "val", "head_acc": 0.99},
                   {"step": 20, "split": "train", "step_time": 0.5}]
        rows += trial_rows("sum", seed, None, history)
        rows += trial_rows("sum", seed, None, [{"step": 20, "split": "test", "head_acc": end}])[-1:]
    out = summary(results.frame(rows))
    assert out.loc["sum", "head_acc"] == pytest.approx(0.7)
    assert out.loc["sum", "step_time"] == pytest.approx(0.5) and out.loc["sum", "seeds"] == 2


def test_direction_table_shows_every_metric_the_paper_direction_names():
    """head_ece ↓ on the distillation row and kid_ref (neither a paper column) get their own
    columns; a row whose paper Top-1 went down (semantic-driven generation, 45.4 → 44.1) reads
    "↓ (worse)". ECE: sum [.20, .22, .24], genrep [.15, .18, .21], d = [−.05, −.04, −.03]."""
    from harness.config import preregistration_from_dict
    from harness.report.paper import direction_table, format_direction
    from harness.report.prereg import prereg_table

    ece = {"sum": [0.20, 0.22, 0.24], "genrep": [0.15, 0.18, 0.21], "pcgrad": [0.2, 0.2, 0.2]}
    rows = [r for s in ece for seed in range(3)
            for r in trial_rows(s, seed, {"head_acc": HEAD[s][seed], "head_ece": ece[s][seed],
                                          "kid_ref": 1.0 + seed})]
    df = results.frame(rows).assign(sweep="abl")
    p = preregistration_from_dict({
        "primary": ["head_acc"], "baseline": "sum", "comparisons": ["genrep", "pcgrad"],
        "margins": {"head_acc": 0.01}, "seeds": 3,
        "ablation": [{"arm": "sum", "row": "Baseline"}, {"arm": "genrep", "row": "+ distillation"},
                     {"arm": "pcgrad", "row": "+ semantic"}],
        "paper_direction": {"+ distillation": {"head_acc": "up", "head_ece": "down", "kid_ref": "down"},
                            "+ semantic": {"head_acc": "down", "kid_ref": "down"}}})
    t = format_direction(direction_table(df, p, prereg_table(df, p)))
    assert list(t.columns) == ["vs", "Top-1: paper", "Top-1: ours", "head_ece: paper", "head_ece: ours",
                               "kid_ref: paper", "kid_ref: ours"]
    assert t.loc["+ distillation", "head_ece: paper"] == "↓ (better)"
    # exploratory (†: head_ece is not primary): t = .04/(.01/√3) = 6.93, p = 1 − t/√(2 + t²) = 0.020
    assert t.loc["+ distillation", "head_ece: ours"].startswith("better† (-0.040 ± ")
    assert t.loc["+ semantic", "Top-1: paper"] == "↓ (worse)"
    assert t.loc["+ semantic", "head_ece: paper"] == "—"


def test_mark_best_on_one_metric_and_on_a_metric_without_direction():
    """A table with a single metric (a groupby-apply returned a frame there) and one without a
    direction (nothing is best)."""
    from harness.report.tables import mark_best

    one = pd.DataFrame({"metric": ["fd_ref"] * 3, "higher_is_better": [False] * 3, "mean": [2.0, 1.0, 1.0]})
    assert mark_best(one).tolist() == [False, True, True]
    mixed = pd.DataFrame({"metric": ["acc", "acc", "cos", "cos"], "higher_is_better": [True, True, None, None],
                          "mean": [0.5, 0.7, 0.1, 0.2]})
    assert mark_best(mixed).tolist() == [False, True, False, False]
