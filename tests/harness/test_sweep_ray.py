"""An embedded cluster beside another Ray instance on the same machine.

Ray's state API, which Ray Train V2's placement-group cleaner uses to see whether a trial's
controller is alive, finds "its" cluster by grepping ``ps`` when it is given no address, and fails
when two run on one machine; the trial's workers' placement group then leaks and later trials
stall (docs/sweeps.md, "One Ray instance per machine"). ``init_ray`` tells every process of the
embedded cluster its own address. Real Ray instances, in subprocesses so this process's Ray
(other tests') is not touched.
"""
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from harness.ports import free_port
from harness.sweep import other_ray_note

ROOT = Path(__file__).resolve().parents[2]

OTHER = "import ray, sys; ray.init(address='local', include_dashboard=False); print('up', flush=True); sys.stdin.read()"

PROBE = textwrap.dedent("""
    import ray
    from harness.sweep import init_ray
    init_ray()

    @ray.remote(num_cpus=0)
    def state_api():  # what Ray Train's PlacementGroupCleaner does, from inside a Ray process
        from ray.util.state import list_actors
        return len(list_actors(limit=5))

    print("state api ok", ray.get(state_api.remote()), flush=True)
""")


def test_no_other_instance_no_note():
    assert other_ray_note([]) is None


def test_other_instances_are_named_and_the_docs_explain(caplog):
    text = other_ray_note(["127.0.0.1:6379", "127.0.0.1:6380"])
    assert "2 other Ray instance(s)" in text and "127.0.0.1:6380" in text
    assert "## One Ray instance per machine" in (ROOT / "docs" / "sweeps.md").read_text()


def test_free_port_is_bindable():
    import socket

    port = free_port()
    with socket.socket() as s:
        s.bind(("", port))


@pytest.mark.slow
def test_the_state_api_finds_its_cluster_beside_another_instance():
    other = subprocess.Popen([sys.executable, "-c", OTHER], stdin=subprocess.PIPE,
                             stdout=subprocess.PIPE, text=True, cwd=ROOT)
    try:
        assert other.stdout.readline().strip() == "up"
        probe = subprocess.run([sys.executable, "-c", PROBE], capture_output=True, text=True,
                               cwd=ROOT, timeout=240)
        assert "state api ok" in probe.stdout, probe.stderr[-3000:]
    finally:
        other.stdin.close()
        other.wait(timeout=60)
