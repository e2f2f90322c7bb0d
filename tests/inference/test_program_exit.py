"""How the program ends (:func:`inference.cli.run`): without Python's teardown where nothing can
need it, as Python ends it where a user's code or a start-up module might.

``python -v`` reports the teardown: each module it clears is a ``# cleanup[...]`` line on stderr.
"""

from __future__ import annotations

import atexit
import json
import os
import pickle
import subprocess
import sys
from pathlib import Path

import pytest

import inference.cli as cli

ROOT = Path(__file__).resolve().parents[2]
TRAIN = ["train", "--epochs", "1", "--hidden-dims", "8", "--threads", "1", "--no-progress"]


def _python(*argv: str, stdin: bytes | None = None, **env: str) -> subprocess.CompletedProcess:
    """``python -v argv`` with ``env`` added, its standard output a pipe buffered as a user's
    is (not ``PYTHONUNBUFFERED``, which CI or a terminal may set): what the program leaves in
    the buffer is lost unless the program's end flushes it."""
    inherited = {k: v for k, v in os.environ.items() if k != "PYTHONUNBUFFERED"}
    return subprocess.run(
        [sys.executable, "-v", *argv],
        input=stdin, capture_output=True, timeout=300, cwd=ROOT,
        env={**inherited, "PYTHONPATH": str(ROOT), **env},
    )  # fmt: skip


def _torn_down(process: subprocess.CompletedProcess) -> bool:
    return b"# cleanup[" in process.stderr


def test_a_built_in_run_ends_without_teardown_its_output_whole(tmp_path):
    """The report, as JSON through a pipe, arrives whole and parses; the status is the
    command's; and no module was torn down."""
    run = _python("-m", "inference.cli", *TRAIN, "--json", "--run-dir", str(tmp_path / "r"))
    assert run.returncode == 0, run.stderr[-2000:]
    report = json.loads(run.stdout)
    assert report["test"]["bounds"] and (tmp_path / "r" / "metrics.jsonl").is_file()
    assert not _torn_down(run)
    # evaluate leaves its report in stdout's buffer: the program's end writes it
    run = _python("-m", "inference.cli", "evaluate", str(tmp_path / "r"), "--json")
    assert run.returncode == 0, run.stderr[-2000:]
    assert json.loads(run.stdout)["bounds"] and not _torn_down(run)


def test_a_user_error_keeps_its_status_and_line(tmp_path):
    run = _python("-m", "inference.cli", "evaluate", str(tmp_path / "none"))
    assert run.returncode == 2
    assert run.stderr.decode().splitlines()[-1].startswith("elbo-lab: error: ")
    assert not _torn_down(run)


def test_the_exit_handlers_of_the_command_run_before_the_end(tmp_path):
    """The program's end comes after every exit handler registered while the command ran
    (torch's, multiprocessing's, ``weakref.finalize``'s), not in their place."""
    code = (
        "import atexit, os, inference.cli as cli\n"
        "command = cli.main\n"
        "def main():\n"
        "    atexit.register(os.write, 2, b'late handler ran\\n')\n"
        "    return command()\n"
        "cli.main = main\n"
        "cli.run()\n"
    )
    run = _python("-c", code, "evaluate", str(tmp_path / "none"))
    assert run.returncode == 2
    assert b"late handler ran" in run.stderr and not _torn_down(run)


def test_a_program_started_with_stdout_closed_ends_quietly(tmp_path):
    """``elbo-lab ... >&-``: Python's ``sys.stdout`` is None; the exit handler skips it, as
    Python's own flush does, rather than failing in it ("Exception ignored in atexit")."""
    run = subprocess.run(
        ["sh", "-c", 'exec "$@" >&-', "sh", sys.executable, "-v", "-m", "inference.cli",
         "evaluate", str(tmp_path / "none")],
        capture_output=False, stderr=subprocess.PIPE, timeout=300, cwd=ROOT,
        env={**os.environ, "PYTHONPATH": str(ROOT)},
    )  # fmt: skip
    assert run.returncode == 2
    assert b"elbo-lab: error: " in run.stderr and b"Exception ignored" not in run.stderr
    assert not _torn_down(run)


