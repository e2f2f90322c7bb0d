"""The ``elbo-lab`` command line: a thin layer that turns options into configs and calls the library.

Every user mistake ends in one line ``elbo-lab: error: ...`` naming the file or option, exit 2.
Here: dispatch, threads, exit codes and error lines. The options are :mod:`inference.parser`'s,
their wording :mod:`inference.messages`'s, the commands' bodies :mod:`inference.commands`'s.
"""

from __future__ import annotations

import atexit
import contextlib
import gc
import logging
import os
import sys

from . import collector
from .errors import ElboLabError, OptionError
from .messages import FLAGS, as_options, error_line
from .messages import first_line as _first_line
from .parser import build_parser
from .resources import available_cores, idle_cores
from .threads import SPIN_COUNT

__all__ = ["FLAGS", "STARTUP_MODULES", "as_options", "build_parser", "error_line", "main", "run"]


def _load_library():
    """The commands' module, imported when a command runs: it loads torch, Pyro and matplotlib,
    which the parser, ``--help`` and option errors never need (:mod:`inference.parser`)."""
    from . import commands

    return commands


#: The kernel's setting for how it finds transparent huge pages (Linux).
THP_DEFRAG = "/sys/kernel/mm/transparent_hugepage/defrag"


def huge_pages_stall(path: str = THP_DEFRAG) -> bool:
    """Whether a huge page asked for with ``madvise`` (NumPy asks for one for every large array)
    makes the kernel compact memory first, in the allocating thread: the ``defrag`` modes
    ``always``, ``madvise`` and ``defer+madvise``. Where it does, the program sets
    ``NUMPY_MADVISE_HUGEPAGE=0`` (unless the user set it): on this project's machine
    (``madvise``) loading and casting a 75,000 x 784 float32 array took 0.73-1.12 s of CPU
    with NumPy's huge pages (0.39 s once, with free huge pages at hand) and 0.29-0.37 s without,
    and a 2-epoch MNIST-sized run 4% more CPU (BENCHMARKS.md, "Whole runs", fifth stop).
    torch's own huge pages (``THP_MEM_ALLOC_ENABLE``) are left off, torch's default: they cost
    that run 0.4-1.5 s."""
    try:
        with open(path) as f:
            text = f.read()
    except OSError:  # not Linux, or no THP: nothing stalls
        return False
    chosen = text[text.find("[") + 1 : text.find("]")] if "[" in text else text.strip()
    return chosen in ("always", "madvise", "defer+madvise")


#: MKL's conditional numerical reproducibility, strict: its matrix products give the same bits
#: whatever the number of threads (Intel's documented ``MKL_CBWR``; ``AUTO``: the CPU's own
#: code path). Without it a 784-200-10 VAE's weight gradients changed in the last bits with 2
#: threads, so the steps' thread count (chosen by timing, :class:`inference.threads.StepThreads`)
#: would leak the machine's load into the numbers.
MKL_CBWR = "AUTO,STRICT"


def process_environment(numbers: bool = True) -> None:
    """Set, before torch and NumPy load (each reads these once), what the program runs with;
    a value the user set wins. ``numbers=False`` (``watch``: the user's script computes as it
    would alone) leaves out ``MKL_CBWR``, which changes the products' last bits, and so does a
    process where torch is already loaded.

    - ``OMP_WAIT_POLICY=PASSIVE``: OpenMP threads waiting at a barrier sleep instead of
      spinning, so a run with several threads slows down on a busy machine but does not
      collapse; with it (unless the user set the policy) ``GOMP_SPINCOUNT``
      (:data:`~inference.threads.SPIN_COUNT`, libgomp's documented switch): the spin before the
      sleep is cut to about 30 us, which spans the gaps between one step's products, from
      libgomp's default of about 3 ms.
    - ``MKL_CBWR`` (:data:`MKL_CBWR`): products that do not depend on the thread count.
    - ``NUMPY_MADVISE_HUGEPAGE=0`` where the kernel would stall to grant NumPy's large arrays
      huge pages (:func:`huge_pages_stall`).
    """
    if "OMP_WAIT_POLICY" not in os.environ:
        os.environ["OMP_WAIT_POLICY"] = "PASSIVE"
        os.environ.setdefault("GOMP_SPINCOUNT", str(SPIN_COUNT))
    # MKL reads MKL_CBWR at its first product: once torch is loaded (main called in a process
    # that may have computed already) setting it may change nothing, and the step threads,
    # which trust it (:func:`~inference.resources.step_threads`), would follow the load.
    if numbers and "torch" not in sys.modules:
        os.environ.setdefault("MKL_CBWR", MKL_CBWR)
    if huge_pages_stall():
        os.environ.setdefault("NUMPY_MADVISE_HUGEPAGE", "0")


