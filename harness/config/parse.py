"""Sweep files in: YAML, read and parsed once per command, into a validated :class:`SweepConfig`.

:func:`load` reads the file with a safe loader that also refuses a key given twice, and returns the
typed config together with the mapping it was built from: a command passes both down (the resume
guard snapshots the mapping, harness.sweep.check_same_sweep) instead of reading the file again.
:func:`from_dict` validates a mapping: each field by its type and declared range
(:mod:`harness.config.convert`), then every rule across fields (:mod:`harness.config.checks`).
The rebuilders of a trial's and a pre-registration's config check fields only, in pure Python.
"""
from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any, NamedTuple

import yaml

from harness.config import checks
from harness.config.convert import ConfigError, build
from harness.config.schema import TrialConfig
from harness.config.sweep_schema import PreregistrationConfig, SweepConfig


class Loaded(NamedTuple):
    """A sweep file, read once: its validated config and the mapping it was parsed into."""

    config: SweepConfig
    raw: dict[str, Any]


def from_dict(raw: dict[str, Any], where: str = "<dict>") -> SweepConfig:
    """A validated :class:`SweepConfig` from a plain mapping (the parsed YAML); ``where`` names
    the source in every error and becomes ``source_file``."""
    cfg = dataclasses.replace(build(SweepConfig, raw, "", where), source_file=where)
    checks.cross_checks(cfg, where)
    return cfg


class _UniqueKeyLoader(yaml.SafeLoader):
    """``yaml.safe_load`` that refuses a key given twice in one mapping: plain YAML keeps the last
    one silently, so ``train: {steps: 4}`` further down a file would quietly win."""

    def construct_mapping(self, node, deep=False):
        seen = set()
        for key_node, _ in node.value:
            key = self.construct_object(key_node, deep=deep)
            if not isinstance(key, (str, int, float, bool)):
                continue  # an unhashable key: construct_mapping itself reports it
            if key in seen:
                raise yaml.constructor.ConstructorError(
                    "while constructing a mapping", node.start_mark, f"duplicate key {key!r}",
                    key_node.start_mark)
            seen.add(key)
        return super().construct_mapping(node, deep)


def load(path: str | Path) -> Loaded:
    """Read, parse (safe YAML, no duplicate keys) and validate a sweep file, once."""
    path = Path(path)
    try:
        raw = yaml.load(path.read_text(), Loader=_UniqueKeyLoader)  # noqa: S506 (a SafeLoader)
    except FileNotFoundError:
        raise ConfigError(f"{path}: no such sweep file") from None
    except yaml.YAMLError as e:
        raise ConfigError(f"{path}: malformed YAML: {e}") from None
    raw = raw if raw is not None else {}
    return Loaded(from_dict(raw, str(path)), raw)


def trial_from_dict(raw: dict[str, Any]) -> TrialConfig:
    """Rebuild a :class:`TrialConfig` from :meth:`TrialConfig.to_dict` (it crosses Ray as a dict).

    Field types and ranges only, in pure Python: the sweep-level checks (strategies, options, the
    model, combinations) ran once, at the driver, and importing genrep here would cost every Tune
    trainable a torch import."""
    return build(TrialConfig, raw, "", "<trial>")


def preregistration_from_dict(raw: dict[str, Any], where: str = "<results>") -> PreregistrationConfig:
    """The typed section back from a result row's config JSON (fields and ranges; the arms were
    checked against the sweep when it was loaded)."""
    return build(PreregistrationConfig, raw, "preregistration", where)
