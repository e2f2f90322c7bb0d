"""Default thread counts: the weight count is the networks' own, and threads grow with the work."""

from dataclasses import replace
from types import SimpleNamespace

import pytest
import torch

from inference.threads import (
    MIN_FLOPS_PER_THREAD,
    PROBE_SPEEDUP,
    confirmed_threads,
    forward_flops,
    largest_layer,
    threads_for,
    weights_per_row,
)
from models.linear_gaussian import LinearGaussian
from models.vae import VAE


def _weights(module: torch.nn.Module) -> int:
    return sum(p.numel() for p in module.parameters() if p.dim() == 2)


@pytest.mark.parametrize(
    "sizes", [(64, 10, (200,)), (784, 20, (400,)), (30, 3, (16, 8)), (5, 2, ())], ids=str
)
def test_weights_per_row_counts_the_vae_weight_matrices(sizes):
    data_dim, latent_dim, hidden_dims = sizes
    expected = _weights(VAE(data_dim, latent_dim, hidden_dims))
    assert weights_per_row("vae", data_dim, latent_dim, hidden_dims) == expected


def test_weights_per_row_of_ppca_is_its_loading_matrix_both_ways():
    module = LinearGaussian(12, 3)
    loading = max(p.numel() for p in module.parameters())
    assert weights_per_row("ppca", 12, 3) == 2 * loading == 2 * 12 * 3


def test_flops_and_threads():
    assert forward_flops(100, 10) == 2 * 10 * 100
    default_vae = forward_flops(weights_per_row("vae", 64, 10, (200,)), 128)
    assert threads_for(default_vae, cores=16) == 1
    mnist = weights_per_row("vae", 784, 20, (400,))
    # the measured break-even: MNIST-sized batches of 256 rows gain nothing from a second
    # thread, 384 rows do (12%), and so do evaluation chunks of 1,024 rows (1.6x)
    assert threads_for(forward_flops(mnist, 256), cores=2) == 1
    assert threads_for(forward_flops(mnist, 1024), cores=2) == 2
    assert threads_for(2.5 * MIN_FLOPS_PER_THREAD, cores=16) == 2
    assert threads_for(100 * MIN_FLOPS_PER_THREAD, cores=4) == 4
    assert threads_for(0.0, cores=0) == 1


@pytest.mark.parametrize("preset", [None, "user"])
def test_the_program_sets_torch_process_options_before_torch_loads(preset):
    """``elbo-lab`` as a program sets, before torch is imported: OMP_WAIT_POLICY=PASSIVE with
    GOMP_SPINCOUNT (a short spin before the sleep) and MKL_CBWR (strict reproducible products);
    and, where the kernel would stall for them, NUMPY_MADVISE_HUGEPAGE=0 (no huge pages for
    NumPy's arrays) before NumPy is: each is read once when its library loads. A value the user
    set is kept (and a wait policy of their own gets no spin count of ours); torch's own huge
    pages (THP_MEM_ALLOC_ENABLE) are left as the user has them."""
    import os
    import subprocess
    import sys
    from pathlib import Path

    from inference.cli import MKL_CBWR, huge_pages_stall
    from inference.threads import SPIN_COUNT

    names = ["OMP_WAIT_POLICY", "GOMP_SPINCOUNT", "MKL_CBWR", "NUMPY_MADVISE_HUGEPAGE"]
    script = (
        "import os, sys\n"
        "seen = {}\n"
        "def hook(event, args):\n"  # the environment as torch and NumPy start to load
        "    if event == 'import' and args[0] in ('torch', 'numpy') and args[0] not in seen:\n"
        "        seen[args[0]] = [os.environ.get(n, 'None') for n in NAMES]\n"
        f"NAMES = {names!r}\n"
        "sys.addaudithook(hook)\n"
        "import inference.cli as cli\n"
        "assert 'torch' not in sys.modules and 'numpy' not in sys.modules\n"
        "sys.argv = ['elbo-lab', 'evaluate', '/no/such/run']\n"
        "code = cli.main()\n"
        "assert 'torch' in sys.modules\n"
        "print(code, *seen['numpy'][3:], *seen['torch'][:3],\n"
        "      os.environ.get('THP_MEM_ALLOC_ENABLE'))\n"
    )
    env = {k: v for k, v in os.environ.items() if k not in [*names, "THP_MEM_ALLOC_ENABLE"]}
    if preset is not None:
        env.update(OMP_WAIT_POLICY="ACTIVE", MKL_CBWR="AVX2", NUMPY_MADVISE_HUGEPAGE="1")
    root = Path(__file__).resolve().parents[2]
    out = subprocess.run(
        [sys.executable, "-c", script],
        capture_output=True, text=True, timeout=120, cwd=root,
        env={**env, "PYTHONPATH": str(root)},
    )  # fmt: skip
    assert out.returncode == 0, out.stderr[-2000:]
    numpy_default = "0" if huge_pages_stall() else "None"  # this machine's kernel decides
    if preset is None:
        expected = [numpy_default, "PASSIVE", str(SPIN_COUNT), MKL_CBWR]
    else:
        expected = ["1", "ACTIVE", "None", "AVX2"]
    assert out.stdout.split() == ["2", *expected, "None"]


