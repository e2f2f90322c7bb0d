"""A run's figures drawn by a second process while the first one works: :class:`FigureWorker`.

Drawing costs a short run more than its arithmetic: matplotlib's import (about 0.2 s) and the
first rendering of a run's four figures (about 0.3 s) were a sixth of a default 40-epoch
digits ``elbo-lab train``, whose training steps keep one core busy and leave the other idle
(BENCHMARKS.md, "Whole runs", eighth stop). So ``elbo-lab train``, run as a program, starts a
worker before it loads torch: a Python process that imports NumPy and matplotlib (not torch),
draws a throwaway figure so that fonts and text layout are loaded, and waits on its standard
input, at the lowest priority. When the run has trained, the program computes the figures'
numbers (the history, the reconstructions, the prior samples and the guide means, as NumPy
arrays: :func:`training_figure_jobs`) and sends them: before the report's checks where those
run on one thread, so that the worker draws meanwhile, after them where they take every core.
Then it waits for the worker's answer. A worker that is not ready by then (a busy machine left
it no time), or has not answered :data:`LATE_SECONDS` after the program began to wait, is
ended, and the program draws the figures itself. The worker calls the same functions of
:mod:`inference.plots` on the same arrays as the program would (:func:`draw`), and writes each
PNG atomically, so the files are those drawn in process. It draws on both cores (the program
is idle by then): the training curves, which take as long as the other figures together, in a
forked copy of itself (matplotlib loaded already), the others meanwhile.

Whatever goes wrong with the worker itself (it cannot start, it dies, its answer is not one)
is not the user's concern: the program then draws the figures itself, as before, and a figure
that cannot be written is the same one-line warning either way. The worker ignores SIGINT (a
Ctrl-C in the terminal reaches the whole process group; the program handles it) and ends when
its input closes, or (Linux) when the program ends, so a program killed outright leaves no
worker behind, nor figures written after it.
"""

from __future__ import annotations

import atexit
import glob
import os
import pickle
import select
import signal
import subprocess
import sys
import threading
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from . import collector
from .files import TMP_SUFFIX
from .messages import first_line

__all__ = ["FigureError", "FigureWorker", "draw", "serve", "training_figure_jobs"]

#: A figure to draw: the name of a function of :mod:`inference.plots`, its positional and its
#: keyword arguments (NumPy arrays, lists, strings and paths: what ``pickle`` carries).
Job = tuple[str, tuple, dict]

#: The functions of :mod:`inference.plots` a job may name.
PLOTS = ("plot_training_curves", "plot_reconstructions", "plot_samples", "plot_latent_space")

#: The worker's niceness (``os.nice``), with Linux's ``SCHED_IDLE`` policy on top
#: (:func:`_lowest_priority`): where the machine is busy, its imports take only what nothing
#: else wants, not a share of the program's core (with nice 19 alone, a digits run beside a
#: busy process took 0.24 s longer). A worker that is not ready when the figures are due
#: (:meth:`FigureWorker.send`) is ended and the program draws them itself, as without one.
NICE = 19

#: What the worker writes once it has loaded matplotlib and drawn its warm-up figure.
READY = b"R"

#: Seconds the program waits for the worker's answer before it draws the figures itself.
ANSWER_SECONDS = 300.0

#: Seconds the program, with nothing else left to do (:meth:`FigureWorker.wait`), waits for
#: the worker's answer before it ends the worker and draws the figures itself. Where every
#: core is busy, ``SCHED_IDLE`` leaves the worker next to no time (a default digits run's
#: figures, about 1 s to draw in process beside a busy process, were not drawn in 20 s), while
#: the program, at its own priority, gets its share; so a busy machine costs the program
#: about this much more than drawing in process (and the time the starved worker takes to
#: end), not :data:`ANSWER_SECONDS`.
LATE_SECONDS = 5.0

#: ``prctl``'s option for the signal a process gets when its parent ends (linux/prctl.h).
PR_SET_PDEATHSIG = 1


