"""The figure worker (inference.figure_worker): the same PNGs as drawn in process, its errors
worded as the process words them, and no figure lost when the worker itself fails."""

from __future__ import annotations

import ast
import io
import os
import pickle
import shutil
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
import torch

import inference.figure_worker as figure_worker
from inference.data import Dataset
from inference.figure_worker import (
    READY,
    FigureError,
    FigureWorker,
    draw,
    serve,
    training_figure_jobs,
)
from models.vae import VAE

ROOT = Path(__file__).resolve().parents[2]
NAMES = ["curves.png", "reconstructions.png", "samples.png", "latent.png"]


def _history(epochs: int = 3) -> list[dict]:
    rows = []
    for e in range(1, epochs + 1):
        for split in ("train", "test"):
            elbo = -30.0 + 2 * e + (split == "test")
            row = {"epoch": e, "split": split, "loss": -elbo, "elbo": elbo,
                   "reconstruction": elbo - 1.0, "kl": 1.0}  # fmt: skip
            if split == "train":
                row["svi_loss"] = -elbo + 0.5
            rows.append(row)
    return rows


def _toy() -> tuple[Dataset, VAE]:
    torch.manual_seed(0)
    x = (torch.rand(30, 64) > 0.5).float()
    labels = torch.arange(30) % 10
    data = Dataset("toy", x[:20], x[20:], (8, 8), labels[:20], labels[20:])
    return data, VAE(64, latent_dim=3, hidden_dims=(16,))


def _jobs(run_dir: Path) -> list:
    data, vae = _toy()
    return training_figure_jobs(run_dir, _history(), vae, data, seed=1, title="vae on toy")


def test_the_worker_writes_the_png_bytes_the_process_writes(tmp_path):
    here, there = tmp_path / "here", tmp_path / "there"
    here.mkdir(), there.mkdir()
    assert [p.name for p in draw(_jobs(here))] == NAMES
    worker = FigureWorker.start()
    assert worker.ready(timeout=120)
    worker.send(_jobs(there))
    assert worker.wait() == [there / name for name in NAMES] and worker.drew
    for name in NAMES:
        assert (there / name).read_bytes() == (here / name).read_bytes(), name
    assert sorted(p.name for p in there.iterdir()) == sorted(NAMES)  # no temporary file left


def test_jobs_hold_numpy_arrays_and_draw_nothing_from_the_global_random_state(tmp_path):
    data, vae = _toy()
    before = torch.random.get_rng_state()
    jobs = training_figure_jobs(tmp_path, _history(), vae, data, seed=1)
    assert torch.equal(torch.random.get_rng_state(), before)  # the report's noise is untouched
    assert [kwargs["path"] for _, _, kwargs in jobs] == [str(tmp_path / n) for n in NAMES]
    for name, args, kwargs in jobs:
        assert not any(torch.is_tensor(a) for a in args), name
        assert pickle.loads(pickle.dumps((name, args, kwargs)))[0] == name