@pytest.mark.parametrize(
    "text, stall",
    [
        ("always defer defer+madvise [madvise] never\n", True),
        ("[always] defer defer+madvise madvise never\n", True),
        ("always defer [defer+madvise] madvise never\n", True),
        ("always [defer] defer+madvise madvise never\n", False),
        ("always defer defer+madvise madvise [never]\n", False),
    ],
)
def test_numpy_huge_pages_are_declined_where_the_kernel_stalls_for_them(tmp_path, text, stall):
    """The kernel's THP ``defrag`` mode in brackets: NumPy's ``madvise`` huge pages stall the
    allocation for ``always``, ``madvise`` and ``defer+madvise``, not for ``defer``/``never``;
    no such file (not Linux, no THP) means no stall."""
    from inference.cli import huge_pages_stall

    path = tmp_path / "defrag"
    path.write_text(text)
    assert huge_pages_stall(str(path)) is stall
    assert huge_pages_stall(str(tmp_path / "absent")) is False


def _clock_of(cost: dict[int, float]):
    """A clock that advances by ``cost[n]`` per reading while torch runs n threads, so each
    timed product of the probe takes ``cost[n]``."""
    now = [0.0]

    def clock() -> float:
        now[0] += cost[torch.get_num_threads()]
        return now[0]

    return clock


@pytest.mark.parametrize(
    ("two", "kept"),
    [(0.5, 2), (PROBE_SPEEDUP - 0.01, 2), (PROBE_SPEEDUP + 0.01, 1), (1.25, 1)],
    ids=["quiet", "just below the threshold", "just above", "busy"],
)
def test_the_probe_keeps_threads_only_where_they_are_faster_now(two, kept):
    before = torch.get_num_threads()
    rng = torch.get_rng_state()
    chosen = confirmed_threads(2, 4000, (784, 400), clock=_clock_of({1: 1.0, 2: two}))
    assert chosen == kept
    assert torch.get_num_threads() == before  # restored
    assert torch.equal(torch.get_rng_state(), rng)  # the run's noise is untouched


def test_the_probe_compares_medians_so_one_slow_product_does_not_decide():
    """Timed products alternate 1 thread, 2 threads (after an untimed pair). One 2-thread
    product is slow (a preemption): its mean would be 2.2x the 1-thread time, its median is
    0.5x."""
    two = [0.5, 9.0, 0.5, 0.5, 0.5]
    durations = [d for pair in zip([1.0] * 5, two, strict=True) for d in pair]
    readings = []
    for d in durations:  # start and end of each product
        start = readings[-1] if readings else 0.0
        readings += [start, start + d]
    clock = iter(readings).__next__
    assert confirmed_threads(2, 1024, (64, 200), rounds=5, clock=clock) == 2
    with pytest.raises(StopIteration):  # every reading was taken, no more
        clock()


def test_one_proposed_thread_runs_no_probe():
    def clock() -> float:
        raise AssertionError("probed")

    assert confirmed_threads(1, 128, (784, 400), clock=clock) == 1
    assert confirmed_threads(0, 128, (784, 400), clock=clock) == 1


def test_largest_layer_is_the_widest_weight_matrix():
    assert largest_layer("vae", 784, 20, (400,)) in {(784, 400), (400, 784)}
    assert largest_layer("vae", 64, 10, (200,)) in {(64, 200), (200, 64)}
    assert largest_layer("ppca", 12, 3) in {(12, 3), (3, 12)}
    assert largest_layer("my_model.py:model", 5) == (5, 1)