def training_figure_jobs(
    run_dir: str | os.PathLike,
    history: Sequence[Mapping[str, Any]],
    module: Any,
    data: Any,
    *,
    num_images: int = 10,
    num_samples: int = 40,
    seed: int = 0,
    title: str | None = None,
) -> list[Job]:
    """The figures of :func:`inference.plots.write_training_figures` as jobs for :func:`draw`:
    the numbers computed here (with torch, without gradients), the drawing left to ``draw``.

    Always ``curves.png``; for image data and a module with ``reconstruct``/``sample``
    ``reconstructions.png`` of the first ``num_images`` test images and ``samples.png`` of
    ``num_samples`` prior draws (a generator seeded with ``seed``: the global random state is
    not touched), and for a module with an amortized ``encoder`` ``latent.png`` of the test
    split's guide means, coloured by label.
    """
    run_dir = Path(run_dir)
    jobs: list[Job] = [
        ("plot_training_curves", ([dict(r) for r in history],), _at(run_dir, "curves", title))
    ]
    if module is None or data is None:  # a user's model: its arguments are not images
        return jobs
    import torch

    x = data.test if len(data.test) else data.train
    labels = data.test_labels if len(data.test) else data.train_labels
    shape = data.image_shape
    with torch.no_grad():
        if shape is not None and hasattr(module, "reconstruct"):
            xs = x[:num_images]
            arrays = (_array(xs), _array(module.reconstruct(xs)), tuple(shape))
            jobs.append(("plot_reconstructions", arrays, _at(run_dir, "reconstructions")))
        if shape is not None and hasattr(module, "sample"):
            generator = torch.Generator(device=x.device).manual_seed(seed)
            samples = module.sample(num_samples, generator=generator)
            jobs.append(("plot_samples", (_array(samples), tuple(shape)), _at(run_dir, "samples")))
        if shape is not None and hasattr(module, "encoder"):
            z_loc = module.encoder.distribution(x).mean  # the guide's means
            arrays = (_array(z_loc), None if labels is None else _array(labels))
            jobs.append(("plot_latent_space", arrays, _at(run_dir, "latent")))
    return jobs


def _at(run_dir: Path, name: str, title: str | None = None) -> dict:
    kwargs: dict[str, Any] = {"path": str(run_dir / f"{name}.png")}
    if title is not None:
        kwargs["title"] = title
    return kwargs


def _array(a: Any) -> Any:
    """A tensor as a NumPy array (detached, on the CPU); anything else as it is."""
    return a.detach().cpu().numpy() if hasattr(a, "detach") else a


def draw(jobs: Sequence[Job]) -> list[Path]:
    """Draw and write the figures of ``jobs`` in order; return their paths. The first that
    cannot be drawn or written raises (its file is not written; those before it are)."""
    plots = _plots()
    paths = []
    for name, args, kwargs in jobs:
        if name not in PLOTS:
            raise ValueError(f"not a figure of inference.plots: {name!r}")
        getattr(plots, name)(*args, **kwargs)
        paths.append(Path(kwargs["path"]))
    return paths


def _plots():
    """:mod:`inference.plots`, matplotlib imported with Python's cyclic collector paused
    (:func:`inference.collector.paused`): in a program that froze its library's objects
    (:func:`inference.cli.main`), the collector's full passes during the import went over
    every object it creates, 0.08 s of a digits run that drew its own figures."""
    with collector.paused():
        from . import plots

    return plots


def _warm_up() -> None:
    """Draw a throwaway figure in memory: the first drawing in a process loads fonts and lays
    out text for the first time (about 0.15 s here), so the real figures need not."""
    import io

    plots = _plots()
    history = [
        {
            "epoch": e,
            "split": s,
            "loss": 1.0 / e,
            "elbo": -1.0 / e,
            "reconstruction": -1.0,
            "kl": 0.1,
            "svi_loss": 1.0 / e,
        }
        for e in (1, 2)
        for s in ("train", "test")
    ]
    fig = plots.plot_training_curves(history, title="warm-up")
    fig.savefig(io.BytesIO(), format="png", dpi=plots.DPI)


def _lowest_priority() -> None:
    """Run this process only on a core that nothing else wants: ``SCHED_IDLE`` (Linux), and
    :data:`NICE` (for the rest, and elsewhere)."""
    try:
        os.sched_setscheduler(0, os.SCHED_IDLE, os.sched_param(0))
    except (AttributeError, OSError):  # not Linux, or not allowed: nice alone
        pass
    try:
        os.nice(NICE)
    except (AttributeError, OSError):
        pass


def _end_with(parent: int) -> bool:
    """Have the kernel end this process when ``parent`` (the program) ends, also by SIGTERM or
    SIGKILL, which skip the program's :meth:`FigureWorker.close`: Linux's
    ``PR_SET_PDEATHSIG``, a SIGTERM left to its default action, which ends the process at once.
    (Raising ``SystemExit`` from a handler instead is not reliable: a handler that runs inside
    a finalizer has its exception ignored, and the worker went on to write the figures after
    the program had died.) A figure being written then may leave its temporary file beside it,
    as any atomic write a SIGKILL cuts short does; :meth:`FigureWorker.close` removes those of
    a worker it ends, where the program lives to do so. False where ``parent`` has
    ended already. (Elsewhere the worker ends at the end of its input, or once it has drawn.)"""
    signal.signal(signal.SIGTERM, signal.SIG_DFL)
    if sys.platform.startswith("linux"):
        import ctypes

        try:
            ctypes.CDLL(None, use_errno=True).prctl(PR_SET_PDEATHSIG, signal.SIGTERM, 0, 0, 0)
        except (OSError, AttributeError):  # no prctl to call: as elsewhere
            pass
    return os.getppid() == parent


