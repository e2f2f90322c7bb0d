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
those threads and with one; and only where the count cannot change the numbers
(:func:`inference.resources.count_keeps_numbers`), since the probe follows the load.
Elsewhere (float64, pPCA, FA, passes of 32,768 rows or more) the rule's count stands.
"""

from __future__ import annotations

import contextlib
import itertools
import logging
import statistics
import time
from collections.abc import Callable, Iterator, Sequence

log = logging.getLogger(__name__)

__all__ = [
    "MIN_FLOPS_PER_THREAD",
    "MIN_STEP_FLOPS_PER_THREAD",
    "PROBE_SPEEDUP",
    "SPIN_COUNT",
    "SPLIT_SUM_ELEMENTS",
    "StepThreads",
    "confirmed_threads",
    "forward_flops",
    "largest_layer",
    "threads_for",
    "threads_for_steps",
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


#: Work in one forward pass over a training step's rows from which a second thread is tried on
#: the run's own steps (:class:`StepThreads`): with waiting threads that spin briefly
#: (:data:`SPIN_COUNT`), batch 128, quiet: 784-400-20 (0.165 GFLOP) 6.8 -> 3.7 ms a step with 2
#: threads, 784-200-10 (0.082) 3.0 -> 2.0 ms, 256-200-10 (0.028) 1.38 -> 1.0-1.1 ms, and the
#: digits' 64-200-10 (0.008) 0.77-0.79 against 0.70-0.93 ms, no gain.
MIN_STEP_FLOPS_PER_THREAD = 1e7
#: Elements from which torch splits a sum between its threads (ATen's parallel grain), so
#: that its last bits follow the thread count, MKL strict or not: a training step's loss sums
#: one term a row (a 40,000-row full batch's ``svi_loss`` followed the count), so steps of this
#: many rows are not timed on several counts; L_K sums in pieces below it
#: (:func:`inference.evidence.thread_independent_sum`).
SPLIT_SUM_ELEMENTS = 32768
#: How long (in libgomp's spins, about 10 ns each) a thread that waits at a barrier spins
#: before it sleeps, set by the command line with the sleeping policy (``GOMP_SPINCOUNT``, read
#: when torch loads OpenMP). 0 (``OMP_WAIT_POLICY=PASSIVE`` alone) makes every product wake a
#: sleeping thread: 784-400-20 steps ran 6.8 ms with 1 thread and 7.9 ms with 2. 3,000 spins
#: (about 30 us) cover the gaps between the products of a step: 3.5 ms with 2.
SPIN_COUNT = 3000
#: A trial's steps, alternated between the proposed count and one thread; medians compared.
TRIAL_STEPS = 8
#: Keep the proposed threads when their steps' median is at most this fraction of one thread's.
STEP_SPEEDUP = 0.85
#: Seconds of training between trials, doubled (up to :data:`MAX_TRIAL_SECONDS`) while trials
#: keep confirming the count, so a run notices the load coming and going.
TRIAL_SECONDS = 2.0
MAX_TRIAL_SECONDS = 32.0
#: A trial starts at once when the median of the last :data:`WATCH_STEPS` steps with several
#: threads is this many times the trial's: another process took a core.
SLOWER = 1.5
WATCH_STEPS = 5


def threads_for_steps(flops: float, cores: int) -> int:
    """Threads a training step of ``flops`` (one forward pass) may try: one per
    :data:`MIN_STEP_FLOPS_PER_THREAD`, 1 to ``cores``."""
    return max(1, min(cores, int(flops // MIN_STEP_FLOPS_PER_THREAD)))


class StepThreads:
    """Torch's threads for each training step, chosen by timing the run's own steps: ``threads``
    or one, whichever is faster now.

    A trial alternates the two counts over :data:`TRIAL_STEPS` steps and keeps ``threads`` when
    the median of their steps is at most :data:`STEP_SPEEDUP` of one thread's. Trials repeat
    every :data:`TRIAL_SECONDS` of training (doubling while the answer stays the same), and at
    once when steps with several threads become :data:`SLOWER` times slower than in their
    trial: on a busy machine several threads wait at every product for a partner that is not
    running, and one thread loses nothing. Only the thread count changes, never the steps or
    their noise; so the numbers are the run's whatever is chosen where the model's steps compute
    the same with either count (the built-in VAE in float32, tested; which runs get one:
    :func:`inference.resources.step_threads`).

    ``with step_threads.step(timed):`` wraps one step; ``timed=False`` for a step that is not
    comparable with the others (a ragged last batch), which then runs the current count.
    """

    def __init__(self, threads: int, *, clock: Callable[[], float] = time.perf_counter):
        self.threads, self.clock = threads, clock
        self.count = 1  # the count between trials
        self.trials = 0
        self._plan: list[int] = []  # the counts of the trial's steps to come
        self._seen: dict[int, list[float]] = {}
        self._reference = 0.0  # the chosen count's median step in the last trial
        self._recent: list[float] = []
        self._wait = TRIAL_SECONDS
        self._next = 0.0  # the clock's time of the next trial (0: at the first step)

    @contextlib.contextmanager
    def step(self, timed: bool = True) -> Iterator[None]:
        import torch

        if timed and not self._plan and self.clock() >= self._next:
            self._start_trial()
        count = self._plan[0] if timed and self._plan else self.count
        if torch.get_num_threads() != count:
            torch.set_num_threads(count)
        start = self.clock()
        yield
        if timed:
            self._record(count, self.clock() - start)

    def _start_trial(self) -> None:
        self._plan = [self.threads, 1] * (TRIAL_STEPS // 2)
        self._seen = {1: [], self.threads: []}
        self._recent = []

    def _record(self, count: int, seconds: float) -> None:
        if self._plan:
            self._plan.pop(0)
            self._seen[count].append(seconds)
            if not self._plan:
                self._decide()
            return
        if self.count == 1:
            return
        self._recent = [*self._recent[1 - WATCH_STEPS :], seconds]
        slower = statistics.median(self._recent) > SLOWER * self._reference
        if len(self._recent) == WATCH_STEPS and slower:
            self._wait = TRIAL_SECONDS
            self._start_trial()

    def _decide(self) -> None:
        many, one = (statistics.median(self._seen[n]) for n in (self.threads, 1))
        count = self.threads if many <= STEP_SPEEDUP * one else 1
        # the first trial confirms nothing (its steps include the run's first, validated and
        # eager, and perhaps an export): the second comes as soon as the first would repeat
        same = count == self.count and self.trials > 0
        self._wait = min(2 * self._wait, MAX_TRIAL_SECONDS) if same else TRIAL_SECONDS
        if count != self.count or not self.trials:
            log.info(
                "training steps: %d thread(s); a step took %.2f ms with %d, %.2f ms with 1",
                count, 1e3 * many, self.threads, 1e3 * one,
            )  # fmt: skip
        self.count, self._reference = count, many if count > 1 else one
        self.trials += 1
        self._next = self.clock() + self._wait