@pytest.mark.parametrize("probe_says", [1, 2])
def test_use_threads_sets_what_the_probe_confirms(monkeypatch, probe_says):
    """The rule proposes 2 threads for the MNIST-sized L_K chunks on 2 cores; the count set
    is the probe's answer, asked with the phase's rows and the model's largest layer."""
    import inference.resources as resources
    import inference.threads as threads
    from inference.evidence import CHUNK_ROWS

    asked = []

    def probe(proposed, rows, layer):
        asked.append((proposed, rows, layer))
        return min(proposed, probe_says)

    monkeypatch.setattr(resources, "available_cores", lambda: 2)
    monkeypatch.setattr(threads, "confirmed_threads", probe)
    # where the count cannot change the numbers (count_keeps_numbers), whatever the host's
    # MKL_CBWR or torch build: elsewhere no probe runs
    monkeypatch.setenv("MKL_CBWR", "AUTO,STRICT")
    monkeypatch.setattr(torch.backends.mkl, "is_available", lambda: True)
    before = torch.get_num_threads()
    spec = {"model": "vae", "data_dim": 784, "latent_dim": 20, "hidden_dims": [400]}
    try:
        args = SimpleNamespace(threads=None)
        assert resources.use_threads(args, spec, CHUNK_ROWS) == probe_says
        assert torch.get_num_threads() == probe_says
        assert asked == [(2, CHUNK_ROWS, largest_layer("vae", 784, 20, (400,)))]
        torch.set_num_threads(1)
        assert resources.use_threads(SimpleNamespace(threads=1), spec, 4000) == 1
        assert len(asked) == 1  # --threads given: neither rule nor probe
    finally:
        torch.set_num_threads(before)


def test_the_report_runs_with_its_own_threads_then_the_trainings_again(monkeypatch):
    import inference.resources as resources
    import inference.threads as threads
    import inference.train_command as train_command
    from inference.run import ModelSpec

    monkeypatch.setattr(resources, "available_cores", lambda: 2)
    monkeypatch.setattr(threads, "confirmed_threads", lambda proposed, rows, layer: proposed)
    before = torch.get_num_threads()
    torch.set_num_threads(1)  # the training's count
    try:
        big = SimpleNamespace(spec=ModelSpec(data_dim=784, latent_dim=20, hidden_dims=(400,)))
        small = SimpleNamespace(spec=ModelSpec(data_dim=64))
        with train_command._report_threads(SimpleNamespace(threads=None), big):
            assert torch.get_num_threads() == 2  # L_K chunks of 4,096 MNIST-sized rows
        assert torch.get_num_threads() == 1
        with train_command._report_threads(SimpleNamespace(threads=None), small):
            assert torch.get_num_threads() == 1  # the digits' chunks: too little work
        with train_command._report_threads(SimpleNamespace(threads=1), big):
            assert torch.get_num_threads() == 1  # --threads is the user's
        # a user model's report (no rule counts its work) keeps the training's threads, as
        # its evaluations do: one (_set_up_training), or --threads
        torch.set_num_threads(2)
        user = SimpleNamespace(spec=ModelSpec(model="my_model.py:model"))
        with train_command._report_threads(SimpleNamespace(threads=None), user):
            assert torch.get_num_threads() == 2
        assert torch.get_num_threads() == 2
    finally:
        torch.set_num_threads(before)


def test_the_reports_numbers_do_not_depend_on_the_threads_the_probe_picks():
    """The report's checks of an MNIST-sized VAE (its products large enough for the rule to
    propose 2 threads) give the same numbers with 1 thread and with 2, to float rounding."""
    import pyro

    from inference.bounds import checked_metrics
    from models.vae import VAE

    before = torch.get_num_threads()
    pyro.clear_param_store()
    torch.manual_seed(0)
    vae = VAE(784, latent_dim=20, hidden_dims=(400,))
    x = torch.bernoulli(torch.full((200, 784), 0.13))
    reports = []
    try:
        for n in (1, 2):
            torch.set_num_threads(n)
            c = checked_metrics(
                vae.model, vae.guide, x, estimator="meanfield", batched=True, num_samples=20
            )
            reports.append((c.metrics.elbo, c.metrics.elbo_stderr, c.pyro_loss, c.bounds.lk))
    finally:
        torch.set_num_threads(before)
    assert reports[1] == pytest.approx(reports[0], rel=1e-6)


