"""How many torch threads a command uses by default: from the size of its work, not the core count.

torch's default is one intra-op thread per core. For a small model that is slower than one
thread even on a quiet machine, and on a busy one it collapses: every operator ends in a barrier
where OpenMP threads wait for a partner that the scheduler has not run (BENCHMARKS.md, "Threads":
the default VAE's steps ran 6x slower with 2 threads beside one busy process, 1 thread lost
nothing). So a thread is only added per :data:`MIN_FLOPS_PER_THREAD` of work in one forward
pass over a step's or a chunk's rows, and the command line makes waiting threads sleep
(``OMP_WAIT_POLICY=PASSIVE``) so that a run given more threads slows down under load but does
not collapse.

The work is counted for dense networks: a matrix product of a ``(rows, n_in)`` batch with an
``(n_in, n_out)`` weight costs ``2 rows n_in n_out`` floating-point operations, so a forward
pass costs ``2 rows W`` (:func:`forward_flops`), with ``W`` the number of weights that each row
meets. The forward pass is counted, for training too: what a thread gains depends on the size
of each product, and a backward pass runs twice as many products of the same sizes, not larger
ones. (MNIST-sized VAE, 784-400-20, one epoch on a quiet machine: training batches of 256 rows
ran no faster with 2 threads, 384 rows 12% faster; the final evaluation in chunks of 1,024 rows
1.6x faster. The rule gives a second thread from 512 rows of that model.)

Slowing down is still a loss: with one other busy process on the 2 cores, the report of a
784-200-10 VAE on MNIST-sized data (L_100 in chunks of 4,000 rows, which the rule gives 2
threads) ran 1.55x slower with 2 threads than with 1, where on a quiet machine 2 threads took
0.67x the time. So threads the rule proposes are kept only when a quick probe confirms them
(:func:`confirmed_threads`): one matrix product of the phase's largest layer, timed now with
those threads and with one.
"""

from __future__ import annotations

import contextlib
import itertools
import statistics
import time
from collections.abc import Callable, Iterator, Sequence

__all__ = [
    "MIN_FLOPS_PER_THREAD",
    "PROBE_SPEEDUP",
    "confirmed_threads",
    "forward_flops",
    "largest_layer",
    "threads_for",
    "torch_threads",
    "weights_per_row",
]

#: Work in one forward pass that one more thread must have to be worth starting: about 3 ms of
#: one core's time in products of a few hundred microseconds, where fork/join and wake-ups stop
#: mattering. A third of 1 GFLOP, the rule's threshold for a training step (forward and
#: backward) before the forward pass alone was counted: training keeps the same threads.
MIN_FLOPS_PER_THREAD = 1e9 / 3


def weights_per_row(
    model: str, data_dim: int, latent_dim: int = 10, hidden_dims: Sequence[int] = (200,)
) -> int:
    """Weights one data row meets in a model/guide pass: ``W`` for :func:`forward_flops`.

    VAE: encoder ``D -> hidden... -> 2L`` (location and scale) and decoder ``L -> ...hidden -> D``;
    ppca/fa: ``D x L`` each way; a user model: ``D`` (its work per row is unknown, and small models
    are the common case).
    """
    return sum(a * b for a, b in _layers(model, data_dim, latent_dim, hidden_dims))


def largest_layer(
    model: str, data_dim: int, latent_dim: int = 10, hidden_dims: Sequence[int] = (200,)
) -> tuple[int, int]:
    """``(n_in, n_out)`` of the layer with the most weights (:func:`weights_per_row`'s layers)."""
    return max(_layers(model, data_dim, latent_dim, hidden_dims), key=lambda io: io[0] * io[1])


def _layers(
    model: str, data_dim: int, latent_dim: int, hidden_dims: Sequence[int]
) -> list[tuple[int, int]]:
    """The ``(n_in, n_out)`` weight matrices one row meets in a model/guide pass."""
    if model == "vae":
        encoder = [data_dim, *hidden_dims, 2 * latent_dim]
        decoder = [latent_dim, *reversed(tuple(hidden_dims)), data_dim]
        return [pair for sizes in (encoder, decoder) for pair in itertools.pairwise(sizes)]
    if model in ("ppca", "fa"):
        return [(data_dim, latent_dim), (latent_dim, data_dim)]
    return [(data_dim, 1)]


def forward_flops(weights: int, rows: int) -> float:
    """Floating-point operations of one forward pass over ``rows`` rows: ``2 rows W``."""
    return 2.0 * rows * weights


def threads_for(flops: float, cores: int) -> int:
    """Threads for a forward pass of ``flops``: one per :data:`MIN_FLOPS_PER_THREAD`, 1 to
    ``cores``."""
    return max(1, min(cores, int(flops // MIN_FLOPS_PER_THREAD)))


#: Threads the rule proposes are kept when the probe's product takes at most this fraction of
#: its one-thread time with them. 2 threads on the 2-core machine, a 1024x784x400 product, 15
#: probes each: 0.51-0.54 quiet, 0.71-2.27 beside one busy process (where 0.8 let 5 of 20
#: probes keep 2 threads).
PROBE_SPEEDUP = 0.65
#: Rows of the probe's product (fewer when the phase's own chunks are smaller): a 784x400
#: layer takes about 6 ms on one core, so the probe costs about 60 ms.
PROBE_ROWS = 1024
#: Timed products per thread count, alternated; the medians are compared.
PROBE_ROUNDS = 5


def confirmed_threads(
    threads: int,
    rows: int,
    layer: tuple[int, int],
    *,
    rounds: int = PROBE_ROUNDS,
    clock: Callable[[], float] = time.perf_counter,
) -> int:
    """``threads`` when a ``(rows, n_in) @ (n_in, n_out)`` product (``layer``; at most
    :data:`PROBE_ROWS` rows) runs now in at most :data:`PROBE_SPEEDUP` of its one-thread time
    with them, else 1. The products alternate between the two counts, ``rounds`` each after one
    untimed call, and their medians are compared; torch's thread count is restored. Draws no
    random numbers: the run's noise is untouched.
    """
    if threads <= 1:
        return 1
    import torch

    n_in, n_out = layer
    a = torch.full((max(1, min(rows, PROBE_ROWS)), n_in), 0.5)
    b = torch.full((n_in, n_out), 0.25)
    seconds: dict[int, list[float]] = {1: [], threads: []}
    before = torch.get_num_threads()
    try:
        for round_ in range(rounds + 1):
            for n in (1, threads):
                torch.set_num_threads(n)
                if not round_:  # the first call of each count wakes its threads: not timed
                    torch.mm(a, b)
                    continue
                start = clock()
                torch.mm(a, b)
                seconds[n].append(clock() - start)
    finally:
        torch.set_num_threads(before)
    faster = statistics.median(seconds[threads]) <= PROBE_SPEEDUP * statistics.median(seconds[1])
    return threads if faster else 1


@contextlib.contextmanager
def torch_threads(count: Callable[[], int] | None) -> Iterator[None]:
    """Inside the block torch runs ``count()`` intra-op threads (asked on entry), and the count
    it ran before after it, also on an exception; ``None`` changes nothing."""
    if count is None:
        yield
        return
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(count())
    try:
        yield
    finally:
        torch.set_num_threads(before)