def serve(stdin=None, stdout=None, parent: int | None = None) -> int:
    """The worker's main: warm up and say so (:data:`READY` on ``stdout``), read one pickled
    list of jobs from ``stdin``, draw them, and write the pickled answer to ``stdout``:
    ``("ok", paths)`` or ``("error", "Type: first line")`` for the figure that could not be
    drawn. Returns 0; as the program's worker (``parent``), the process then ends after its
    exit handlers, without Python's teardown (:func:`_end_once_answered`). An empty input
    (the program ended without figures) returns at once, and so does a worker whose
    ``parent`` (the program's process id) has ended (:func:`_end_with`). Signals are the
    worker's concern: called from Python (no ``parent``), it leaves the process's handlers as
    they are."""
    answered: list[bool] = []
    if parent is not None:
        _lowest_priority()  # before the imports: a core the program needs is not the worker's
        signal.signal(signal.SIGINT, signal.SIG_IGN)  # the program answers a Ctrl-C, not this
        if not _end_with(parent):
            return 0
        # registered before matplotlib's exit handlers (a temporary config directory removed
        # where the user's is not writable), so run after them
        atexit.register(_end_once_answered, answered)
    stdin = sys.stdin.buffer if stdin is None else stdin
    stdout = sys.stdout.buffer if stdout is None else stdout
    _warm_up()
    stdout.write(READY)  # the program sends figures only to a worker that is ready
    stdout.flush()
    try:
        jobs = pickle.load(stdin)
    except EOFError:
        return 0
    answer = _drawn_in_two(jobs) if parent is not None else _drawn(jobs)
    pickle.dump(answer, stdout)
    stdout.flush()
    answered.append(True)
    return 0


def _end_once_answered(answered: list[bool]) -> None:
    """The program's worker's last exit handler: once its answer is written, end the process
    (:func:`os._exit`): the program collects the answer at the worker's exit, which Python's
    teardown of matplotlib would delay by 0.1 s."""
    if answered:
        os._exit(0)


def _drawn(jobs: Sequence[Job]) -> tuple:
    """:func:`draw`'s paths as ``("ok", [path, ...])``, or ``("error", "Type: first line")``."""
    try:
        return ("ok", [str(p) for p in draw(jobs)])
    except Exception as exc:  # noqa: BLE001 - the program reports it, as it would its own
        return ("error", f"{type(exc).__name__}: {first_line(exc)}")


def _drawn_in_two(jobs: Sequence[Job]) -> tuple:
    """:func:`_drawn` on both cores: the first job (the training curves, which take as long as
    the other figures together) in a forked copy of the worker, matplotlib already loaded,
    the others here; the program is idle meanwhile, waiting for the answer. The paths come in
    the jobs' order; where both halves fail, the first job's error is the answer (the other
    half's figures are written all the same). One process where ``fork`` is not to be had."""
    if len(jobs) < 2 or not hasattr(os, "fork"):
        return _drawn(jobs)
    read, write = os.pipe()
    worker = os.getpid()
    try:
        pid = os.fork()
    except OSError:
        os.close(read)
        os.close(write)
        return _drawn(jobs)
    if pid == 0:  # the copy: draw the first figure, answer through the pipe, leave at once
        code = 1
        try:
            os.close(read)
            if not _end_with(worker):  # it ends with the worker, as the worker with the program
                return ("error", "the worker ended")
            with os.fdopen(write, "wb") as out:
                pickle.dump(_drawn(jobs[:1]), out)
            code = 0
        finally:
            os._exit(code)
    os.close(write)
    rest = _drawn(jobs[1:])
    with os.fdopen(read, "rb") as answer:
        data = answer.read()
    os.waitpid(pid, 0)
    first = pickle.loads(data) if data else _drawn(jobs[:1])  # the copy died: draw it here
    if first[0] == "error":
        return first
    if rest[0] == "error":
        return rest
    return ("ok", first[1] + rest[1])


class FigureError(Exception):
    """A figure the worker could not draw or write: ``str`` is its error's type and first line,
    ``"OSError: [Errno 28] No space left on device: ..."``, as the program words its own."""