def test_train_evaluates_with_the_threads_of_its_evaluation_chunks(monkeypatch):
    """``elbo-lab train`` hands ``fit`` the threads for chunks of ``eval_batch_size`` rows
    (2 for the MNIST-sized VAE's 1,024 rows on 2 cores, where its training batches of 128 get
    1); none with ``--threads``, for a user model, or with several ranks."""
    import inference.resources as resources
    import inference.threads as threads
    import inference.train_command as train_command
    from inference.run import ModelSpec
    from inference.train import TrainConfig

    monkeypatch.setattr(resources, "available_cores", lambda: 2)
    monkeypatch.setattr(threads, "confirmed_threads", lambda proposed, rows, layer: proposed)
    spec = ModelSpec(data_dim=784, latent_dim=20, hidden_dims=(400,))
    rows = SimpleNamespace(train=range(60000), test=range(10000))
    one = SimpleNamespace(size=1)
    run = SimpleNamespace(spec=spec, config=TrainConfig(), dataset=rows, world=one)
    ask = train_command._evaluation_threads(SimpleNamespace(threads=None), run)
    assert ask() == 2
    # a split of fewer rows than eval_batch_size is evaluated in one chunk of its rows
    small = SimpleNamespace(train=range(300), test=range(100))
    run = SimpleNamespace(spec=spec, config=TrainConfig(), dataset=small, world=one)
    assert train_command._evaluation_threads(SimpleNamespace(threads=None), run)() == 1
    whole = replace(TrainConfig(), eval_batch_size=None)  # all rows at once
    run = SimpleNamespace(spec=spec, config=whole, dataset=small, world=one)
    assert train_command._evaluation_threads(SimpleNamespace(threads=None), run)() == 1
    run = SimpleNamespace(spec=spec, config=whole, dataset=rows, world=one)
    assert train_command._evaluation_threads(SimpleNamespace(threads=None), run)() == 2
    assert resources.default_threads(spec.to_dict(), TrainConfig().batch_size) == 1
    assert train_command._evaluation_threads(SimpleNamespace(threads=2), run) is None
    ranks = SimpleNamespace(**{**vars(run), "world": SimpleNamespace(size=2)})
    assert train_command._evaluation_threads(SimpleNamespace(threads=None), ranks) is None
    user = SimpleNamespace(spec=ModelSpec(model="my_model.py:model"), config=TrainConfig())
    assert train_command._evaluation_threads(SimpleNamespace(threads=None), user) is None


@pytest.mark.parametrize("given", [None, 2])
def test_a_user_model_trains_on_one_thread_unless_told(tmp_path, monkeypatch, given):
    """``elbo-lab train FILE.py:model``: the rule cannot count a user model's work, so it
    trains (and evaluates and reports) on one thread, not torch's one per core; ``--threads N``
    is kept."""
    from pathlib import Path

    import inference.cli as cli
    import inference.resources as resources
    import inference.train_command as train_command
    from inference.cli import main

    monkeypatch.setattr(resources, "available_cores", lambda: 2)
    # and the command line's check of --threads 2: the test does not depend on the host's cores
    monkeypatch.setattr(cli, "available_cores", lambda: 2)
    coin = Path(__file__).parent / "user_code" / "coin.py"
    seen = []
    fit_run = train_command._fit_run

    def recording(*args, **kwargs):
        seen.append(torch.get_num_threads())
        return fit_run(*args, **kwargs)

    monkeypatch.setattr(train_command, "_fit_run", recording)
    before = torch.get_num_threads()
    argv = ["train", "--model", f"{coin}:model", "--guide", f"{coin}:guide"]
    argv += ["--data", f"{coin}:data", "--epochs", "3", "--run-dir", str(tmp_path / "run")]
    argv += ["--no-progress"] + ([] if given is None else ["--threads", str(given)])
    torch.set_num_threads(2)  # torch's default on a 2-core machine
    try:
        assert main(argv) == 0
        assert seen == [given or 1]
    finally:
        torch.set_num_threads(before)


def _compare_until_its_threads(tmp_path, monkeypatch, extra: list[str]):
    """``elbo-lab compare`` on a 40 x 784 array with ``extra`` options, stopped once its
    threads are set: the ``(spec, rows)`` its training threads were counted from and the
    ``eval_threads`` it handed ``compare``."""
    import importlib

    import numpy as np

    import inference.commands as commands
    from inference.cli import main
    from inference.errors import OptionError

    path = tmp_path / "wide.npy"
    np.save(path, (np.random.default_rng(0).random((40, 784)) < 0.13).astype(np.float32))
    specs, handed = [], []

    def recording(args, spec, rows):
        specs.append((dict(spec), rows))
        return torch.get_num_threads()

    def stop(*args, **kwargs):
        handed.append(kwargs["eval_threads"])
        raise OptionError("stopped after the threads were set")

    monkeypatch.setattr(commands, "use_threads", recording)
    # the module (the package's attribute of that name is the function)
    monkeypatch.setattr(importlib.import_module("inference.compare"), "compare", stop)
    argv = ["compare", "--data", str(path), "--epochs", "1", "--run-dir", str(tmp_path / "c")]
    assert main([*argv, *extra]) == 2
    [(spec, rows)], [ask] = specs, handed
    return spec, rows, ask