def test_a_prompt_after_the_command_ends_as_python_ends_it(tmp_path):
    """``python -i -m inference.cli ...``: the prompt that follows is the user's; a file
    written there and left open is flushed at teardown, and the status is the prompt's."""
    typed = f"f = open({str(tmp_path / 'typed.txt')!r}, 'w'); f.write('kept')\n"
    run = _python("-i", "-m", "inference.cli", "evaluate", str(tmp_path / "none"),
                  stdin=typed.encode())  # fmt: skip
    assert run.returncode == 0, run.stderr[-2000:]
    assert (tmp_path / "typed.txt").read_text() == "kept" and _torn_down(run)


def test_a_program_run_in_a_debugger_ends_as_python_ends_it(tmp_path):
    """``python -m pdb -m inference.cli ...``: pdb catches the command's SystemExit and
    restarts the program (clearing its globals); quitting then ends as Python ends it, without
    an exit handler failing on what the restart cleared."""
    run = _python("-m", "pdb", "-m", "inference.cli", "evaluate", str(tmp_path / "none"),
                  stdin=b"continue\nquit\n")  # fmt: skip
    assert run.returncode == 0, run.stderr[-2000:]
    assert b"Exit status: 2" in run.stdout and b"Exception ignored" not in run.stderr
    assert _torn_down(run)


def test_a_run_of_a_users_model_ends_as_python_ends_it(tmp_path):
    """A user's module may leave work to Python's teardown (here an object's finalizer at
    module cleanup; a file left open would be flushed there): it runs."""
    model = tmp_path / "mine.py"
    model.write_text(
        "import os\n"
        "import pyro, pyro.distributions as dist, torch\n"
        "class Last:\n"
        "    def __del__(self, write=os.write):\n"
        "        write(2, b'finalized at teardown\\n')\n"
        "last = Last()\n"
        "def model(x):\n"
        "    loc = pyro.sample('loc', dist.Normal(torch.zeros(3), 1.0).to_event(1))\n"
        "    with pyro.plate('data', x.shape[0]):\n"
        "        pyro.sample('obs', dist.Normal(loc, 1.0).to_event(1), obs=x)\n"
    )
    data = tmp_path / "x.npy"
    data.write_bytes(_npy_rows())
    run = _python(
        "-m", "inference.cli", "train", "--model", f"{model}:model", "--data", str(data),
        "--epochs", "1", "--no-progress", "--run-dir", str(tmp_path / "r"),
    )  # fmt: skip
    assert run.returncode == 0, run.stderr[-2000:]
    assert b"finalized at teardown" in run.stderr and _torn_down(run)


def _npy_rows() -> bytes:
    import io

    import numpy as np

    buf = io.BytesIO()
    np.save(buf, np.random.default_rng(0).normal(size=(40, 3)).astype(np.float32))
    return buf.getvalue()


def test_a_start_up_module_not_the_librarys_keeps_the_teardown(tmp_path):
    """A ``sitecustomize`` (coverage's hook, say) may have registered an exit handler before
    the program's own: the program then ends as Python ends it, and that handler runs."""
    (tmp_path / "sitecustomize.py").write_text(
        "import atexit, sys\natexit.register(lambda: sys.stderr.write('site handler ran\\n'))\n"
    )
    run = subprocess.run(
        [sys.executable, "-v", "-m", "inference.cli", "evaluate", str(tmp_path / "none")],
        capture_output=True, timeout=300, cwd=ROOT,
        env={**os.environ, "PYTHONPATH": os.pathsep.join([str(tmp_path), str(ROOT)])},
    )  # fmt: skip
    assert run.returncode == 2
    assert b"site handler ran" in run.stderr and _torn_down(run)


