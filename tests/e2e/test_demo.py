"""The README's first command must keep working."""

from __future__ import annotations

import subprocess
import sys


def test_demo_runs_and_checks_itself(tmp_path):
    res = subprocess.run([sys.executable, "-m", "kakehashi", "demo", "--bytes", "3000000"],
                         capture_output=True, timeout=120, cwd=tmp_path,
                         env={"PATH": "/usr/bin:/bin", "HOME": str(tmp_path),
                              "PYTHONPATH": ":".join(sys.path)})
    out = res.stdout.decode()
    assert res.returncode == 0, out + res.stderr.decode()
    assert "matches" in out and "refused" in out and "done" in out