def test_the_worker_loads_neither_torch_nor_pyro():
    code = (
        f"import sys; sys.path[0] = {str(ROOT)!r}; import inference.figure_worker as w; "
        "w._warm_up(); import inference.plots; "
        "print(sorted(m for m in ('torch', 'pyro') if m in sys.modules))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.strip() == "[]"


def test_a_figure_the_worker_cannot_write_is_worded_as_in_process(tmp_path):
    missing = tmp_path / "no such directory"
    with pytest.raises(OSError) as here:
        draw(_jobs(missing))
    worker = FigureWorker.start()
    assert worker.ready(timeout=120)
    worker.send(_jobs(missing))
    with pytest.raises(FigureError) as there:
        worker.wait()
    # the same words, up to the random name of the temporary file it could not create
    here_words = f"{type(here.value).__name__}: {here.value}"
    assert str(there.value).split(".curves.png.")[0] == here_words.split(".curves.png.")[0]
    assert str(there.value).startswith("FileNotFoundError: [Errno 2]")
    assert "no such directory" in str(there.value)


def test_a_worker_that_died_leaves_the_figures_to_the_process(tmp_path):
    worker = FigureWorker.start()
    worker.process.kill()
    worker.process.wait()
    assert not worker.ready(timeout=120)
    worker.send(_jobs(tmp_path))
    assert [p.name for p in worker.wait()] == NAMES and worker.drew is False
    for name in NAMES:
        assert (tmp_path / name).stat().st_size > 1000


def test_a_worker_that_cannot_start_leaves_the_figures_to_the_process(tmp_path, monkeypatch):
    def no_process(*args, **kwargs):
        raise OSError(11, "Resource temporarily unavailable")

    monkeypatch.setattr(subprocess, "Popen", no_process)
    worker = FigureWorker.start()
    assert worker.process is None and not worker.ready()
    worker.send(_jobs(tmp_path))
    assert [p.name for p in worker.wait()] == NAMES and worker.drew is False


def test_a_worker_ignores_a_ctrl_c_and_still_draws(tmp_path):
    worker = FigureWorker.start()
    assert worker.ready(timeout=120)
    worker.process.send_signal(signal.SIGINT)  # a Ctrl-C reaches the whole process group
    worker.send(_jobs(tmp_path))
    assert [p.name for p in worker.wait()] == NAMES
    assert worker.drew  # had the SIGINT ended it, this process would have drawn them


def test_a_worker_not_ready_when_the_figures_are_due_is_ended_and_the_process_draws(tmp_path):
    """A busy machine leaves the low-priority worker no time: the program does not wait for
    its imports, it draws the figures itself, as it did without a worker."""
    worker = FigureWorker.start()
    process = worker.process
    worker.send(_jobs(tmp_path))  # microseconds after its start: Python has not even loaded
    assert process.wait(timeout=60) == -signal.SIGKILL  # ended (and collected by wait below)
    assert [p.name for p in worker.wait()] == NAMES and worker.drew is False
    for name in NAMES:
        assert (tmp_path / name).stat().st_size > 1000


def test_a_worker_given_nothing_ends_when_closed_or_when_its_input_closes():
    worker = FigureWorker.start()
    process = worker.process
    worker.close()
    worker.close()  # twice is fine
    assert process.returncode is not None
    # a program killed outright closes the pipe: the worker ends, having written nothing
    out = io.BytesIO()
    handler = signal.getsignal(signal.SIGINT)
    assert serve(io.BytesIO(b""), out) == 0 and out.getvalue() == READY  # and no answer
    assert signal.getsignal(signal.SIGINT) is handler  # a call from Python: Ctrl-C still works
    lone = FigureWorker.start()
    lone.process.stdin.close()
    assert lone.process.wait(timeout=120) == 0


def test_a_worker_given_figures_ends_when_closed_before_its_answer(tmp_path):
    # a Ctrl-C or an error in the report, after send and before wait: main's close ends the
    # worker, which would otherwise go on writing figures after the program had ended
    worker = FigureWorker.start()
    process = worker.process
    assert worker.ready(timeout=120)  # else send ends it at once
    worker.send(_jobs(tmp_path))
    worker.close()
    assert process.returncode is not None  # ended and collected
    left = sorted(tmp_path.iterdir())
    time.sleep(1.0)  # a worker left running writes its figures in this time
    assert sorted(tmp_path.iterdir()) == left
    worker.close()  # twice is fine


def test_a_ctrl_c_while_waiting_for_the_worker_leaves_none_running(tmp_path):
    # what the program does on a Ctrl-C in wait: KeyboardInterrupt, then main's close (a join
    # that a signal cut short marks the thread ended while it still runs: Python 3.11)
    worker = FigureWorker.start()
    process = worker.process
    assert worker.ready(timeout=120)
    worker.send(_jobs(tmp_path))

    def ctrl_c():
        if worker._talk.is_alive():  # still waiting for the answer
            os.kill(os.getpid(), signal.SIGINT)

    threading.Timer(0.05, ctrl_c).start()
    handler = signal.signal(signal.SIGINT, signal.default_int_handler)  # whatever the runner's
    try:
        with pytest.raises(KeyboardInterrupt):
            worker.wait()
    finally:
        signal.signal(signal.SIGINT, handler)
    worker.close()
    assert process.returncode is not None  # ended and collected


def _gone(pid: int) -> bool:
    """Whether process ``pid`` has ended (a zombie no one reaps counts as ended)."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] == "Z"
    except OSError:
        return True


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="PR_SET_PDEATHSIG: Linux")
def test_a_program_killed_while_its_worker_draws_leaves_no_worker_and_no_figure(tmp_path):
    # SIGTERM (or SIGKILL) during the report: the program ends at once, without its close;
    # the worker, given the figures already, ends with it instead of writing them afterwards
    # two figures: the worker draws the curves in a forked copy, which ends with it too
    jobs = tmp_path / "jobs.pickle"
    jobs.write_bytes(pickle.dumps(_jobs(tmp_path)[:2]))
    program = "\n".join([
        f"import os, pickle, signal, sys, time; sys.path[0] = {str(ROOT)!r}",
        "from inference.figure_worker import FigureWorker",
        "worker = FigureWorker.start(); print(worker.process.pid, flush=True)",
        "assert worker.ready(timeout=120)",  # else send ends it at once
        f"worker.send(pickle.loads(open({str(jobs)!r}, 'rb').read()))",
        "while not worker.process.stdin.closed: time.sleep(0.001)",  # the jobs are in the pipe
        "os.kill(os.getpid(), signal.SIGTERM)",
    ])  # fmt: skip
    out = subprocess.run([sys.executable, "-c", program], capture_output=True, text=True,
                         timeout=120)  # fmt: skip
    assert out.returncode == -signal.SIGTERM, out.stderr[-2000:]
    pid = int(out.stdout)
    deadline = time.monotonic() + 60
    while not _gone(pid):
        assert time.monotonic() < deadline, "the worker outlived its program by a minute"
        time.sleep(0.05)
    time.sleep(1.0)  # longer than a figure takes: a copy left drawing would have written it
    assert sorted(p.name for p in tmp_path.iterdir()) == ["jobs.pickle"]  # nor a .tmp


def test_the_worker_starts_from_a_directory_of_any_name(tmp_path, monkeypatch):
    # the package's directory goes into the worker's code as a literal, whatever it holds
    root = tmp_path / "VENICE's PARENT"
    shutil.copytree(ROOT / "inference", root / "inference",
                    ignore=shutil.ignore_patterns("__pycache__"))  # fmt: skip
    monkeypatch.setattr(figure_worker, "__file__", str(root / "inference" / "figure_worker.py"))
    worker = FigureWorker.start()
    process = worker.process
    code = ast.parse(process.args[-1])  # the worker's program: its sys.path[0] is root
    assigned = [n.value for n in ast.walk(code) if isinstance(n, ast.Assign)]
    assert [ast.literal_eval(v) for v in assigned] == [str(root)]
    assert worker.ready(timeout=120)
    worker.send([("plot_training_curves", (_history(),), {"path": str(tmp_path / "c.png")})])
    assert worker.wait() == [tmp_path / "c.png"] and worker.drew
    assert process.returncode == 0


def test_wait_without_figures_is_a_programming_error():
    worker = FigureWorker(None)
    with pytest.raises(RuntimeError, match="no figures were sent"):
        worker.wait()


def test_only_the_figures_of_plots_are_drawn(tmp_path):
    with pytest.raises(ValueError, match="not a figure of inference.plots"):
        draw([("save_figure", (), {"path": str(tmp_path / "x.png")})])
    assert not os.listdir(tmp_path)


def test_only_train_as_a_program_on_rank_0_with_a_second_core_starts_a_worker(monkeypatch):
    import argparse

    import inference.cli as cli

    train, explain = argparse.Namespace(command="train"), argparse.Namespace(command="explain")
    monkeypatch.delenv("RANK", raising=False)
    monkeypatch.setattr(cli, "available_cores", lambda: 2)
    monkeypatch.setattr(cli, "idle_cores", lambda: 1)
    assert cli._draws_in_a_worker(True, train)
    assert not cli._draws_in_a_worker(False, train)  # main([...]) from Python or a test
    assert not cli._draws_in_a_worker(True, explain)
    monkeypatch.setenv("RANK", "1")  # torchrun: rank 0 alone draws
    assert not cli._draws_in_a_worker(True, train)
    monkeypatch.setenv("RANK", "0")
    assert cli._draws_in_a_worker(True, train)
    monkeypatch.setattr(cli, "idle_cores", lambda: 0)  # beside a busy process: none idle now
    assert not cli._draws_in_a_worker(True, train)
    monkeypatch.setattr(cli, "idle_cores", lambda: None)  # no /proc/loadavg: cores decide
    assert cli._draws_in_a_worker(True, train)
    monkeypatch.setattr(cli, "available_cores", lambda: 1)  # nothing to draw on meanwhile
    assert not cli._draws_in_a_worker(True, train)


@pytest.mark.parametrize(
    ("text", "cores", "idle"),
    [
        ("0.52 0.58 0.59 1/77 32443\n", 2, 1),  # this process alone runs: one core idle
        ("1.78 1.33 1.11 2/79 32491\n", 2, 0),  # and a busy one beside it
        ("3.10 2.00 1.00 5/300 1234\n", 16, 11),
        ("9.00 9.00 9.00 40/300 1234\n", 16, 0),  # never below zero
        ("garbled\n", 2, None),
    ],
)
def test_idle_cores_are_the_available_ones_less_what_runs_now(
    tmp_path, monkeypatch, text, cores, idle
):
    import inference.resources as resources

    loadavg = tmp_path / "loadavg"
    loadavg.write_text(text)
    monkeypatch.setattr(resources, "available_cores", lambda: cores)
    assert resources.idle_cores(str(loadavg)) == idle
    assert resources.idle_cores(str(tmp_path / "missing")) is None


def test_idle_cores_counts_this_process_and_a_busy_neighbour():
    import inference.resources as resources

    if resources.idle_cores() is None:
        pytest.skip("no /proc/loadavg here")
    busy = subprocess.Popen([sys.executable, "-c", "while True: pass"])
    try:
        import time

        time.sleep(0.3)  # started: from now on it is runnable in every reading
        readings = [resources.idle_cores() for _ in range(20)]
        assert max(readings) <= resources.available_cores() - 2
    finally:
        busy.kill()
        busy.wait()


def test_the_worker_runs_at_the_lowest_priority():
    import time

    from inference.figure_worker import NICE

    worker = FigureWorker.start()
    want = min(os.getpriority(os.PRIO_PROCESS, 0) + NICE, 19)
    deadline = time.monotonic() + 60
    while os.getpriority(os.PRIO_PROCESS, worker.process.pid) != want:
        assert time.monotonic() < deadline, "the worker never lowered its priority"
        time.sleep(0.01)
    if hasattr(os, "SCHED_IDLE"):  # Linux: it runs only where nothing else wants the core
        assert os.sched_getscheduler(worker.process.pid) == os.SCHED_IDLE
    worker.close()


def _redirect(jobs: list, index: int, where: Path) -> list:
    """``jobs`` with job ``index`` writing into ``where`` instead."""
    name, args, kwargs = jobs[index]
    moved = (name, args, {**kwargs, "path": str(where / Path(kwargs["path"]).name)})
    return [*jobs[:index], moved, *jobs[index + 1 :]]


@pytest.mark.parametrize("failing", [0, 1])
def test_the_worker_draws_on_two_cores_and_answers_the_first_failure_in_order(tmp_path, failing):
    """The worker draws the curves in a forked copy of itself and the other figures meanwhile;
    the answer names the first figure, in the jobs' order, that could not be written."""
    missing = tmp_path / "missing"
    jobs = _redirect(_jobs(tmp_path), failing, missing)
    worker = FigureWorker.start()
    assert worker.ready(timeout=120)
    worker.send(jobs)
    with pytest.raises(FigureError, match=f"{NAMES[failing]}"):
        worker.wait()
    assert worker.drew
    written = sorted(p.name for p in tmp_path.glob("*.png"))
    if failing == 0:  # the other half went on: reconstructions, samples, latent
        assert written == sorted(NAMES[1:])
    else:  # the curves (the copy) and nothing after the failure in its own half
        assert written == ["curves.png"]
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no temporary file


@pytest.mark.skipif(not hasattr(os, "sched_setaffinity"), reason="pinning to a core: Linux")
def test_a_worker_starved_by_a_busy_machine_is_ended_and_the_process_draws(tmp_path, monkeypatch):
    """Every core the worker may use is busy: at its lowest priority it gets next to no time,
    and the program, waiting with nothing else to do, draws the figures itself soon after
    :data:`LATE_SECONDS`, not after :data:`ANSWER_SECONDS`."""
    monkeypatch.setattr(figure_worker, "LATE_SECONDS", 1.0, raising=False)
    monkeypatch.setattr(figure_worker, "ANSWER_SECONDS", 40.0)
    core = {min(os.sched_getaffinity(0))}
    worker = FigureWorker.start()
    process = worker.process
    assert worker.ready(timeout=120)
    os.sched_setaffinity(process.pid, core)  # its forked copy inherits the core
    busy = subprocess.Popen([sys.executable, "-c", "while True: pass"])  # at the program's
    try:  # priority, on the worker's one core
        os.sched_setaffinity(busy.pid, core)
        worker.send(_jobs(tmp_path))
        start = time.monotonic()
        assert [p.name for p in worker.wait()] == NAMES and worker.drew is False
        assert time.monotonic() - start < 20  # 1 s, the starved worker's end, the drawing
    finally:
        busy.kill()
        busy.wait()
    assert process.returncode is not None  # ended and collected
    for name in NAMES:
        assert (tmp_path / name).stat().st_size > 1000


def _children(pid: int) -> list[int]:
    """The processes whose parent is ``pid`` (Linux's /proc)."""
    found = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:  # ended meanwhile
            continue
        if int(fields[1]) == pid:
            found.append(int(stat.parent.name))
    return found


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="PR_SET_PDEATHSIG: Linux")
def test_the_workers_copy_ends_with_the_worker_and_writes_nothing_after(tmp_path):
    """The worker ended (as the program's end ends it: SIGTERM) while its forked copy draws the
    curves: the copy ends too, instead of writing curves.png afterwards."""
    history = _history(20000)  # curves that take a while to draw (0.3 s here)
    jobs = [("plot_training_curves", (history,), {"path": str(tmp_path / "curves.png")}),
            *_jobs(tmp_path)[1:2]]  # fmt: skip
    worker = FigureWorker.start()
    process = worker.process
    assert worker.ready(timeout=120)
    worker.send(jobs)
    deadline = time.monotonic() + 60
    while not (copies := _children(process.pid)):
        assert time.monotonic() < deadline, "the worker never forked its copy"
    process.send_signal(signal.SIGTERM)
    deadline = time.monotonic() + 60
    while not (_gone(process.pid) and all(_gone(c) for c in copies)):
        assert time.monotonic() < deadline, "the copy outlived the worker by a minute"
        time.sleep(0.05)
    time.sleep(2.0)  # longer than the curves take: a copy left drawing would have written them
    assert not (tmp_path / "curves.png").exists()
    worker.close()


