"""Run elbo-lab against a small tmpfs that fills up, then is remounted read-only.

Started by ``tests/test_reliability.py`` inside ``unshare --mount`` with the tmpfs mounted at
MOUNT; SOURCE is a trained run (copied in) and DATA its data. Prints one JSON list: for every
command its exit status, its stderr lines, and whether the run already there stayed
byte-identical.

    python tests/filesystem_worker.py MOUNT SOURCE DATA
"""

import contextlib
import io
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402

from inference.cli import main  # noqa: E402

TINY = ["--epochs", "1", "--hidden-dims", "8", "--latent-dim", "2", "--no-progress"]


def snapshot(root: Path) -> dict[str, bytes]:
    return {
        str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()
    }


def run(name: str, argv: list[str], watch: Path, results: list) -> str:
    before = snapshot(watch)
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        try:
            code = main(argv)
        except SystemExit as exc:
            code = exc.code
    results.append(
        {
            "name": name,
            "code": code,
            "stderr": err.getvalue().strip().splitlines(),
            "identical": snapshot(watch) == before,
        }
    )
    return out.getvalue()


def fill(mount: Path, leave: int) -> None:
    """Write a filler file that leaves about ``leave`` bytes free."""
    st = os.statvfs(mount)
    free = st.f_bavail * st.f_frsize
    with open(mount / "filler", "wb") as f:
        with contextlib.suppress(OSError):
            f.write(b"\0" * max(free - leave, 0))


def main_(mount: Path, source: Path, data: str) -> list:
    torch.set_num_threads(1)
    results: list = []
    run_a = mount / "A"
    shutil.copytree(source, run_a)
    evaluated = run("evaluate-before", ["evaluate", str(run_a), "--json"], run_a, results)
    fill(mount, leave=8 * 1024)
    train = ["train", *TINY, "--data", data]
    run("full-force", [*train, "--run-dir", str(run_a), "--force"], run_a, results)
    run("full-resume", ["train", "--resume", "--run-dir", str(run_a), "--epochs", "3",
                        "--no-progress", "--checkpoint-every", "0"], run_a, results)  # fmt: skip
    run("full-new", [*train, "--run-dir", str(mount / "B")], run_a, results)
    results.append({"name": "full-leftovers", "entries": sorted(os.listdir(mount))})
    results.append(
        {"name": "full-evaluate-same", "same": run(
            "full-evaluate", ["evaluate", str(run_a), "--json"], run_a, results) == evaluated}
    )  # fmt: skip
    (mount / "filler").unlink()
    run("freed-resume", ["train", "--resume", "--run-dir", str(run_a), "--epochs", "3",
                         "--no-progress"], mount / "nothing", results)  # fmt: skip
    rows = [json.loads(r) for r in (run_a / "metrics.jsonl").read_text().splitlines()]
    results.append({"name": "freed-rows", "epochs": [r["epoch"] for r in rows]})
    subprocess.run(["mount", "-o", "remount,ro", str(mount)], check=True)
    run("ro-new", [*train, "--run-dir", str(mount / "C")], run_a, results)
    run("ro-resume", ["train", "--resume", "--run-dir", str(run_a), "--epochs", "4",
                      "--no-progress"], run_a, results)  # fmt: skip
    run("ro-force", [*train, "--run-dir", str(run_a), "--force"], run_a, results)
    run("ro-evaluate", ["evaluate", str(run_a)], run_a, results)
    report = run("ro-explain", ["explain", str(run_a), "--num-samples", "10"], run_a, results)
    results.append(
        {"name": "ro-explain-report", "printed": "L_K" in report or "log p(x)" in report}
    )
    return results


if __name__ == "__main__":
    mount, source, data = Path(sys.argv[1]), Path(sys.argv[2]), sys.argv[3]
    print("RESULTS " + json.dumps(main_(mount, source, data)))
