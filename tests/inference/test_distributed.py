"""Data-parallel SVI on 2 gloo processes on CPU, against a single process.

The identity checked: with the plate scaled by the global N and shard weights w_r = b_r / B,
sum_r w_r grad loss_r = (N / B) sum_{n in batch} grad l_n, the single-process gradient of the
global batch (exact up to float rounding when each row's noise is the same in both). Then a
2-process ``elbo-lab train`` reaches the test ELBO of one process, a resumed
2-process run equals an uninterrupted one bit for bit, and a rank that crashes ends its peer
with :class:`~inference.distributed.DistributedError` in seconds, not a hang. One launch of two
processes (``distributed_worker.py``) measures all of it; torchrun sets the same variables.
"""

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from inference import cli
from inference.distributed import DistributedError, World, _collective
from inference.errors import OptionError

sys.path.insert(0, str(Path(__file__).parent))
import distributed_worker as worker  # noqa: E402

WORKER = Path(__file__).with_name("distributed_worker.py")
ROOT = Path(__file__).parents[2]
LAUNCH_TIMEOUT = 240  # seconds; a hang would fail here instead of blocking the suite


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _env() -> dict[str, str]:
    return {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}


@pytest.fixture(scope="module")
def two_ranks(tmp_path_factory):
    """Run the worker as ranks 0 and 1 of a gloo group on 127.0.0.1, as torchrun would.

    Returns the output folder and rank 0's results; the ranks end with 2 (rank 0, after the
    error it got when rank 1 crashed) and 3 (rank 1's crash).
    """
    out = tmp_path_factory.mktemp("two_ranks")
    port = _free_port()
    procs = [
        subprocess.Popen(
            [sys.executable, str(WORKER), str(out)],
            env={
                **_env(),
                "RANK": str(rank),
                "LOCAL_RANK": str(rank),
                "WORLD_SIZE": "2",
                "MASTER_ADDR": "127.0.0.1",
                "MASTER_PORT": str(port),
            },
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
            text=True,
            cwd=ROOT,
        )
        for rank in (0, 1)
    ]
    try:
        codes = [p.wait(timeout=LAUNCH_TIMEOUT) for p in procs]
    finally:
        for p in procs:
            p.kill()
    assert codes == [2, 3], [p.stderr.read()[-3000:] for p in procs]
    return out, torch.load(out / "results.pt", weights_only=False)


def test_two_process_gradient_equals_single_process_gradient(two_ranks):
    _, results = two_ranks
    assert results["world_size"] == 2
    single = worker.step_gradients(World())  # the same 63 rows and noise in one process
    for name, g in single.items():
        torch.testing.assert_close(results["gradient"][name], g, rtol=1e-10, atol=1e-10)


def test_two_process_resume_is_bit_identical(two_ranks):
    _, results = two_ranks
    (h_straight, p_straight), (h_resumed, p_resumed) = results["resume"].values()
    strip = lambda h: [{k: v for k, v in row.items() if k != "seconds"} for row in h]  # noqa: E731
    assert strip(h_resumed) == strip(h_straight)
    for name, p in p_straight.items():
        assert torch.equal(p_resumed[name], p), name


def test_two_process_training_matches_one_process(two_ranks, tmp_path):
    out, _ = two_ranks
    assert cli.main(["train", *worker.TRAIN_ARGS, "--run-dir", str(tmp_path / "one")]) == 0

    def last_test_elbo(run_dir):
        rows = [json.loads(r) for r in (run_dir / "metrics.jsonl").read_text().splitlines()]
        return [r for r in rows if r["split"] == "test"][-1]

    two, one = last_test_elbo(out / "cli"), last_test_elbo(tmp_path / "one")
    assert two["n"] == one["n"] == 359  # reduced over both shards of the test split
    assert abs(two["elbo"] - one["elbo"]) < 0.3, (two["elbo"], one["elbo"])
    for name in ("config.json", "checkpoint.pt", "metrics.csv", "curves.png"):
        assert (out / "cli" / name).exists()


def test_a_rank_that_dies_ends_the_job_with_a_clear_error(two_ranks):
    out, _ = two_ranks  # rank 1 crashed in a step (exit 3); rank 0 stopped with exit 2
    seconds, message = (out / "dead_rank.txt").read_text().split("\n", 1)
    assert message.startswith("rank 0 of 2: averaging gradients failed, another rank died")
    assert float(seconds) < 30  # the peer's closed socket, before the 30 s timeout


def test_a_failed_collective_becomes_one_line_naming_the_rank():
    world = World(rank=1, size=2, backend="gloo")
    with pytest.raises(
        DistributedError, match=r"^rank 1 of 2: averaging gradients failed.*Timed out"
    ):
        with _collective(world, "averaging gradients"):
            raise RuntimeError("Timed out waiting 300000ms for recv operation to complete\nmore")


def test_options_that_leave_a_rank_without_rows_are_refused():
    world = World(rank=1, size=4)
    with pytest.raises(OptionError, match="last batch of 2"):
        world.check_batches(n=130, batch=128, scaled=True)
    with pytest.raises(OptionError, match="num_data"):
        world.check_batches(n=130, batch=130, scaled=False)
    World().check_batches(n=130, batch=128, scaled=False)  # one process: anything goes


@pytest.mark.parametrize("rows", [7, 8], ids=["uneven", "even"])
def test_shards_partition_the_global_batch(rows):
    batch = torch.arange(rows)
    shards = [World(rank=r, size=3).shard(batch) for r in range(3)]
    assert torch.equal(torch.cat(shards), batch)
    assert max(len(s) for s in shards) - min(len(s) for s in shards) <= 1
