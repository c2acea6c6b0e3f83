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

import json
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


@pytest.fixture(scope="module", autouse=True)
def auth_token():
    """~/.ray/auth_token, made if missing: with RAY_AUTH_MODE=token, `ray start --head` exits 1
    and `ray up` cannot copy the token to its head without one (seen on a fresh machine, where
    no embedded ray.init had made it yet)."""
    subprocess.run([str(VENV_BIN / "ray"), "get-auth-token", "--generate"], env=venv_env(),
                   capture_output=True, check=True, timeout=120)


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


def test_relative_output_dir_in_a_job_needs_a_storage_root(tmp_path, monkeypatch):
    """Inside a Ray job (or on a joined cluster) a relative output_dir is refused before anything
    runs, naming the field, the file and the fix; a storage root or an absolute path is used."""
    from harness.config import ConfigError, load
    from harness.sweep import resolve_output, under_storage

    path = tmp_path / "s.yaml"
    path.write_text(yaml.safe_dump({"name": "s", "output_dir": "results/s", "strategies": ["sum"]}))
    cfg = load(path).config
    monkeypatch.delenv("GENREP_STORAGE", raising=False)
    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    monkeypatch.delenv("RAY_JOB_CONFIG_JSON_ENV_VAR", raising=False)
    assert resolve_output(cfg) is cfg  # embedded: relative to the current directory, as ever
    for joined in ({"address": "127.0.0.1:6379"}, {}):
        if not joined:
            monkeypatch.setenv("RAY_JOB_CONFIG_JSON_ENV_VAR", "{}")
        with pytest.raises(ConfigError) as err:
            resolve_output(cfg, **joined)
        assert all(w in str(err.value) for w in ("output_dir", str(path), "GENREP_STORAGE", "--storage"))
    assert resolve_output(cfg, storage=str(tmp_path)).output_dir == str(tmp_path / "results/s")
    monkeypatch.setenv("GENREP_STORAGE", str(tmp_path / "root"))
    assert resolve_output(cfg).output_dir == str(tmp_path / "root/results/s")
    assert under_storage("results/s") == tmp_path / "root/results/s"  # report and --resume
    with pytest.raises(ConfigError, match="absolute"):
        resolve_output(cfg, storage="relative/root")
    path.write_text(yaml.safe_dump({"name": "s", "output_dir": str(tmp_path / "abs"), "strategies": ["sum"]}))
    absolute = load(path).config
    assert resolve_output(absolute).output_dir == str(tmp_path / "abs")


def job_submit(address: str, job_dir: Path, *command: str, env_vars: dict | None = None):
    runtime = ["--runtime-env-json", json.dumps({"env_vars": env_vars})] if env_vars else []
    return subprocess.run([str(VENV_BIN / "ray"), "job", "submit", "--address", address,
                           "--working-dir", str(job_dir), *runtime, "--", *command],
                          env=venv_env(), capture_output=True, text=True, timeout=900)


@pytest.mark.slow
def test_job_with_relative_output_dir_writes_under_the_storage_root(tmp_path, tiny):
    """`ray job submit --working-dir` of a sweep file to a started head runs the sweep there.
    With a relative output_dir it is refused (before training) without a storage root; with
    GENREP_STORAGE the job succeeds, the results land under it, the log's first and last lines
    say where, Tune's TensorBoard event files are there, and `report --storage` finds them."""
    raw = tiny(strategies=["sum"], output_dir="results/tiny")
    job_dir = tmp_path / "job"
    job_dir.mkdir()
    (job_dir / "tiny.yaml").write_text(yaml.safe_dump(raw))
    storage = tmp_path / "storage"
    temp_dir = tempfile.mkdtemp(prefix="rj", dir="/tmp")
    dashboard = free_port()
    address = f"http://127.0.0.1:{dashboard}"
    head = start_head(temp_dir, free_port(), dashboard)
    try:
        wait_for_jobs_api(address, head)
        refused = job_submit(address, job_dir, "genrep-bench", "sweep", "tiny.yaml")
        job = job_submit(address, job_dir, "genrep-bench", "sweep", "tiny.yaml",
                         env_vars={"GENREP_STORAGE": str(storage)})
    finally:
        stop_head(head)
        shutil.rmtree(temp_dir, ignore_errors=True)
    assert refused.returncode != 0 and "trial start" not in refused.stdout
    assert "output_dir: 'results/tiny' is relative" in refused.stdout, refused.stdout[-3000:]
    assert "tiny.yaml" in refused.stdout and "GENREP_STORAGE" in refused.stdout
    assert job.returncode == 0, job.stdout[-4000:] + job.stderr[-2000:]
    assert "succeeded" in job.stdout, job.stdout[-2000:]
    out = storage / "results" / "tiny"
    ours = [line for line in job.stdout.splitlines() if str(out) in line]
    assert "results in" in ours[0] and ours[-1].strip().endswith(f"results in {out}"), ours
    df = results.read_results(out)
    assert set(df["status"]) == {"ok"} and set(df["split"]) == {"train", "val"}
    assert list((out / "ray" / "tune").glob("*/events.out.tfevents.*")), "no TensorBoard events"
    report = subprocess.run([str(VENV_BIN / "genrep-bench"), "report", "results/tiny",
                             "--storage", str(storage)], capture_output=True, text=True,
                            cwd=tmp_path, env=venv_env(), timeout=300)
    assert report.returncode == 0, report.stderr[-2000:]
    assert f"HTML report: {out / 'report' / 'report.html'}" in report.stdout
    assert (out / "report" / "report.html").exists()