def test_the_figure_worker_leaves_once_it_has_answered(tmp_path):
    """The program collects the worker's answer when the worker exits: it exits as soon as
    the answer is written, without tearing matplotlib down, but after matplotlib's exit
    handlers: where the user's config directory is not writable, matplotlib's temporary one
    is removed."""
    import numpy as np

    history = [
        {"epoch": e, "split": s, "loss": 2.0 / e, "elbo": -2.0 / e, "reconstruction": -1.0,
         "kl": 0.5}
        for e in (1, 2) for s in ("train", "test")
    ]  # fmt: skip
    images = np.zeros((2, 4), np.float32)
    jobs = [
        ("plot_training_curves", (history,), {"path": str(tmp_path / "curves.png")}),
        ("plot_samples", (images, (2, 2)), {"path": str(tmp_path / "samples.png")}),
    ]
    code = f"from inference.figure_worker import serve; serve(parent={os.getpid()})"
    (tmp_path / "file").write_text("")
    (tmp_path / "tmp").mkdir()
    worker = _python(
        "-c", code, stdin=pickle.dumps(jobs),
        MPLCONFIGDIR=str(tmp_path / "file" / "mpl"), TMPDIR=str(tmp_path / "tmp"),
    )  # fmt: skip
    assert worker.returncode == 0, worker.stderr[-2000:]
    answer = pickle.loads(worker.stdout[1:])  # after the READY byte
    assert answer == ("ok", [kwargs["path"] for _, _, kwargs in jobs])
    assert not _torn_down(worker)
    assert b"created a temporary cache directory" in worker.stderr
    assert not list((tmp_path / "tmp").glob("matplotlib-*"))


@pytest.fixture
def no_exit(monkeypatch):
    """``os._exit`` recorded, not called, and ``logging.shutdown`` not called either (it would
    close pytest's own handlers, a ``--log-file`` for the rest of the session); and
    :func:`inference.cli._leave` left unregistered afterwards, so that this test process ends
    as Python ends it."""
    calls = []
    monkeypatch.setattr(cli.os, "_exit", calls.append)
    monkeypatch.setattr(cli.logging, "shutdown", lambda: None)
    monkeypatch.setattr(cli, "_status", None)
    monkeypatch.setattr(cli, "_command", None)
    yield calls
    atexit.unregister(cli._leave)


def test_leave_ends_only_a_finished_command_that_ran_no_user_code(no_exit, monkeypatch):
    import inference.user_model as user_model

    cli._leave()
    assert no_exit == []  # no status: a command still running, or one run() did not run
    monkeypatch.setattr(cli, "_status", 3)
    monkeypatch.setattr(user_model, "_imported_user_code", True)
    cli._leave()
    assert no_exit == []
    monkeypatch.setattr(user_model, "_imported_user_code", False)
    cli._leave()
    assert no_exit == [3]


@pytest.mark.parametrize("command, foreign, leaves", [
    ("evaluate", False, True), ("watch", False, False), ("evaluate", True, False),
])  # fmt: skip
def test_run_arms_the_exit_only_for_its_own_commands(
    no_exit, monkeypatch, command, foreign, leaves
):
    def main():
        cli._command = command
        return 5

    monkeypatch.setattr(cli, "main", main)
    # this test process has loaded pytest, torch, ...: only the hook below counts as foreign
    monkeypatch.setattr(cli, "_startup_module", lambda name: name != "coverage_like_hook")
    monkeypatch.setattr(cli, "_called_as_program", lambda: True)  # here pytest calls it
    if foreign:
        monkeypatch.setitem(sys.modules, "coverage_like_hook", sys)
    with pytest.raises(SystemExit) as exit:
        cli.run()
    assert exit.value.code == 5
    assert cli._status == (5 if leaves else None)


def test_start_up_modules_are_the_standard_librarys_the_packages_and_the_install_hooks():
    for name in ("site", "os.path", "encodings.utf_8", "inference.cli", "__main__",
                 "_distutils_hack", "__editable___elbo_lab_0_1_0_finder",
                 "_virtualenv"):  # fmt: skip
        assert cli._startup_module(name), name
    for name in ("sitecustomize", "usercustomize", "coverage", "torch", "inference_extra"):
        assert not cli._startup_module(name), name
