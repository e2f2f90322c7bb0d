"""The cyclic collector paused while large imports run (:mod:`inference.collector`)."""

from __future__ import annotations

import gc
import sys
import weakref

import pytest
import torch

from inference import collector


@pytest.fixture
def collector_on(monkeypatch):
    """The collector enabled and nothing frozen by the test, whatever the test does."""
    was = gc.isenabled()
    frozen = gc.get_freeze_count()
    monkeypatch.setattr(collector, "_freeze", False)
    gc.enable()
    yield
    if gc.get_freeze_count() > frozen:
        gc.unfreeze()  # this test's freeze: the suite's objects go back to the collector
    (gc.enable if was else gc.disable)()


def test_paused_pauses_and_resumes_even_on_error(collector_on):
    with collector.paused():
        assert not gc.isenabled()
    assert gc.isenabled()
    with pytest.raises(KeyError), collector.paused():
        raise KeyError("x")
    assert gc.isenabled()


def test_a_collector_off_already_stays_off(collector_on):
    gc.disable()
    with collector.paused():
        assert not gc.isenabled()
    assert not gc.isenabled()


@pytest.fixture
def fresh_modules():
    """collector_probe_a and _b, importable once each, gone from sys.modules after."""
    yield
    for name in ("collector_probe_a", "collector_probe_b"):
        sys.modules.pop(name, None)


def test_only_a_program_freezes_what_a_pause_created(
    collector_on, fresh_modules, tmp_path, monkeypatch
):
    """Where the pause imported modules (the library's load, the first optimizer, the first
    export)."""
    (tmp_path / "collector_probe_a.py").write_text("made = [[] for _ in range(100)]\n")
    (tmp_path / "collector_probe_b.py").write_text("made = [[] for _ in range(100)]\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    before = gc.get_freeze_count()
    with collector.paused():
        import collector_probe_a
    assert gc.get_freeze_count() == before  # a user's process: left to the collector
    collector.freeze_what_pauses_create()
    with collector.paused():
        import collector_probe_b
    assert gc.get_freeze_count() >= before + len(collector_probe_b.made)
    assert collector_probe_a.made is not collector_probe_b.made


def test_a_pause_that_imported_nothing_freezes_nothing(collector_on):
    """The freeze takes every object tracked, the run's own too: a later export's pause in a
    program froze a finished guide's parameters and graphs, and the cycles they sat in were
    never collected (``compare``: every guide's objects kept to the end)."""

    class Node:
        pass

    collector.freeze_what_pauses_create()
    live, dead = Node(), Node()
    live.cycle, dead.cycle = live, dead  # a cycle alive through the pause, one garbage already
    dead_ref, live_ref = weakref.ref(dead), weakref.ref(live)
    del dead
    before = gc.get_freeze_count()
    with collector.paused():
        made = [[] for _ in range(100)]
    assert gc.get_freeze_count() == before
    del live
    gc.collect()
    assert dead_ref() is None and live_ref() is None
    assert len(made) == 100


def test_the_optimizer_and_the_export_are_built_with_the_collector_paused(
    collector_on, monkeypatch
):
    """Where ``torch._dynamo`` and the export's tracer are imported: constructing the first
    optimizer, and the first export."""
    import pyro
    import pyro.distributions as dist

    from inference import train

    seen = {}

    def adam(params, lr):
        seen["optimizer"] = gc.isenabled()
        return torch.optim.Adam(params, lr=lr)

    export = torch.export.export

    def recorded_export(*args, **kwargs):
        seen["export"] = gc.isenabled()
        return export(*args, **kwargs)

    monkeypatch.setitem(train.OPTIMIZERS, "adam", adam)
    monkeypatch.setattr(torch.export, "export", recorded_export)

    def model(x):
        loc = pyro.sample("loc", dist.Normal(torch.zeros(2), 1.0).to_event(1))
        with pyro.plate("data", x.shape[0]):
            pyro.sample("obs", dist.Normal(loc, 1.0).to_event(1), obs=x)

    def guide(x):
        m = pyro.param("m", torch.zeros(2))
        pyro.sample("loc", dist.Normal(m, 1.0).to_event(1))

    from models.structure import static_structure

    pyro.clear_param_store()
    model, guide = static_structure(model), static_structure(guide)
    x = torch.randn(5, 2)
    state = train.init(model, guide, x, config=train.TrainConfig(estimator="jit"))
    for _ in range(12):  # past the eager calls: the 11th exports
        state, _ = train.step(state, x)
    assert seen == {"optimizer": False, "export": False}
    assert gc.isenabled()


def test_a_command_called_from_python_freezes_nothing(collector_on, tmp_path):
    """``main([...])`` from a user's process (or a test) is not the program: the objects it
    leaves stay the collector's, whatever its pauses imported."""
    from inference.cli import main

    before = gc.get_freeze_count()
    argv = ["train", "--epochs", "1", "--hidden-dims", "8", "--threads", "1", "--no-progress"]
    assert main([*argv, "--run-dir", str(tmp_path / "run")]) == 0
    assert not collector._freeze and gc.get_freeze_count() == before