SSHD_CONFIG = """Port 22
ListenAddress 127.0.0.1
HostKey {d}/host_key
AuthorizedKeysFile {d}/authorized_keys
PermitRootLogin prohibit-password
PasswordAuthentication no
KbdInteractiveAuthentication no
UsePAM no
StrictModes no
PidFile {d}/sshd.pid
SetEnv GENREP_REPO={repo}
"""


def sshd_or_skip() -> str:
    """Debian's sshd, installed when missing (as root, through apt); a skip with the reason when
    it cannot be had or port 22 on loopback is taken (Ray's launcher has no SSH port setting)."""
    sshd = shutil.which("sshd") or "/usr/sbin/sshd"
    if not Path(sshd).exists() and os.geteuid() == 0 and shutil.which("apt-get"):
        subprocess.run(["apt-get", "install", "-y", "-q", "openssh-server", "rsync"], capture_output=True,
                       env={**os.environ, "DEBIAN_FRONTEND": "noninteractive"}, timeout=600)
    if not Path(sshd).exists() or not shutil.which("rsync") or not shutil.which("unshare"):
        pytest.skip("needs sshd (openssh-server), rsync and unshare; could not install them")
    import socket
    with socket.socket() as sock:
        if sock.connect_ex(("127.0.0.1", 22)) == 0:
            pytest.skip("127.0.0.1:22 is taken: the launcher's SSH goes to port 22")
    return sshd


def start_private_sshd(sshd: str, d: Path) -> subprocess.Popen:
    """sshd on 127.0.0.1:22 for root with a key of its own, in its own PID namespace with a private
    /tmp/ray: whatever `ray up`/`ray submit`/`ray down` run through it (`ray down` runs `ray stop`,
    which ends every Ray process its user may signal) sees only this namespace's processes."""
    subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", str(d / "key")], check=True)
    subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", str(d / "host_key")], check=True)
    shutil.copy(d / "key.pub", d / "authorized_keys")
    (d / "sshd_config").write_text(SSHD_CONFIG.format(d=d, repo=ROOT))
    Path("/run/sshd").mkdir(exist_ok=True)
    Path("/tmp/ray").mkdir(exist_ok=True)
    inner = f"mount -t tmpfs tmpfs /tmp/ray && exec {sshd} -D -e -f {d}/sshd_config"
    namespace = ["unshare", "--pid", "--fork", "--kill-child", "--mount-proc", "--propagation", "private"]
    proc = subprocess.Popen([*namespace, "sh", "-c", inner], stdout=subprocess.DEVNULL,
                            stderr=open(d / "sshd.log", "w"), start_new_session=True)
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline and proc.poll() is None:
        ok = subprocess.run(["ssh", "-i", str(d / "key"), "-o", "StrictHostKeyChecking=no",
                             "-o", f"UserKnownHostsFile={d}/known_hosts", "-o", "BatchMode=yes",
                             "root@127.0.0.1", "true"], capture_output=True, timeout=30)
        if ok.returncode == 0:
            return proc
        time.sleep(1)
    stop_private_sshd(proc)
    pytest.skip(f"sshd on loopback did not accept the key: {(d / 'sshd.log').read_text()[-500:]}")


def stop_private_sshd(proc: subprocess.Popen) -> None:
    """SIGKILL to the namespace's process group: unshare ignores SIGTERM while it waits, and its
    child, the namespace's init, takes every process of the namespace with it (--kill-child)."""
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass
    proc.wait(timeout=30)