def _os_error(exc: OSError) -> str:
    """``<path>: <problem>`` for an OSError (ENOSPC, EROFS, EACCES, ENAMETOOLONG, ...)."""
    path = exc.filename if exc.filename is not None else "elbo-lab"
    if len(str(path)) > 200:
        path = f"{str(path)[:100]}...{str(path)[-60:]}"
    return f"{path}: {exc.strerror or exc}"


def _load_library_as_program():
    """:func:`_load_library` in a process that exists to run one command, with Python's cyclic
    garbage collector kept off the millions of objects that torch, Pyro and matplotlib load.

    Imports allocate objects that live until the process ends; the collector's full passes go
    over all of them as the heap grows, and once more as Python shuts down: about 1.6 s of CPU
    of the 7 s that a default ``train`` took (BENCHMARKS.md, "Whole runs"). The collector pauses
    while the library loads; what it loaded is then frozen (:func:`gc.freeze`: later passes
    skip it), and so is everything at exit, the freeze running as the last exit handler. Exit
    handlers still run and streams are flushed; our files are closed when written, so no
    finalizer waits. Not for ``watch`` (the user's script keeps its own process) and not when
    ``main`` is called with arguments, as from Python or a test: there, frozen objects would
    outlive the call.
    """
    collector.freeze_what_pauses_create()
    with collector.paused():
        commands = _load_library()
    atexit.unregister(gc.freeze)  # once, however often main runs in one process
    atexit.register(gc.freeze)  # registered first, so run last of the handlers registered later
    return commands


def _draws_in_a_worker(program: bool, args) -> bool:
    """Whether this command draws its figures in a worker process started now
    (:mod:`inference.figure_worker`): ``train`` as a program (not a call from Python, which
    may call ``main`` many times), on rank 0 (which alone draws), where a second core is
    there to draw on and idle now (:func:`~inference.resources.idle_cores`): with one, or
    beside a busy process, the worker's start would only slow the program's (a digits run
    beside one took 0.08-0.12 s longer with a worker that was never ready)."""
    if not (program and args.command == "train" and os.environ.get("RANK", "0") == "0"):
        return False
    idle = idle_cores()
    return available_cores() > 1 and (idle is None or idle >= 1)


