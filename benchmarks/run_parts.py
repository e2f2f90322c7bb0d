"""Where one ``elbo-lab train`` run's time goes: the command run as a program, its parts timed.

Runs ``elbo-lab train ARGS`` in this process as the console script would (``main()`` reading
``sys.argv``), with ``time.perf_counter`` around its parts: loading the library, ``init``
(constructing the optimizer, which imports ``torch._dynamo``), the epochs' steps (exports
included), the exports alone, evaluation, checkpoints, appended metrics rows, the report and
the figures; and Python's full garbage-collector passes (``gc.callbacks``). Prints seconds per
part and the history's last ELBO (the test split's, else the training data's). For a
whole-process figure run it under ``/usr/bin/time``. Importing the parts to time them imports
torch and Pyro before ``main`` ("before main"), outside the collector pause of
:func:`inference.cli.main` as a program, so a real run's CPU is a little lower than this one's.

    python benchmarks/run_parts.py [-- TRAIN ARGS, e.g. --epochs 40]
"""

from __future__ import annotations

import gc
import json
import sys
import tempfile
import time
from pathlib import Path

T0 = time.perf_counter()
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import inference.cli as cli  # noqa: E402

cli.process_environment()  # the program's environment, before torch loads (main is too late)

import inference.traced_loss as traced_loss  # noqa: E402
import inference.train as train  # noqa: E402
import inference.train_command as train_command  # noqa: E402

PARTS = [
    (cli, "_load_library", "loading the library (torch, Pyro)"),
    (train, "init", "init: the optimizer (imports torch._dynamo)"),
    (train._Loop, "steps", "the steps, exports included"),
    (traced_loss.TracedLoss, "_export", "exports"),
    (train._Evaluation, "split", "evaluation"),
    (train._RunFiles, "save", "checkpoints"),
    (train._RunFiles, "append", "metrics rows appended"),
    (train_command, "_report_training", "report, figures included"),
    (train_command._Figures, "__init__", "figures: their numbers (for the worker)"),
    (train_command._Figures, "write", "figures: the worker's answer awaited (or drawn here)"),
]


def main(argv: list[str] | None = None) -> dict[str, float]:
    argv = list(sys.argv[1:] if argv is None else argv)
    argv = argv[1:] if argv[:1] == ["--"] else argv
    seconds = {"before main (importing elbo-lab, torch, Pyro)": time.perf_counter() - T0}
    originals = []
    for owner, name, label in PARTS:
        original = getattr(owner, name)
        originals.append((owner, name, original))

        def timed(*args, _original=original, _label=label, **kwargs):
            t = time.perf_counter()
            try:
                return _original(*args, **kwargs)
            finally:
                seconds[_label] = seconds.get(_label, 0.0) + time.perf_counter() - t

        setattr(owner, name, timed)
    passes, started = [], [0.0]

    def collector(phase: str, info: dict) -> None:
        if info["generation"] == 2:
            if phase == "start":
                started[0] = time.perf_counter()
            else:
                passes.append(time.perf_counter() - started[0])

    gc.callbacks.append(collector)
    try:
        with tempfile.TemporaryDirectory() as tmp:
            run_dir = Path(tmp) / "run"
            saved_argv = sys.argv
            sys.argv = ["elbo-lab", "train", "--run-dir", str(run_dir), "--no-progress", *argv]
            t = time.perf_counter()
            try:
                status = cli.main()
            finally:
                sys.argv = saved_argv
            seconds["main, in all"] = time.perf_counter() - t
            rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").open()]
    finally:
        gc.callbacks.remove(collector)
        for owner, name, original in originals:
            setattr(owner, name, original)
    seconds["full collector passes during main"] = sum(passes)
    for label, value in seconds.items():
        print(f"{label:<48} {value:7.3f} s")
    print(f"full collector passes: {len(passes)}; exit status {status}")
    last = rows[-1]  # the test split's, or the training data's where there is no test split
    print(f"last {last['split']} ELBO {last['elbo']!r}")
    return seconds


if __name__ == "__main__":
    main()
