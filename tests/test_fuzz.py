"""The readers' fuzz harnesses (fuzz/, atheris): each runs 10^4 inputs here and must end without a crash,
that is, every input either reads or is refused with an ActTailError. Longer runs (10^6 inputs each) are
recorded in reports/fuzz/README.md."""

from __future__ import annotations

import os
import re
import resource
import subprocess
import sys
from pathlib import Path

import pytest

FUZZ = Path(__file__).resolve().parents[1] / "fuzz"
HARNESSES = ["safetensors_reader", "gguf_reader", "plan_reader", "analysis_reader", "config_reader"]
RUNS = 10_000
RSS_MB = 2048  # libFuzzer's default memory limit for one harness


def rss_limit_mb() -> int:
    """libFuzzer's -rss_limit_mb for a harness started from this process: it checks the peak RSS the kernel
    reports (getrusage), and a forked child starts with its parent's peak, so a pytest process that once held
    6 GB (a model test) would make every input look like an out-of-memory. The harness may use RSS_MB over it."""
    peak_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss // 1024  # Linux: kilobytes
    return peak_mb + RSS_MB

try:
    import atheris  # noqa: F401
except ImportError:  # atheris ships wheels for Linux and macOS only (setup.cfg's dev extra)
    atheris = None


def test_every_harness_is_run_here():
    assert sorted(HARNESSES) == sorted(p.stem for p in FUZZ.glob("*.py") if p.stem != "common")


@pytest.mark.skipif(atheris is None, reason="atheris is not installed (pip install atheris: wheels for Linux "
                                            "and macOS), so the fuzz harnesses cannot run")
@pytest.mark.parametrize("harness", HARNESSES)
def test_harness_finds_no_crash(harness, tmp_path):
    env = {**os.environ, "ACTTAIL_FUZZ_SCRATCH": str(tmp_path), "PYTHONHASHSEED": "0"}
    env.pop("ACTTAIL_CACHE", None)  # the harness sets its own, in its scratch folder
    cmd = [sys.executable, str(FUZZ / f"{harness}.py"), f"-runs={RUNS}", "-seed=1", "-timeout=60",
           "-max_total_time=400", f"-rss_limit_mb={rss_limit_mb()}", f"-artifact_prefix={tmp_path}/", str(tmp_path / "corpus")]
    done = subprocess.run(cmd, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600)
    log = done.stdout + done.stderr
    tail = "\n".join(line for line in log.splitlines() if not line.startswith("INFO: Instrumenting"))[-4000:]
    crashes = [p.name for p in tmp_path.iterdir() if re.match(r"(crash|timeout|oom|leak)-", p.name)]
    assert done.returncode == 0 and not crashes, f"{harness}: {crashes}\n{tail}"
    assert f"Done {RUNS} runs" in log, tail  # all of them, not stopped by the time limit
