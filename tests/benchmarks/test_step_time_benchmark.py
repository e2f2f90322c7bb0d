"""Smoke run of the step-time benchmark: every implementation runs and the Pyro losses equal the
plain-PyTorch loss for shared noise and weights."""

import importlib.util
import re
import sys
from pathlib import Path

SCRIPT = Path(__file__).resolve().parents[2] / "benchmarks" / "step_time.py"


def test_step_time_benchmark_tiny(capsys, monkeypatch):
    spec = importlib.util.spec_from_file_location("step_time_benchmark", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    monkeypatch.setattr(sys, "path", list(sys.path))  # the script prepends the repository root
    spec.loader.exec_module(module)
    module.main(["--reps", "1", "--batch-sizes", "256", "--threads", "1"])
    out = capsys.readouterr().out
    diffs = re.findall(r"\|rel\. diff\| = (\S+)", out)
    assert len(diffs) == 5 and all(float(d) < 1e-12 for d in diffs), out
    for name in ("torch fused", "elbo-lab eager", "pyro SVI"):
        assert re.search(rf"^  {name} +[\d.]+ ", out, re.M), name