@pytest.mark.skipif(not hasattr(os, "sched_setaffinity"), reason="pinning to a core: Linux")
def test_a_starved_worker_ended_at_send_does_not_hold_up_the_program(tmp_path):
    """A worker that a busy machine left no time for its imports is ended when the figures are
    due; at the lowest priority, a killed process takes a while to end (about 0.6 s here), and
    the program goes on (and draws the figures) meanwhile instead of waiting for it."""
    core = {min(os.sched_getaffinity(0))}
    busy = subprocess.Popen([sys.executable, "-c", "while True: pass"])
    try:
        os.sched_setaffinity(busy.pid, core)
        worker = FigureWorker.start()
        process = worker.process
        os.sched_setaffinity(process.pid, core)  # beside the busy process
        time.sleep(1.0)  # into its imports, at the lowest priority: not ready
        start = time.monotonic()
        worker.send(_jobs(tmp_path))
        assert time.monotonic() - start < 0.3
        assert [p.name for p in worker.wait()] == NAMES and worker.drew is False
    finally:
        busy.kill()
        busy.wait()
    assert process.returncode == -signal.SIGKILL  # ended and collected


def test_closing_a_worker_given_figures_removes_what_its_writes_had_begun(tmp_path):
    """A worker killed while writing a figure leaves ``.<name>.<random>.tmp`` (SIGTERM's and
    SIGKILL's default action): close removes those beside the figures sent, nothing else."""
    begun = tmp_path / ".curves.png.k3x9q1.tmp"  # as if the kill came mid-write
    other = tmp_path / ".metrics.jsonl.a1b2c3.tmp"  # not the worker's
    begun.write_bytes(b"half a PNG"), other.write_bytes(b"")
    worker = FigureWorker.start()
    assert worker.ready(timeout=120)
    worker.send(_jobs(tmp_path))
    worker.close()  # abandoned: a Ctrl-C or an error in the report
    assert not begun.exists() and other.exists()
