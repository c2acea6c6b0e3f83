"""The warning about other Ray instances on the machine (Ray Train V2's placement-group cleaner)."""
from pathlib import Path

from harness.sweep import _gcs_addresses, warn_other_ray

DOCS = Path(__file__).resolve().parents[2] / "docs" / "sweeps.md"


def test_no_other_instance_no_warning():
    assert warn_other_ray([]) is None


def test_other_instances_are_named_and_the_docs_explain(caplog):
    text = warn_other_ray(["127.0.0.1:6379", "127.0.0.1:6380"])
    assert "2 other Ray instance(s)" in text and "127.0.0.1:6380" in text
    assert text in caplog.text
    assert "## One Ray instance per machine" in DOCS.read_text()


def test_gcs_addresses_reads_the_process_table():
    found = _gcs_addresses()  # real ps grep: whatever runs now, a sorted list of host:port
    assert found == sorted(found) and all(":" in a for a in found)
