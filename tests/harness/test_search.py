"""Grid extras, named variants and the Optuna search: schema, expansion, the seed repeater, and
(slow) a real two-configuration search through the CLI whose study survives a --resume."""
from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest
import yaml

from harness import results
from harness.config import ConfigError, from_dict, load
from harness.data import resolve_dataset, url_patterns
from harness.trial import resolve, trial_name
from tests.conftest import ROOT

SPACE = {"strategy.options.damping": {"type": "float", "low": 0.0, "high": 1.0},
         "strategy.options.rule": {"type": "categorical", "choices": ["constant", "cos", "gradvac"]},
         "method.mc.k": {"type": "int", "low": 1, "high": 4, "log": True}}


def searched(tiny, **search):
    return tiny(strategies=["genrep"], search={"num_samples": 2, "space": SPACE, **search})


def write(tmp_path: Path, raw: dict) -> Path:
    path = tmp_path / "sweep.yaml"
    path.write_text(yaml.safe_dump(raw))
    return path


# ---------------------------------------------------------------- schema
@pytest.mark.parametrize("patch, field, words", [
    ({"grid": {"method.beta_kd": [-1.0]}}, "grid.method.beta_kd", "must be >= 0"),
    ({"grid": {"method.beta_kd": ["high"]}}, "grid.method.beta_kd", "expected a number"),
    ({"grid": {"method.betakd": [1.0]}}, "grid.method.betakd", "unknown field"),
    ({"grid": {"optim.lr": [1.0]}}, "grid.optim.lr", "unknown field 'optim'"),
    ({"grid": {"train.steps": 8}}, "grid.train.steps", "non-empty list"),
    ({"grid": {"seed": [1, 2]}}, "grid.seed", "set seeds instead"),
    ({"grid": {"data.image_size": [16]}}, "grid.data.image_size", "one dataset per sweep"),
    ({"grid": {"strategy.options.damping": [0.5]}}, "grid.strategy.options.damping",
     "strategy 'sum': unknown option"),  # the grid crosses every strategy, and sum has no damping
    ({"variants": {"sum": {"strategy": "sum"}}}, "variants.sum", "its own name"),
    ({"variants": {"x": {"strategy": "adam"}}}, "variants.x.strategy", "unknown strategy 'adam'"),
    ({"variants": {"x": {"strategy": "genrep", "overides": {}}}}, "variants.x.overides", "unknown field"),
    ({"variants": {"x": {"strategy": "genrep", "overrides": {"strategy.options.damping": 2.0}}}},
     "variants.x.overrides.strategy.options.damping", "damping must lie in [0, 1]"),
    ({"variants": {"x": {"strategy": "sum", "overrides": {"method.mc.k": 0}}}},
     "variants.x.overrides.method.mc.k", "must be > 0"),
    ({"search": {"space": SPACE}}, "strategies", "a search runs one strategy"),
    ({"data": {"urls": "file:///data/all-{0..3}.tar"}}, "data.urls", "containing {split}"),
    ({"grid": {"deepspeed.zero_stage": [1, 3]}}, "grid.deepspeed.zero_stage", "3 is not supported"),
    ({"grid": {"model.overrides.t_perception": [10, 1000]}}, "grid.model.overrides.t_perception",
     "must be in [0, 1000)"),
    # each value is fine alone; a trial's values are also checked together
    ({"grid": {"train.batch_size": [8, 9], "resources.workers": [1, 2]}}, "arm sum",
     "train.batch_size=9 together are not valid here: train.batch_size: 9 is not divisible by "
     "resources.workers = 2"),
    ({"variants": {"x": {"strategy": "sum", "overrides": {"method.use_ce": False, "method.beta_kd": 0.0}}}},
     "arm x", "no perception loss"),
])
def test_bad_grid_variant_or_search_names_file_and_field(tmp_path, tiny, patch, field, words):
    path = write(tmp_path, {**tiny(), **patch})
    with pytest.raises(ConfigError) as err:
        load(path)
    msg = str(err.value)
    assert msg.startswith(f"{path}: ") and field in msg and words in msg, msg


