"""How many torch threads a command uses by default: from the work in one step, not the core count.

torch's default is one intra-op thread per core. For a small model that is slower than one
thread even on a quiet machine, and on a busy one it collapses: every operator ends in a barrier
where OpenMP threads wait for a partner that the scheduler has not run (BENCHMARKS.md, "Threads":
the default VAE's steps ran 6x slower with 2 threads beside one busy process, 1 thread lost
nothing). So a thread is only added per :data:`MIN_FLOPS_PER_THREAD` of work in one step, and
the command line makes waiting threads sleep (``OMP_WAIT_POLICY=PASSIVE``) so that a run given
more threads slows down under load but does not collapse.

The work is counted for dense networks: a matrix product of a ``(rows, n_in)`` batch with an
``(n_in, n_out)`` weight costs ``2 rows n_in n_out`` floating-point operations forward and twice
that backward, so a step costs ``2 rows W`` (evaluation) or ``6 rows W`` (training), with ``W``
the number of weights that each row meets.
"""

from __future__ import annotations

import itertools
from collections.abc import Sequence

__all__ = ["MIN_FLOPS_PER_THREAD", "step_flops", "threads_for", "weights_per_row"]

#: Work in one step (forward and backward) that one more thread must have to be worth starting:
#: about 10-20 ms of one core's time, where fork/join and wake-ups stop mattering.
MIN_FLOPS_PER_THREAD = 1e9


def weights_per_row(
    model: str, data_dim: int, latent_dim: int = 10, hidden_dims: Sequence[int] = (200,)
) -> int:
    """Weights one data row meets in a model/guide pass: ``W`` for :func:`step_flops`.

    VAE: encoder ``D -> hidden... -> 2L`` (location and scale) and decoder ``L -> ...hidden -> D``;
    ppca/fa: ``D x L`` each way; a user model: ``D`` (its work per row is unknown, and small models
    are the common case).
    """
    if model == "vae":
        encoder = [data_dim, *hidden_dims, 2 * latent_dim]
        decoder = [latent_dim, *reversed(tuple(hidden_dims)), data_dim]
        return sum(a * b for sizes in (encoder, decoder) for a, b in itertools.pairwise(sizes))
    if model in ("ppca", "fa"):
        return 2 * data_dim * latent_dim
    return data_dim


def step_flops(weights: int, rows: int, backward: bool) -> float:
    """Floating-point operations of one step over ``rows`` rows: ``2 rows W``, x3 with backward."""
    return (6.0 if backward else 2.0) * rows * weights


def threads_for(flops: float, cores: int) -> int:
    """Threads for a step of ``flops``: one per :data:`MIN_FLOPS_PER_THREAD`, 1 to ``cores``."""
    return max(1, min(cores, int(flops // MIN_FLOPS_PER_THREAD)))