class FigureWorker:
    """A drawing process started now (:meth:`start`), given its figures later (:meth:`send`),
    its answer collected last (:meth:`wait`).

    ``wait`` returns the figures' paths, or raises :class:`FigureError` naming what the worker
    could not draw or write; if the worker failed, it draws the figures here instead (and what
    cannot be drawn raises as it does there). ``close`` ends a worker whose answer ``wait`` has
    not collected (given nothing, or given figures and then abandoned); it is safe to call at
    any time, and twice.
    """

    def __init__(self, process: subprocess.Popen | None):
        self.process = process
        self.jobs: list[Job] | None = None
        self._talk: threading.Thread | None = None
        self._answer: tuple | None = None
        self._ready = False
        self.drew: bool | None = None  # after wait: whether the worker drew the figures

    @classmethod
    def start(cls) -> FigureWorker:
        """Start the worker: this Python, on the ``inference`` package this process imported
        (not whatever the working directory holds). It ends with the thread that starts it
        (Linux's ``PR_SET_PDEATHSIG``): the program's main thread."""
        root = str(Path(__file__).resolve().parents[1])
        code = (
            f"import sys; sys.path[0] = {root!r}; "
            f"from inference.figure_worker import serve; sys.exit(serve(parent={os.getpid()}))"
        )
        if not sys.executable:  # an embedded Python: no interpreter to start
            return cls(None)
        try:
            process = subprocess.Popen(
                [sys.executable, "-c", code],
                stdin=subprocess.PIPE,
                stdout=subprocess.PIPE,
                stderr=subprocess.DEVNULL,
            )
        except (OSError, ValueError):  # no process to be had: the program draws them itself
            process = None
        return cls(process)

    def ready(self, timeout: float = 0.0) -> bool:
        """Whether the worker has loaded matplotlib and drawn its warm-up figure, waiting up
        to ``timeout`` seconds for it to say so (False for a worker that died or is gone)."""
        if not self._ready and self.process is not None:
            stdout = self.process.stdout
            if select.select([stdout], [], [], timeout)[0]:
                self._ready = os.read(stdout.fileno(), len(READY)) == READY
        return self._ready and self.process is not None

    def send(self, jobs: Sequence[Job]) -> None:
        """Hand the worker its figures; it draws them while this process goes on (a thread
        feeds the pipe, so a large latent scatter does not block the caller). A worker that is
        not :meth:`ready` (a busy machine left its low priority no time) is ended instead:
        :meth:`wait` then draws the figures here, sooner than the worker would."""
        self.jobs = list(jobs)
        if not self.ready():  # killed, collected later: at its priority it takes a while to end
            self._end()
            return
        data = pickle.dumps(self.jobs)
        self._talk = threading.Thread(target=self._communicate, args=(data,), daemon=True)
        self._talk.start()

    def _communicate(self, data: bytes) -> None:
        process = self.process
        try:
            out, _ = process.communicate(data, timeout=ANSWER_SECONDS)
            answer = pickle.loads(out)
        except Exception:  # noqa: BLE001 - a broken pipe, a timeout, no answer: draw here
            process.kill()
            process.wait()
            return
        if (
            process.returncode == 0
            and isinstance(answer, tuple)
            and answer[:1] in (("ok",), ("error",))
        ):
            self._answer = answer

    def wait(self) -> list[Path]:
        """The paths of the figures sent (:meth:`send`), drawn by the worker or, where it
        failed or has not answered within :data:`LATE_SECONDS`, here."""
        if self.jobs is None:
            raise RuntimeError("FigureWorker.wait: no figures were sent")
        answer = None
        if self._talk is not None:
            self._talk.join(LATE_SECONDS)
            if self._talk.is_alive():  # starved by a busy machine: end it, draw here instead
                self._end()
            else:
                answer = self._answer
        self._answer = None
        self.drew = answer is not None
        try:
            if answer is None:  # no worker, or it failed: draw the figures in this process
                return draw(self.jobs)
        finally:  # collect the worker, also one ended above (it ends while this one draws)
            self.close()
        if answer[0] == "ok":
            return [Path(p) for p in answer[1]]
        raise FigureError(answer[1])

    def _end(self) -> None:
        """Kill the worker without waiting for it to end; :meth:`close` collects it."""
        if self.process is not None:
            self.process.kill()

    def close(self) -> None:
        """End the worker unless :meth:`wait` collected it: one given nothing is only waiting,
        and one given figures whose answer nobody awaits (a Ctrl-C or an error in the report)
        would go on writing them after the program ended."""
        process = self.process
        if process is None:
            return
        self.process = None
        process.kill()
        if self._talk is not None:  # its thread sees the pipe close and ends (and closes it)
            self._talk.join()
        process.wait()  # also after a join a Ctrl-C cut short, which marks the thread ended
        if self._talk is None:
            for stream in (process.stdin, process.stdout):
                if stream is not None:
                    stream.close()
        else:  # killed while it drew: what its atomic writes had begun, not their files
            self._remove_temporary_files()

    def _remove_temporary_files(self) -> None:
        """Remove the temporary files (``.<name>.<random>.tmp``) that a worker killed while
        writing the figures sent to it left beside them."""
        for _, _, kwargs in self.jobs or ():
            path = Path(kwargs["path"])
            for temporary in path.parent.glob(f".{glob.escape(path.name)}.*{TMP_SUFFIX}"):
                temporary.unlink(missing_ok=True)