@pytest.mark.parametrize("search, field, words", [
    ({"space": {"strategy.options.damping": {"type": "float", "low": 0.0, "high": 2.0}}},
     "search.space.strategy.options.damping", "damping must lie in [0, 1]"),
    ({"space": {"method.mc.k": {"type": "int", "low": 0, "high": 8, "log": True}}},
     "search.space.method.mc.k", "log scale needs low > 0"),
    ({"space": {"method.mc.k": {"type": "int", "low": 1.5, "high": 8}}}, "search.space.method.mc.k",
     "whole numbers"),
    ({"space": {"strategy.options.rule": {"type": "categorical", "choices": ["cos", "nope"]}}},
     "search.space.strategy.options.rule", "unknown rule 'nope'"),
    ({"space": {"method.mc.k": {"type": "uniform", "low": 1, "high": 8}}}, "search.space.method.mc.k.type",
     "must be one of"),
    ({"metrics": ["head_acc", "fid"]}, "search.metrics[1]", "unknown objective 'fid'"),
    ({"metrics": ["head_acc", "fd_ref"], "modes": ["max"]}, "search.modes", "1 modes for 2 metrics"),
    ({"metric": "head_acc", "metrics": ["fd_ref"]}, "search", "not both"),
    ({"scheduler": {"metric": "head_acc"}}, "search.scheduler.metric", "one of ['acc'"),
    ({"scheduler": {"grace_period": 4}}, "search.scheduler.grace_period", "must be < train.steps"),
    ({"num_samples": 0}, "search.num_samples", "must be > 0"),
])
def test_bad_search_names_file_and_field(tmp_path, tiny, search, field, words):
    raw = searched(tiny)
    raw["search"] = {**raw["search"], **search}
    path = write(tmp_path, raw)
    with pytest.raises(ConfigError) as err:
        load(path)
    msg = str(err.value)
    assert msg.startswith(f"{path}: ") and field in msg and words in msg, msg


def test_grid_and_variants_expand_to_labelled_trials(tiny):
    cfg = from_dict(tiny(strategies=["sum", "genrep"], seeds=[0, 1],
                         grid={"method.beta_kd": [0, 1.0]},
                         variants={"sum_kd": {"strategy": "sum", "overrides": {"method.mc.k": 3}},
                                   "genrep_nokd": {"strategy": "genrep",
                                                   "overrides": {"strategy.options.damping": 0.2}}}))
    trials = cfg.trials()
    assert len(trials) == 4 * 2 * 2  # (2 strategies + 2 variants) × 2 seeds × 2 grid values
    assert [t.variant for t in trials[::4]] == ["sum", "genrep", "sum_kd", "genrep_nokd"]
    kd = [t for t in trials if t.variant == "sum_kd"]
    assert {t.strategy.name for t in kd} == {"sum"} and {t.method.mc.k for t in kd} == {3}
    assert [t.method.beta_kd for t in kd[:2]] == [0.0, 1.0]
    assert all(isinstance(t.method.beta_kd, float) for t in trials)  # 0 became 0.0: canonical hash
    assert {t.strategy.options["damping"] for t in trials if t.variant == "genrep_nokd"} == {0.2}
    assert len({t.hash() for t in trials}) == len(trials)
    assert trial_name(kd[0]).startswith("sum_kd-seed0-")


def test_resolve_reads_tune_params_old_and_new(tiny):
    cfg = from_dict(tiny(variants={"sum_kd": {"strategy": "sum", "overrides": {"method.beta_kd": 0.5}}}))
    t = resolve(cfg, {"variant": "sum_kd", "seed": 0, "overrides": {"train.lr": 0.01}})
    assert (t.variant, t.strategy.name, t.method.beta_kd, t.train.lr) == ("sum_kd", "sum", 0.5, 0.01)
    old = resolve(cfg, {"strategy": "genrep", "seed": 0})  # experiments started before variants
    assert (old.variant, old.strategy.name) == ("genrep", "genrep")


