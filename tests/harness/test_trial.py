"""What the Tune trainable and the Train controller import (their processes run per trial)."""
from __future__ import annotations

import subprocess
import sys

from tests.conftest import ROOT


def test_trial_module_imports_none_of_the_worker_stack():
    """harness.trial is imported by the Tune trainable and, through the pickled train_loop, by the
    Train controller: neither process needs torch, DeepSpeed, diffusers or webdataset from it."""
    code = ("import sys, harness.trial as t; t.train_loop; "
            "print(sorted(m for m in ('torch', 'deepspeed', 'diffusers', 'webdataset') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT,
                         timeout=120)
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.strip() == "[]"

