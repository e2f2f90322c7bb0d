"""Smoke runs of the peer and whole-process benchmarks: each script runs at a tiny size and
prints the figures it promises; the NumPyro peer skips cleanly without NumPyro."""

import importlib.util
import math
import re
import sys
from pathlib import Path

import pytest

BENCH = Path(__file__).resolve().parents[2] / "benchmarks"


def _load(name: str, monkeypatch):
    spec = importlib.util.spec_from_file_location(f"{name}_benchmark", BENCH / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    monkeypatch.setattr(sys, "path", list(sys.path))  # the scripts prepend the repository root
    spec.loader.exec_module(module)
    return module


def _final_loss(out: str) -> float:
    return float(re.search(r"final test loss (\S+) nats/image", out).group(1))


def test_plain_vae_trains_and_times_a_step(capsys, monkeypatch):
    plain = _load("plain_vae", monkeypatch)
    plain.main(["--epochs", "1", "--threads", "1"])
    out = capsys.readouterr().out
    assert "====> Epoch: 1 train loss:" in out
    # one epoch moves the test -ELBO below the untrained decoder's 64 log 2 = 44.4 nats
    assert 0 < _final_loss(out) < 64 * math.log(2)
    plain.main(["--time-steps", "2", "--synthetic", "300", "--data-dim", "20", "--hidden", "8"])
    assert float(capsys.readouterr().out.split()[-1]) > 0


def test_plain_vae_loss_is_the_analytic_kl_elbo(monkeypatch):
    """loss_function = BCE + KL(N(m, s^2) || N(0, 1)), checked against torch.distributions."""
    import torch
    from torch.distributions import Bernoulli, Normal, kl_divergence

    plain = _load("plain_vae", monkeypatch)
    g = torch.Generator().manual_seed(0)
    x = (torch.rand(5, 7, generator=g) < 0.5).float()
    logits, loc, log_scale = (torch.randn(5, n, generator=g) for n in (7, 3, 3))
    expected = (
        -Bernoulli(logits=logits).log_prob(x).sum()
        + kl_divergence(Normal(loc, log_scale.exp()), Normal(0.0, 1.0)).sum()
    )
    assert torch.allclose(plain.loss_function(logits, x, loc, log_scale), expected, rtol=1e-6)


def test_numpyro_peer_skips_cleanly_without_numpyro(capsys, monkeypatch):
    peer = _load("numpyro_vae", monkeypatch)
    monkeypatch.setitem(sys.modules, "numpyro", None)  # import numpyro raises ImportError
    assert peer.main(["--epochs", "1"]) == 0
    assert "skipped, NumPyro/JAX not installed" in capsys.readouterr().out


def test_numpyro_peer_times_a_step(capsys, monkeypatch):
    pytest.importorskip("numpyro")
    pytest.importorskip("jax")
    peer = _load("numpyro_vae", monkeypatch)
    args = ["--time-steps", "2", "--synthetic", "300", "--data-dim", "20", "--hidden", "8"]
    assert peer.main([*args, "--latent", "2"]) == 0
    assert float(capsys.readouterr().out.split("step_ms")[-1]) > 0


def test_whole_run_prints_medians_and_ratios(capsys, monkeypatch):
    whole = _load("whole_run", monkeypatch)
    result = whole.main(["--epochs", "1", "--rounds", "1", "--programs", "plain"])
    out = capsys.readouterr().out
    assert "ratios to plain PyTorch" in out and result["plain"]["wall"]["ratios"][:2] == [1.0, 1.0]


def test_whole_run_step_mode_times_elbo_lab_from_fit(monkeypatch):
    whole = _load("whole_run", monkeypatch)
    assert whole._elbo_lab_step(data_dim=6, hidden=4, latent=2, steps=2) > 0


def test_threads_benchmark_runs(capsys, monkeypatch):
    threads = _load("threads", monkeypatch)
    argv = ["--epochs", "1", "--rounds", "1", "--loads", "quiet", "--configs", "1 thread"]
    summary = threads.main([*argv, "--extra", "--hidden-dims 8"])
    assert summary["quiet/1 thread"]["steps"] > 0


def test_train_as_a_program_writes_the_same_run(tmp_path):
    """``python -m inference.cli train`` (argv from the command line: the library loads with
    the cyclic collector paused, and the objects are frozen at exit, for the whole-run time)
    writes the run that ``main([...])`` in this process writes: the same metrics rows, to the
    last digit, and its report to the end."""
    import json
    import os
    import subprocess

    from inference.cli import main

    argv = ["train", "--epochs", "2", "--hidden-dims", "8", "--threads", "1", "--no-progress"]
    argv += ["--eval-every", "1"]  # two rows an epoch
    root = BENCH.parent
    program = subprocess.run(  # -X importtime: what the program itself imports (on stderr)
        [sys.executable, "-X", "importtime", "-m", "inference.cli", "-v", *argv,
         "--run-dir", str(tmp_path / "program")],
        capture_output=True, text=True, timeout=300, cwd=root,
        env={**os.environ, "PYTHONPATH": str(root)},
    )  # fmt: skip
    assert program.returncode == 0, program.stderr[-2000:]
    assert main([*argv, "--run-dir", str(tmp_path / "call")]) == 0

    def rows(run: str) -> list[dict]:
        lines = (tmp_path / run / "metrics.jsonl").read_text().splitlines()
        return [{k: v for k, v in json.loads(line).items() if k != "seconds"} for line in lines]

    assert rows("program") == rows("call") and len(rows("call")) == 4
    assert "ELBO = E[log p(x|z)] - KL" in program.stdout and "bounds:" in program.stdout
    # the program's figures come from its worker (inference.figure_worker) where a core was
    # idle when it started: then matplotlib is never loaded in the program itself; where it
    # drew them itself (no idle core: a busy CI machine), it did. The PNGs are those drawn in
    # process, byte for byte, either way.
    imported = [line.rsplit("|", 1)[-1].strip() for line in program.stderr.splitlines()]
    by_worker = "figures (drawn by the figure worker)" in program.stderr
    assert by_worker or "figures (drawn in this process)" in program.stderr
    assert "torch" in imported and ("matplotlib" in imported) != by_worker
    for name in ("curves", "reconstructions", "samples", "latent"):
        png = f"{name}.png"
        assert (tmp_path / "program" / png).read_bytes() == (tmp_path / "call" / png).read_bytes()


def test_compiled_step_benchmark_checks_and_times(capsys, monkeypatch):
    """The compiled loss is checked against eager's (same weights, same noise) before timing."""
    bench = _load("compiled_step", monkeypatch)
    argv = ["--scale", "6,4,2", "--steps", "2", "--reps", "1", "--ways", "eager,fwd+bwd"]
    result = bench.main(argv)
    assert result["eager"]["ratio"] == 1.0 and result["fwd+bwd"]["ms"] > 0
    assert "ms/step" in capsys.readouterr().out


def test_run_parts_times_a_train_run(capsys, monkeypatch):
    import inference.cli

    parts = _load("run_parts", monkeypatch)
    # as a program main() would freeze this test process's objects: load the library plainly
    monkeypatch.setattr(inference.cli, "_load_library_as_program", inference.cli._load_library)
    seconds = parts.main(["--", "--epochs", "1", "--hidden-dims", "8", "--threads", "1"])
    assert seconds["the steps, exports included"] > 0 and seconds["evaluation"] > 0
    assert "last test ELBO" in capsys.readouterr().out


def test_step_parts_times_the_exported_step(capsys, monkeypatch):
    parts = _load("step_parts", monkeypatch)
    us = parts.main(["--scale", "6,4,2", "--rows", "40", "--reps", "1", "--calls", "3"])
    assert us["whole step (inference.train.step)"] > 0 and len(us) == 7
    assert "share" in capsys.readouterr().out


def test_gemm_rates_times_the_products_that_a_vae_step_calls(capsys, monkeypatch):
    """The benchmark's product list is the step's: as many as the ``aten::addmm`` and
    ``aten::mm`` calls of one forward and backward of the built-in VAE's loss, in the same
    shapes; running it leaves the process's threads, affinity and environment as they were."""
    import os

    import pyro
    import torch
    from pyro.infer import TraceMeanField_ELBO
    from torch.profiler import ProfilerActivity, profile

    from models.vae import VAE

    rates = _load("gemm_rates", monkeypatch)
    d, h, latent, batch = 6, 5, 2, 7
    products = rates.step_products(d, h, latent, batch)
    pyro.clear_param_store()
    vae = VAE(d, latent_dim=latent, hidden_dims=(h,))
    x = (torch.rand(batch, d) < 0.5).float()
    with profile(activities=[ProfilerActivity.CPU], record_shapes=True) as prof:
        TraceMeanField_ELBO().differentiable_loss(vae.model, vae.guide, x).backward()
    called = []
    for e in prof.events():
        if e.name in ("aten::addmm", "aten::mm"):  # addmm(bias, a, b, ...), mm(a, b)
            a, b = e.input_shapes[1:3] if e.name == "aten::addmm" else e.input_shapes[:2]
            called.append((a[0], a[1], b[1]))
    listed = sorted(rates.mkn(what, n_in, n_out, batch) for what, n_in, n_out in products)
    assert len(products) == 14 and sorted(called) == listed  # (m, k, n) of each product

    threads, environ = torch.get_num_threads(), dict(os.environ)
    cores = os.sched_getaffinity(0) if hasattr(os, "sched_getaffinity") else None
    results = rates.main(["--scale", "6,4,2", "--reps", "1", "--calls", "2"])
    out = capsys.readouterr().out
    assert "all products of a step" in out and "forward products only" in out
    step = results[("6,4,2", "step")]
    assert step["torch"] > 0 and step["numpy"] > 0
    assert torch.get_num_threads() == threads and dict(os.environ) == environ
    if cores is not None:
        assert os.sched_getaffinity(0) == cores


def test_gemm_rates_restores_the_process_when_pinning_fails(monkeypatch):
    """``_one_core`` restores the environment, affinity and torch threads also when setting
    them up fails part way (here: torch refuses the thread count)."""
    import os

    import torch

    rates = _load("gemm_rates", monkeypatch)
    threads, environ = torch.get_num_threads(), dict(os.environ)
    cores = os.sched_getaffinity(0) if hasattr(os, "sched_getaffinity") else None
    calls = []

    def refuse_once(n):
        calls.append(n)
        if len(calls) == 1:
            raise RuntimeError("no threads today")

    monkeypatch.setattr(torch, "set_num_threads", refuse_once)
    with pytest.raises(RuntimeError, match="no threads today"), rates._one_core():
        pass  # pragma: no cover - never entered
    monkeypatch.undo()
    assert calls == [1, threads] and dict(os.environ) == environ
    assert torch.get_num_threads() == threads
    if cores is not None:
        assert os.sched_getaffinity(0) == cores


def test_whole_run_hands_a_gpu_to_every_program_and_the_cpu_to_none(monkeypatch, tmp_path):
    """``--device cuda`` reaches each program's command line; on the CPU each command stays
    the one a user types (no ``--device``)."""
    whole = _load("whole_run", monkeypatch)
    seen = []
    monkeypatch.setattr(whole.subprocess, "run", lambda cmd, **kw: seen.append(cmd))
    for device in ("cuda", "cpu"):
        for program in ("elbo-lab", "plain", "numpyro@default"):
            whole.run_program(program, 1, tmp_path, device=device)
    assert [cmd[-2:] == ["--device", "cuda"] for cmd in seen] == [True] * 3 + [False] * 3
    assert not any("--device" in cmd for cmd in seen[3:])
    with pytest.raises(SystemExit):  # step mode times the CPU
        whole.main(["--steps", "2", "--device", "cuda"])


def test_plain_vae_trains_on_cuda(capsys, monkeypatch):
    import torch

    if not torch.cuda.is_available():
        pytest.skip("needs CUDA")
    plain = _load("plain_vae", monkeypatch)
    args = ["--epochs", "1", "--synthetic", "300", "--data-dim", "20", "--hidden", "8"]
    plain.main([*args, "--latent", "2", "--device", "cuda"])
    assert "final test loss" in capsys.readouterr().out


def test_numpyro_peer_asks_jax_for_the_device_platform(monkeypatch):
    """``--device cuda`` reaches JAX as its CUDA platform, set before JAX starts its backends
    (NumPyro's ``set_platform`` refused "gpu": the GPU run ended in an AssertionError)."""
    pytest.importorskip("numpyro")
    import jax

    class Started(Exception):
        pass

    seen = []

    def update(name, value):
        seen.append((name, value))
        raise Started  # the platform is set: nothing of JAX's changes in this process

    peer = _load("numpyro_vae", monkeypatch)
    monkeypatch.setattr(jax.config, "update", update)
    for device in ("cuda", "cpu"):
        with pytest.raises(Started):
            peer.main(["--epochs", "1", "--device", device])
    assert seen == [("jax_platforms", "cuda"), ("jax_platforms", "cpu")]
    with pytest.raises(SystemExit):  # JAX's platform has no device index
        peer.main(["--epochs", "1", "--device", "cuda:1"])