def test_results_label_rows_with_the_variant(tiny):
    cfg = from_dict(tiny(variants={"genrep_nokd": {"strategy": "genrep",
                                                   "overrides": {"method.beta_kd": 0.0}}}))
    t = cfg.arm("genrep_nokd", 0)
    fields = results.trial_fields(t.to_dict(), trial_name(t), t.hash(), "ok", "", "sha", "{}")
    assert fields["strategy"] == fields["variant"] == "genrep_nokd"
    assert json.loads(fields["config"])["strategy"]["name"] == "genrep"


# ---------------------------------------------------------------- data URLs
def test_url_pattern_substitutes_only_split_and_keeps_brace_ranges():
    pattern = "pipe:aws s3 cp s3://my-bucket/cifar10/{split}-{00000..00049}.tar -"
    urls = url_patterns(pattern)
    assert urls["val"] == "pipe:aws s3 cp s3://my-bucket/cifar10/val-{00000..00049}.tar -"
    per_split = {"train": "a-{0..9}.tar", "val": "b-{0..1}.tar", "test": "c-{0..1}.tar"}
    assert url_patterns(per_split) == per_split


def test_resolve_dataset_with_url_patterns_streams_every_split(tmp_path, tiny):
    """Packed digits addressed by a brace pattern: each split expands and the evaluation's dataset
    key is a stable name (the reference classifier's cache key)."""
    from harness.data import load_manifest, make_loader

    packed = from_dict(tiny())
    local = resolve_dataset(packed)
    manifest = load_manifest(local.manifest)
    n = {s: len(manifest.split(s).shards) for s in ("train", "val", "test")}
    root = Path(local.train[0]).parent
    mapping = {s: f"file://{root}/{s}-{{{0:05d}..{n[s] - 1:05d}}}.tar" for s in n}
    urls = resolve_dataset(from_dict(tiny(data={"urls": mapping})))
    assert urls.key == resolve_dataset(from_dict(tiny(data={"urls": dict(mapping)}))).key
    assert urls.class_counts is None and urls.manifest is None  # no manifest behind URLs
    for split in n:
        loader = make_loader(urls.urls(split), 64, shuffle_buffer=0, drop_last=False, shuffle_shards=False)
        assert sum(len(x) for x, _ in loader) == manifest.split(split).count, split


# ---------------------------------------------------------------- Optuna plumbing
def test_space_becomes_optuna_distributions_and_objectives(tiny):
    from optuna.distributions import CategoricalDistribution, FloatDistribution, IntDistribution

    from harness import search

    cfg = from_dict(searched(tiny))
    d = {p: search.distribution(s) for p, s in cfg.search.space.items()}
    assert d["strategy.options.damping"] == FloatDistribution(0.0, 1.0)
    assert d["method.mc.k"] == IntDistribution(1, 4, log=True)
    assert d["strategy.options.rule"] == CategoricalDistribution(["constant", "cos", "gradvac"])
    assert search.objectives(cfg) == ("head_acc", "max")
    multi = from_dict(searched(tiny, metrics=["head_acc", "fd_ref", "step_time"]))
    assert search.objectives(multi) == (["head_acc", "fd_ref", "step_time"], ["max", "min", "min"])
    assert search.num_trials(from_dict({**searched(tiny), "seeds": [0, 1, 2]})) == 6
    asha = search.scheduler(from_dict(searched(tiny, scheduler={"grace_period": 2})))
    assert asha._time_attr == "step" and asha._max_t == 4 and not asha._stop_last_trials


