"""Test setup as in Pyro's own suite: seeded, validated, with a clean param store every test."""

import os

from inference.cli import MKL_CBWR  # loads no torch

# Before torch loads MKL: the program runs MKL's products in strict reproducible mode
# (inference.cli.process_environment), which changes their last bits; tests that compare a
# run in this process with the program's need the same mode, and subprocesses inherit it.
os.environ.setdefault("MKL_CBWR", MKL_CBWR)

import pyro  # noqa: E402
import pytest  # noqa: E402
import torch  # noqa: E402

os.environ.setdefault("MPLBACKEND", "Agg")
# The networks in tests are tiny: one intra-op thread is fastest and avoids oversubscribing a
# 2-core machine when subprocesses (notebooks, torchrun workers, CLI runs) compute beside us.
torch.set_num_threads(1)


@pytest.fixture(autouse=True)
def _pyro_state():
    pyro.clear_param_store()
    pyro.set_rng_seed(0)
    with pyro.validation_enabled(True):
        yield
    pyro.clear_param_store()


@pytest.fixture
def float64():
    """Run a test in float64 (exactness tests), restoring the default dtype after."""
    old = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)
    yield
    torch.set_default_dtype(old)


@pytest.fixture
def exports(monkeypatch):
    """Training losses exported as soon as a shape recurs, however short the run (``fit`` keeps
    the shapes of a run too short to pay for an export eager, which computes the same numbers,
    so a test comparing graphs with eager runs would compare eager with eager), and recorded:
    the fixture is the list of the rows of each exported training shape."""
    import inference.traced_loss as traced_loss

    monkeypatch.setattr(traced_loss, "FIRST_EXPORT_PAYS_AFTER_CALLS", 0)
    monkeypatch.setattr(traced_loss, "EXPORT_PAYS_AFTER_CALLS", 0)
    return _record_exports(monkeypatch, traced_loss)


@pytest.fixture
def recorded_exports(monkeypatch):
    """The rows of each training shape exported, with the pay-back rule as it is."""
    import inference.traced_loss as traced_loss

    return _record_exports(monkeypatch, traced_loss)


def _record_exports(monkeypatch, traced_loss) -> list:
    exported = []
    original = traced_loss.TracedLoss._export

    def export(self, args, kwargs):
        graph = original(self, args, kwargs)
        if self.differentiable and isinstance(graph, traced_loss._Graph):  # a training loss
            exported.append(args[0].shape[0] if args and hasattr(args[0], "shape") else None)
        return graph

    monkeypatch.setattr(traced_loss.TracedLoss, "_export", export)
    return exported


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs CUDA")
    for item in items:
        if "cuda" in item.keywords:
            item.add_marker(skip)
