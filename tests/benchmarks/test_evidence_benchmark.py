"""Smoke run of the evidence benchmark: both implementations agree on L_K at tiny settings."""

import argparse
import importlib.util
import json
from pathlib import Path

import torch

SCRIPT = Path(__file__).resolve().parents[2] / "benchmarks" / "evidence.py"


def _load():
    spec = importlib.util.spec_from_file_location("evidence_benchmark", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_evidence_benchmark_tiny(capsys):
    bench = _load()
    threads = torch.get_num_threads()
    argv = ["--ks", "8", "--num-images", "10", "--repeats", "1", "--threads", "1"]
    assert bench.main([*argv, "--no-memory", "--json"]) == 0
    assert torch.get_num_threads() == threads  # restored
    figures = json.loads(capsys.readouterr().out)
    (row,) = figures["rows"]
    assert row["num_samples"] == 8 and row["throughput_ratio"] > 0
    # same model, same images, K = 8: the two estimates differ only by Monte-Carlo noise
    assert abs(row["elbo-lab_lk_per_image"] - row["plain_lk_per_image"]) < 2.0


def test_plain_iwae_matches_elbo_lab_with_many_draws():
    """The plain-PyTorch L_K and inference.evidence.iwae estimate the same quantity."""
    bench = _load()
    vae, x, _ = bench.setup(None, 5, seed=0)
    plain = float(bench.plain_iwae(vae, x, 2000, 500).sum())
    ours = bench.iwae(vae.model, vae.guide, x, num_samples=2000)
    assert abs(plain - ours.lk) < 5 * 2**0.5 * ours.stderr + 1e-3


def test_memory_measurement_in_process():
    bench = _load()
    args = argparse.Namespace(run_dir=None, num_images=10, seed=0, chunk_size=4)
    record = bench.measure_memory("elbo-lab", 8, args)
    assert record["extra_mib"] >= 0 and record["num_samples"] == 8