class FakeSearcher:
    """Stands in for OptunaSearch: hands out configurations, records what it is told."""

    def __new__(cls, metric, mode):
        from ray.tune.search import Searcher

        class _Fake(Searcher):
            def __init__(self):
                super().__init__(metric=metric, mode=mode)
                self.told, self.n = [], 0

            def suggest(self, trial_id):
                self.n += 1
                return {"overrides": {"method.mc.k": self.n}}

            def on_trial_complete(self, trial_id, result=None, error=False):
                self.told.append((trial_id, result, error))

        return _Fake()


def test_seed_repeater_runs_each_configuration_once_per_seed_and_averages():
    from harness.search import SeedRepeater

    base = FakeSearcher(["head_acc", "fd_ref"], ["max", "min"])
    rep = SeedRepeater(base, seeds=[7, 8])
    configs = [rep.suggest(f"t{i}") for i in range(4)]
    assert [c["seed"] for c in configs] == [7, 8, 7, 8]
    assert [c["overrides"]["method.mc.k"] for c in configs] == [1, 1, 2, 2]
    assert all("__trial_index__" not in c for c in configs)
    rep.on_trial_complete("t0", {"head_acc": 0.5, "fd_ref": 10.0})
    assert base.told == []  # waits for the other seed
    rep.on_trial_complete("t1", {"head_acc": 0.7})  # fd_ref missing on one seed: mean of the rest
    assert base.told == [("t0", {"head_acc": pytest.approx(0.6), "fd_ref": 10.0}, False)]
    rep.on_trial_complete("t2", None, error=True)
    rep.on_trial_complete("t3", None, error=True)
    assert base.told[-1] == ("t2", None, True)  # every seed failed: Optuna marks it FAIL


# ---------------------------------------------------------------- a real search (slow)
def cli(*args: str, timeout: int = 900) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "harness.cli", *args], cwd=ROOT, text=True,
                          capture_output=True, timeout=timeout)


@pytest.mark.slow
def test_search_runs_optuna_and_resume_keeps_the_study(tmp_path, tiny):
    """Two sampled configurations × one seed, three objectives, ASHA on; then --resume of the
    finished search reruns nothing and leaves the SQLite study as it was."""
    import optuna

    raw = searched(tiny, metrics=["head_acc", "fd_ref", "step_time"], modes=["max", "min", "min"],
                   scheduler={"grace_period": 2})
    path = write(tmp_path, raw)
    first = cli("sweep", str(path))
    assert first.returncode == 0, first.stderr[-3000:]
    out = Path(raw["output_dir"])
    df = results.read_results(out)
    final = df[(df["split"] == "val") & df["metric"].isin(["head_acc", "fd_ref", "step_time"])]
    assert final.groupby("trial")["metric"].nunique().tolist() == [3, 3]  # every objective reported
    params = [json.loads(c)["params"] for c in df.drop_duplicates("trial")["config"]]
    assert all(set(p) == set(SPACE) for p in params)
    trials = pd.read_csv(out / "trials.csv")
    assert list(trials["status"]) == ["ok", "ok"] and trials["params"].str.contains("method.mc.k=").all()
    assert "strategy.options.damping=" in first.stdout  # the end-of-sweep table

    study = optuna.load_study(study_name="tiny", storage=f"sqlite:///{out / 'ray' / 'optuna.db'}")
    done = [t for t in study.trials if t.state == optuna.trial.TrialState.COMPLETE]
    assert len(done) == 2 and all(len(t.values) == 3 and not math.isnan(t.values[0]) for t in done)
    assert {k.removeprefix("overrides/") for k in done[0].params} == set(SPACE)

    before = {p: p.read_text() for p in (out / "ray" / "tune").glob("*/result.json")}
    again = cli("sweep", str(path), "--resume")
    assert again.returncode == 0, again.stderr[-3000:]
    assert {p: p.read_text() for p in before} == before  # nothing rerun
    assert len(optuna.load_study(study_name="tiny", storage=f"sqlite:///{out / 'ray' / 'optuna.db'}").trials) == 2
    pd.testing.assert_frame_equal(results.read_results(out).drop(columns="git_sha"), df.drop(columns="git_sha"))