@pytest.mark.parametrize("given", [None, 1])
def test_compare_counts_the_threads_for_the_datas_own_columns(tmp_path, monkeypatch, given):
    """``elbo-lab compare`` sets its threads from the model on the data given (784 columns
    here), not from the digits' 64, and hands ``compare`` the threads for L_K's chunks of
    that model (none with ``--threads``)."""
    extra = [] if given is None else ["--threads", str(given)]
    spec, rows, ask = _compare_until_its_threads(tmp_path, monkeypatch, extra)
    assert spec["data_dim"] == 784 and spec["model"] == "vae" and rows == 128
    if given is not None:
        assert ask is None
    else:
        import inference.resources as resources
        from inference.evidence import CHUNK_ROWS

        assert ask.func is resources.default_threads and ask.args == (spec, CHUNK_ROWS)


def test_torch_threads_sets_the_count_inside_and_restores_it_after():
    from inference.threads import torch_threads

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        with torch_threads(lambda: 2):
            assert torch.get_num_threads() == 2
        assert torch.get_num_threads() == 1
        with pytest.raises(RuntimeError), torch_threads(lambda: 2):
            raise RuntimeError("an evaluation failed")
        assert torch.get_num_threads() == 1  # restored on the exception too
        with torch_threads(None):
            assert torch.get_num_threads() == 1
    finally:
        torch.set_num_threads(before)


def test_compare_in_float64_keeps_the_rules_count_whatever_the_load(tmp_path, monkeypatch):
    """``elbo-lab compare --dtype float64``: the threads of its steps and of L_K's chunks are
    the rule's count (2 for the MNIST-sized chunks on 2 cores), not a probe's, which follows the
    load: the spec it counts from carries the dtype (without it, float32 was assumed)."""
    import inference.resources as resources
    import inference.threads as threads

    monkeypatch.setattr(resources, "available_cores", lambda: 2)
    monkeypatch.setenv("MKL_CBWR", "AUTO,STRICT")
    probed = []

    def busy(proposed, rows, layer):
        probed.append(proposed)
        return 1

    monkeypatch.setattr(threads, "confirmed_threads", busy)
    spec, _, ask = _compare_until_its_threads(tmp_path, monkeypatch, ["--dtype", "float64"])
    assert (ask(), probed) == (2, [])
    assert spec["dtype"] == "float64"


def test_l_k_over_a_large_split_is_the_same_with_any_thread_count():
    """``elbo-lab explain`` sums L_K and the ELBO of its draws over the whole split (60,000
    rows here), with threads a probe chose by the load for its chunks: torch splits a sum of
    32,768 elements or more between its threads, so the last bits of L_K, its standard error
    and the objective check's losses (Pyro's, over all the rows at once) followed the count;
    they must not."""
    import pyro
    import pyro.distributions as dist

    from inference.explain import explain_pair

    def model(x, num_data=None):  # rows in chunks, as the built-in models' (num_data)
        with pyro.plate("data", num_data or x.shape[0], subsample_size=x.shape[0]):
            z = pyro.sample("z", dist.Normal(x.new_zeros(x.shape[0]), 1.0))
            pyro.sample("x", dist.Normal(z, 1.0), obs=x)

    def guide(x, num_data=None):
        with pyro.plate("data", num_data or x.shape[0], subsample_size=x.shape[0]):
            pyro.sample("z", dist.Normal(0.5 * x, 0.8))

    x = 1.0 + 3.0 * torch.randn(60000, generator=torch.Generator().manual_seed(0))
    before = torch.get_num_threads()
    numbers = []
    try:
        for n in (1, 2):
            torch.set_num_threads(n)
            e = explain_pair(model, guide, x, num_samples=2)
            numbers.append((e.lk, e.lk_stderr, e.elbo_mc, e.objective, e.loss, e.pyro_loss))
    finally:
        torch.set_num_threads(before)
    assert numbers[1] == numbers[0]
