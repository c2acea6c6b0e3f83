"""Run a sweep on a launched cluster's head: ``ray submit CLUSTER.yaml scripts/ray_submit_sweep.py
SWEEP.yaml [genrep-bench sweep options]``.

``ray submit`` copies this file to the head's home directory and runs it with whatever ``python``
the head's login shell finds, so it needs nothing but the standard library: it changes to the
repository on the head (``GENREP_REPO``, default ``~/genrep-bench``, where cluster/example-gpu.yaml
syncs it) so that ``SWEEP.yaml`` is relative to the repository root, and runs the repository
venv's ``genrep-bench sweep`` there, joined to the running cluster (``--address auto``). A
relative ``output_dir`` goes under ``GENREP_STORAGE`` when set, else under the repository on the
head (results outlive the job, not ``ray down`` of a cloud head: use shared storage there).
"""
import os
import sys
from pathlib import Path


def main(argv: list[str]) -> int:
    if not argv or argv[0] in ("-h", "--help"):
        print(__doc__)
        return 2
    repo = Path(os.environ.get("GENREP_REPO", "~/genrep-bench")).expanduser()
    exe = repo / ".venv" / "bin" / "genrep-bench"
    if not exe.exists():
        print(f"error: {exe} not found: set GENREP_REPO to the repository on the head "
              "(with its .venv: scripts/setup.sh)", file=sys.stderr)
        return 2
    os.chdir(repo)
    os.environ.setdefault("GENREP_STORAGE", str(repo))
    os.environ.setdefault("RAY_AUTH_MODE", "token")
    # the venv's bin first: Ray's workers started for this driver use the venv's python too
    os.environ["PATH"] = f"{exe.parent}{os.pathsep}{os.environ.get('PATH', '')}"
    args = [str(exe), "sweep", argv[0], "--address", "auto", *argv[1:]]
    print(f"{repo}$ {' '.join(args)}", flush=True)
    os.execv(args[0], args)


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
