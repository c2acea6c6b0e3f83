"""The cluster path on one machine: what differs on a real cluster is only the sweep file.

- ``ray start --head`` (the venv's ray) + ``ray job submit --working-dir`` of a sweep file: the job
  runs ``genrep-bench sweep`` against that cluster (RAY_ADDRESS is set for the job's driver) and
  writes results.parquet. The head is stopped through the process we started (``--block``), never
  with ``ray stop``, which would stop every Ray on the machine, other people's included.
- ``ray.cluster_utils.Cluster`` with two 1-CPU nodes: a trial with 2 workers under STRICT_SPREAD
  trains and reports. Each node has 1 CPU and each worker takes 0.99, so the run finishing proves
  the two workers ran on different nodes.
"""
from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest
import yaml

from harness import results
from tests.conftest import ROOT, free_port

VENV_BIN = Path(sys.executable).parent


def venv_env() -> dict[str, str]:
    """The venv's bin first on PATH: `ray start` then runs workers and job drivers with the
    venv's python, and the job finds `genrep-bench`. RAY_AUTH_MODE=token: a new head enables
    token auth by itself, but the jobs CLI only sends ~/.ray/auth_token when told to."""
    return {**os.environ, "PATH": f"{VENV_BIN}{os.pathsep}{os.environ.get('PATH', '')}",
            "RAY_TRAIN_V2_ENABLED": "1", "RAY_AUTH_MODE": "token"}


def start_head(temp_dir: str, gcs: int, dashboard: int) -> subprocess.Popen:
    args = [str(VENV_BIN / "ray"), "start", "--head", "--block", "--node-ip-address=127.0.0.1",
            f"--port={gcs}", "--dashboard-host=127.0.0.1", f"--dashboard-port={dashboard}",
            "--include-dashboard=true", "--num-cpus=2", f"--temp-dir={temp_dir}",
            f"--ray-client-server-port={free_port()}", f"--dashboard-agent-listen-port={free_port()}",
            f"--runtime-env-agent-port={free_port()}", f"--metrics-export-port={free_port()}"]
    return subprocess.Popen(args, env=venv_env(), stdout=subprocess.DEVNULL, stderr=subprocess.STDOUT,
                            start_new_session=True)  # its own process group, ended by its id


def stop_head(proc: subprocess.Popen) -> None:
    """SIGTERM to `ray start --block` (it stops the processes it started), then SIGKILL to
    whatever is left in its process group."""
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout=60)
        except subprocess.TimeoutExpired:
            pass
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass


def wait_for_jobs_api(address: str, head: subprocess.Popen, timeout: float = 180) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if head.poll() is not None:
            raise AssertionError(f"ray start exited with {head.returncode}")
        ok = subprocess.run([str(VENV_BIN / "ray"), "job", "list", "--address", address],
                            env=venv_env(), capture_output=True, timeout=60)
        if ok.returncode == 0:
            return
        time.sleep(3)
    raise AssertionError(f"the jobs API at {address} did not come up")


def test_cluster_launcher_example_has_the_pieces_the_docs_promise():
    """cluster/example-gpu.yaml (never launched here): CUDA setup through scripts/setup.sh, the
    venv's ray on every node, token auth on and the token shipped, dashboard on loopback only."""
    cfg = yaml.safe_load((ROOT / "cluster" / "example-gpu.yaml").read_text())
    setup = " ".join(cfg["setup_commands"])
    assert "bash scripts/setup.sh" in setup and "download.pytorch.org/whl/cu" in setup
    for key in ("head_start_ray_commands", "worker_start_ray_commands"):
        start = " ".join(cfg[key])
        assert "RAY_AUTH_MODE=token" in start and ".venv/bin:$PATH" in start, key
        assert "disabled" not in start, key
    assert "--dashboard-host=127.0.0.1" in " ".join(cfg["head_start_ray_commands"])
    assert "~/.ray/auth_token" in cfg["file_mounts"]
    assert cfg["available_node_types"][cfg["head_node_type"]]


@pytest.mark.slow
def test_job_submit_runs_a_sweep_on_a_started_head(tmp_path, tiny):
    raw = tiny(strategies=["sum"])
    job_dir = tmp_path / "job"  # uploaded as the job's working dir: just the sweep file
    job_dir.mkdir()
    (job_dir / "tiny.yaml").write_text(yaml.safe_dump(raw))
    temp_dir = tempfile.mkdtemp(prefix="rj", dir="/tmp")  # short: unix socket paths are capped
    dashboard = free_port()
    address = f"http://127.0.0.1:{dashboard}"
    head = start_head(temp_dir, free_port(), dashboard)
    try:
        wait_for_jobs_api(address, head)
        job = subprocess.run([str(VENV_BIN / "ray"), "job", "submit", "--address", address,
                              "--working-dir", str(job_dir), "--", "genrep-bench", "sweep", "tiny.yaml"],
                             env=venv_env(), capture_output=True, text=True, timeout=900)
    finally:
        stop_head(head)
        shutil.rmtree(temp_dir, ignore_errors=True)
    assert job.returncode == 0, job.stdout[-4000:] + job.stderr[-2000:]
    assert "succeeded" in job.stdout, job.stdout[-2000:]
    df = results.read_results(raw["output_dir"])
    assert set(df["status"]) == {"ok"} and set(df["split"]) == {"train", "val"}


TWO_NODES = """
import sys, ray
from ray.cluster_utils import Cluster
from harness.sweep import run_sweep
path, dashboard, gcs = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
# no node_ip_address=127.0.0.1: the nodes' GCS would then listen on loopback only, while
# ray.init(address="127.0.0.1:port") rewrites loopback to the machine's own address
cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 1, "include_dashboard": True,
    "dashboard_host": "127.0.0.1", "dashboard_port": dashboard, "gcs_server_port": gcs})
try:
    cluster.add_node(num_cpus=1)
    cluster.wait_for_nodes()
    run_sweep(path, address=cluster.address)
    alive = [n for n in ray.nodes() if n["Alive"]]
    print("NODES", len(alive), sorted(n["Resources"]["CPU"] for n in alive))
finally:
    ray.shutdown()
    cluster.shutdown()
"""


@pytest.mark.slow
def test_two_node_cluster_strict_spread_trial(tmp_path, tiny):
    """In a fresh process: Ray reads RAY_AUTH_MODE once per process, and the simulated nodes
    (started from the test's process) and its client must agree on token auth."""
    raw = tiny(strategies=["sum"], resources={"workers": 2, "cpus_per_worker": 0.99,
                                              "placement": "STRICT_SPREAD", "max_concurrent": 1})
    path = tmp_path / "two_nodes.yaml"
    path.write_text(yaml.safe_dump(raw))
    run = subprocess.run([sys.executable, "-c", TWO_NODES, str(path), str(free_port()), str(free_port())],
                         env=venv_env(), capture_output=True, text=True, timeout=900, cwd=ROOT)
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    assert "NODES 2 [1.0, 1.0]" in run.stdout
    df = results.read_results(raw["output_dir"])
    assert set(df["status"]) == {"ok"}, df["error"].iloc[0]
    assert {(r.split, r.step) for r in df[df.metric == "loss_gen"].itertuples()} == {("train", 2), ("train", 4)}
    assert df.loc[df.metric == "head_acc", "value"].notna().all()
    assert df.loc[df.metric == "head_acc", "cfg.resources.workers"].eq("2").all()