def render_local_config(d: Path) -> Path:
    """cluster/local.yaml with this checkout, the test's key and free ports."""
    ports = (f"--port={free_port()} --dashboard-port={free_port()} --ray-client-server-port={free_port()}"
             f" --dashboard-agent-listen-port={free_port()} --runtime-env-agent-port={free_port()}"
             f" --metrics-export-port={free_port()}")
    text = ((ROOT / "cluster" / "local.yaml").read_text()
            .replace("/path/to/genrep-bench", str(ROOT)).replace("~/.ssh/genrep_local", str(d / "key"))
            .replace("--port=6379", ports))
    (d / "cluster.yaml").write_text(text)
    return d / "cluster.yaml"


@pytest.mark.slow
def test_ray_up_submit_down_on_the_local_launcher(tmp_path, tiny):
    """`ray up` (local provider, SSH to 127.0.0.1), `ray submit` of scripts/ray_submit_sweep.py
    with a sweep path relative to the repository, the results checked, `ray down`."""
    sshd = sshd_or_skip()
    d = Path(tempfile.mkdtemp(prefix="rl", dir="/tmp"))
    raw = tiny(strategies=["sum"])
    sweep = tmp_path / "tiny.yaml"
    sweep.write_text(yaml.safe_dump(raw))
    home = Path.home()
    # what the launcher leaves in the (shared) home directory: removed after, unless already there
    made = [f for f in (home / "ray_bootstrap_config.yaml", home / "ray_bootstrap_key.pem",
                        home / "ray_submit_sweep.py") if not f.exists()]
    server = start_private_sshd(sshd, d)
    config = render_local_config(d)
    ray = str(VENV_BIN / "ray")
    try:
        up = subprocess.run([ray, "up", "-y", "--no-config-cache", str(config)], env=venv_env(),
                            cwd=ROOT, capture_output=True, text=True, timeout=600)
        assert up.returncode == 0, up.stdout[-3000:] + up.stderr[-3000:]
        submit = subprocess.run([ray, "submit", str(config), "scripts/ray_submit_sweep.py",
                                 os.path.relpath(sweep, ROOT)], env=venv_env(), cwd=ROOT,
                                capture_output=True, text=True, timeout=900)
    finally:
        down = subprocess.run([ray, "down", "-y", str(config)], env=venv_env(), cwd=ROOT,
                              capture_output=True, text=True, timeout=300)
        stop_private_sshd(server)
        for f in made:
            f.unlink(missing_ok=True)
        shutil.rmtree(d, ignore_errors=True)
    assert submit.returncode == 0, submit.stdout[-4000:] + submit.stderr[-2000:]
    assert f"results in {raw['output_dir']}" in submit.stdout
    df = results.read_results(raw["output_dir"])
    assert set(df["status"]) == {"ok"} and set(df["split"]) == {"train", "val"}
    assert down.returncode == 0, down.stdout[-2000:] + down.stderr[-2000:]


TWO_NODES = """
import sys, ray
from ray.cluster_utils import Cluster
from harness.config import load
from harness.sweep import run_sweep
path, dashboard, gcs = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
# no node_ip_address=127.0.0.1: the nodes' GCS would then listen on loopback only, while
# ray.init(address="127.0.0.1:port") rewrites loopback to the machine's own address
cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 1, "include_dashboard": True,
    "dashboard_host": "127.0.0.1", "dashboard_port": dashboard, "gcs_server_port": gcs})
try:
    cluster.add_node(num_cpus=1)
    cluster.wait_for_nodes()
    run_sweep(load(path), address=cluster.address)
    alive = [n for n in ray.nodes() if n["Alive"]]
    print("NODES", len(alive), sorted(n["Resources"]["CPU"] for n in alive))
finally:
    ray.shutdown()
    cluster.shutdown()
"""


@pytest.mark.slow
def test_two_node_cluster_strict_spread_trial(tmp_path, tiny):
    """In a fresh process: Ray reads RAY_AUTH_MODE once per process, and the simulated nodes
    (started from the test's process) and its client must agree on token auth. The trial also
    runs with a quarter of the labels (data.labelled_fraction): each rank's loader drops the
    others' labels, the results carry the fraction and the labelled share of the batches."""
    raw = tiny(strategies=["sum"], resources={"workers": 2, "cpus_per_worker": 0.99,
                                              "placement": "STRICT_SPREAD", "max_concurrent": 1},
               data={"labelled_fraction": 0.25})
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
    assert {json.loads(c)["data"]["labelled_fraction"] for c in df["config"]} == {0.25}
    labelled = df.loc[(df.split == "train") & (df.metric == "labelled"), "value"]
    assert len(labelled) and (labelled < 0.75).all()  # batches of 8: a quarter, never all