def main(argv: list[str] | None = None) -> int:
    """Run one command; every error is one line on stderr: exit 2 for the user's input and
    the file system, 1 for faults (a non-finite loss, memory exhausted), 128 + N on signal N."""
    global _command
    program = argv is None  # the process runs this one command (console script, python -m)
    argv = list(sys.argv[1:] if argv is None else argv)
    worker = None
    try:
        args = build_parser().parse_args(argv)
        if program:
            _command = args.command
        process_environment(numbers=args.command != "watch")
        if _draws_in_a_worker(program, args):
            from .figure_worker import FigureWorker

            args.figure_worker_ = worker = FigureWorker.start()
        if program and args.command != "watch":
            commands = _load_library_as_program()
        else:
            commands = _load_library()
        threads = getattr(args, "threads", None)
        if threads and threads > available_cores():
            raise OptionError(
                f"--threads: {threads} is more than the {available_cores()} cores available"
            )
        if threads:
            import torch

            torch.set_num_threads(threads)
        if args.command == "watch":  # the script runs as it would alone: its logging, stdout
            return commands.COMMANDS["watch"](args)
        logging.basicConfig(
            level=logging.INFO if args.verbose else logging.WARNING,
            format="%(name)s: %(message)s",
        )
        args.argv_, args.out_ = argv, sys.stdout
        # what the user's model prints goes to stderr: stdout carries the report (or JSON) only
        with contextlib.redirect_stdout(sys.stderr):
            return commands.COMMANDS[args.command](args)
    except ElboLabError as exc:
        print(f"elbo-lab: error: {error_line(exc)}", file=sys.stderr)
        distributed = sys.modules.get(f"{__package__}.distributed")  # loaded if it can fail
        if distributed is not None and isinstance(exc, distributed.DistributedError):
            # a peer died or hung: the process group's threads still wait on it, and tearing
            # them down at interpreter exit can abort ("terminate called ..."); leave at once
            sys.stdout.flush()
            sys.stderr.flush()
            os._exit(2)
        return 2
    except OSError as exc:
        print(f"elbo-lab: error: {_os_error(exc)}", file=sys.stderr)
        return 2
    except MemoryError:
        print("elbo-lab: error: out of memory", file=sys.stderr)
        return 1
    except RuntimeError as exc:
        if "can't allocate memory" not in str(exc) and "out of memory" not in str(exc):
            raise
        print(f"elbo-lab: error: out of memory ({_first_line(exc)[:160]})", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("elbo-lab: interrupted", file=sys.stderr)
        return 130
    finally:
        if worker is not None:  # a run that ended before its figures were collected
            worker.close()


#: Modules a program may find loaded before :func:`run` (besides the standard library's and
#: its own package): ``__main__`` and the helpers that editable installs, setuptools'
#: ``distutils-precedence.pth`` and the environments that virtualenv and uv create
#: (``_virtualenv.pth``: tox, Poetry, Hatch) import at start-up, none of which registers an
#: exit handler.
STARTUP_MODULES = ("__main__", "_distutils_hack", "__editable__", "_virtualenv")


def run() -> None:
    """The program (the ``elbo-lab`` console script, ``python -m inference.cli``): :func:`main`,
    then the process's end, without Python's teardown where nothing can need it.

    After the exit handlers, Python tears down every module and the objects they hold (torch,
    Pyro and their millions of objects): about 0.1 s of a 2.7 s digits run, in which nothing
    of elbo-lab's remains to be done, since its files are closed when written. So :func:`run`
    registers an exit handler of its own before any other (:func:`_leave`), and, when the
    command ends with a status, that handler, running after all the others (the exit
    handlers of torch, multiprocessing, ``weakref.finalize``), flushes the standard streams
    and ends the process with that status (:func:`os._exit`). A process that may hold
    someone else's unfinished work ends as Python ends it: one that imported a user's model,
    guide or data (:func:`inference.user_model.imported_user_code`) or ran ``watch``, or
    that started with a module other than the standard library's, this package's and
    :data:`STARTUP_MODULES` (a ``sitecustomize``, coverage: an exit handler registered
    before this one would be skipped), or that goes on after the command: to an interactive
    prompt (``python -i``), or in a debugger or profiler (:func:`_called_as_program`)."""
    global _status
    foreign = [name for name in sys.modules if not _startup_module(name)]
    # python -i (or PYTHONINSPECT): a prompt follows the command, and what is typed there ends
    # as Python ends it (a file written there is flushed at teardown), with the prompt's status
    armed = not foreign and not sys.flags.inspect and _called_as_program()
    if armed:
        atexit.unregister(_leave)
        atexit.register(_leave)  # only logging's handler is older (this module's import)
    status = main()
    if armed and _command not in (None, "watch"):
        _status = status
    sys.exit(status)


def _called_as_program() -> bool:
    """Whether :func:`run` was called as the program: from a script's module-level code (the
    console script, ``python -c``) or ``python -m``'s, with only :mod:`runpy` below it. A
    debugger, profiler or tracer (``python -m pdb``, ``cProfile``, ``trace``) that runs the
    program catches its ``SystemExit`` and goes on: there the process ends as Python ends it."""
    import inspect

    frame = inspect.currentframe().f_back.f_back  # run's caller; None: called from C
    while frame is not None:
        if frame.f_code.co_name != "<module>" and frame.f_globals.get("__name__") != "runpy":
            return False
        frame = frame.f_back
    return True


def _startup_module(name: str) -> bool:
    top = name.partition(".")[0]
    return (
        top in sys.stdlib_module_names
        or top == __package__
        or any(top.startswith(prefix) for prefix in STARTUP_MODULES)
    )


#: The status :func:`run`'s command ended with, where :func:`_leave` may end the process
#: with it (None: Python ends it); and the command that ran.
_status: int | None = None
_command: str | None = None


def _leave() -> None:
    """:func:`run`'s exit handler, run after every other but logging's (registered at this
    module's import, so called here): end the process with :data:`_status`, the standard
    streams flushed, where no user code was imported; otherwise return, and Python ends it."""
    status = _status
    user_model = sys.modules.get(f"{__package__}.user_model")
    if status is None or (user_model is not None and user_model.imported_user_code()):
        return
    logging.shutdown()
    try:
        for stream in (sys.stdout, sys.stderr):
            if stream is not None:  # None: the program started with that descriptor closed
                stream.flush()
    except (OSError, ValueError):  # a closed or broken stream: Python reports it as ever
        return
    os._exit(status)


if __name__ == "__main__":
    run()
