"""Data-parallel SVI across processes on ``torch.distributed``: the world of ranks.

Every rank holds the same model, guide and parameters. A global mini-batch of B rows (the same
rows a single process would take) is split into contiguous shards of b_r rows, sum_r b_r = B.
Rank r computes its loss with the plate scaled by the GLOBAL data size N,

    loss_r = (N / b_r) sum_{n in shard r} l_n          (+ terms of global latents, once),

and the gradients are combined with the shard weights w_r = b_r / B (sum_r w_r = 1):

    g = sum_r w_r grad loss_r = (N / B) sum_{n in batch} grad l_n (+ global terms once),

which is exactly the single-process gradient of the global batch; with equal shards it is the plain
mean of the ranks' gradients. Per-datum metrics are reduced as sums, e.g.
reconstruction = sum_r S_r / sum_r n_r, so the reported ELBO is the whole split's.

A single process (no ``WORLD_SIZE`` above 1, no initialized process group) is the world of size 1:
every method returns at once without communication, so :func:`~inference.train.fit` takes the same
code path and produces the same numbers as before.

Processes find each other through the variables ``torchrun`` sets (``RANK``, ``WORLD_SIZE``,
``LOCAL_RANK``, ``MASTER_ADDR``, ``MASTER_PORT``); the backend is ``gloo`` on CPU and ``nccl`` on
CUDA. A rank that dies or hangs ends the others with :class:`DistributedError` (the peers' sockets
close, or the process group's timeout expires) instead of a hang.

References: S. Li et al., "PyTorch Distributed: Experiences on Accelerating Data Parallel
Training", VLDB 2020; P. Goyal et al., "Accurate, Large Minibatch SGD", 2017 (global batch = sum of
shards).
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import timedelta
from typing import Any

import numpy as np
import pyro
import torch
import torch.distributed as dist

from .errors import ElboLabError, OptionError

__all__ = [
    "DEFAULT_TIMEOUT",
    "DistributedError",
    "World",
    "current_world",
    "device_for",
    "init_from_env",
    "shutdown",
]

log = logging.getLogger(__name__)

#: How long a collective waits for a silent rank before the job is ended with an error.
DEFAULT_TIMEOUT = timedelta(minutes=5)


class DistributedError(ElboLabError, RuntimeError):
    """A rank died, hung or could not join; raised on the surviving ranks instead of hanging."""


@contextmanager
def _collective(world: World, what: str) -> Iterator[None]:
    """Turn a backend failure during ``what`` into one line naming this rank and the cause."""
    try:
        yield
    except RuntimeError as exc:  # DistBackendError, DistNetworkError, ... are RuntimeErrors
        if isinstance(exc, ElboLabError):
            raise
        cause = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise DistributedError(
            f"rank {world.rank} of {world.size}: {what} failed, another rank died, hung or "
            f"cannot be reached (timeout {world.timeout.total_seconds():.0f} s): {cause}"
        ) from None


@dataclass(frozen=True)
class World:
    """This process's place among ``size`` data-parallel ranks; ``size == 1`` needs no group.

    ``device`` is where reductions happen (``cpu`` for gloo, ``cuda:<local_rank>`` for nccl);
    ``owns_group`` says whether :func:`init_from_env` created the process group, so that
    :func:`shutdown` ends only a group it started.
    """

    rank: int = 0
    size: int = 1
    local_rank: int = 0
    backend: str | None = None
    device: str = "cpu"
    timeout: timedelta = DEFAULT_TIMEOUT
    owns_group: bool = False

    @property
    def is_writer(self) -> bool:
        """Whether this rank writes files (metrics, checkpoints, figures): rank 0 only."""
        return self.rank == 0

    # --- data ------------------------------------------------------------------------------------

    def shard(self, rows: torch.Tensor) -> torch.Tensor:
        """This rank's contiguous share of ``rows`` ``(B,)``: sizes differ by at most one.

        Rank r gets ``rows[lo_r:hi_r]`` with the split of ``torch.tensor_split``, so the shards
        concatenated in rank order are ``rows`` again.
        """
        if self.size == 1:
            return rows
        return rows.tensor_split(self.size)[self.rank]

    def check_batches(self, n: int, batch: int, scaled: bool) -> None:
        """Refuse options under which a rank would get no rows of some global batch.

        Args:
            n: rows of the training split; batch: global batch size B.
            scaled: whether the model takes ``num_data`` (its plate can be scaled by N / b_r).
        """
        if self.size == 1:
            return
        if not scaled:
            raise OptionError(
                f"the model takes no 'num_data' argument, so its loss cannot be split across "
                f"{self.size} processes; run it in one process"
            )
        last = n % batch or batch
        if min(batch, last) < self.size:
            raise OptionError(
                f"with {self.size} processes every global batch needs at least "
                f"{self.size} rows, but batch size {batch} over {n} rows leaves a last batch of "
                f"{last}; choose another batch size",
                option="batch_size",
            )

    # --- collectives -----------------------------------------------------------------------------

    def broadcast_(self, params: Sequence[torch.Tensor]) -> None:
        """Overwrite every rank's parameters with rank 0's (in place), so all start equal."""
        if self.size == 1:
            return
        with _collective(self, "broadcasting the initial parameters"), torch.no_grad():
            for p in params:
                dist.broadcast(p.data, src=0)

    def all_reduce_gradients(
        self, params: Sequence[torch.Tensor], weight: float, stop: bool = False
    ) -> bool:
        """Replace each ``p.grad`` by sum_r w_r grad_r with this rank's weight w_r = b_r / B.

        One flat buffer, one ``all_reduce`` per step; a missing gradient counts as zero. The
        buffer carries one more number, this rank's ``stop`` request, so that every rank learns
        in the same collective whether any rank wants to stop; returns that (``stop`` itself in
        a world of one process).
        """
        if self.size == 1:
            return stop
        grads = [p.grad if p.grad is not None else torch.zeros_like(p) for p in params]
        flat = torch.cat([g.reshape(-1) for g in grads]).mul_(weight)
        flat = torch.cat([flat, flat.new_full((1,), float(stop))])
        with _collective(self, "averaging gradients"):
            dist.all_reduce(flat, op=dist.ReduceOp.SUM)
        offset = 0
        for p, g in zip(params, grads, strict=True):
            p.grad = flat[offset : offset + g.numel()].view_as(g).clone()
            offset += g.numel()
        return bool(flat[-1] > 0)

    def sum(self, values: Sequence[float], what: str = "reducing metrics") -> list[float]:
        """sum_r values_r elementwise, in float64, on every rank."""
        if self.size == 1:
            return [float(v) for v in values]
        t = torch.tensor([float(v) for v in values], dtype=torch.float64, device=self.device)
        with _collective(self, what):
            dist.all_reduce(t, op=dist.ReduceOp.SUM)
        return t.tolist()

    def any(self, flag: bool, what: str = "agreeing to stop") -> bool:
        """Whether ``flag`` is set on any rank (all ranks then stop at the same step)."""
        if self.size == 1:
            return bool(flag)
        return self.sum([float(bool(flag))], what)[0] > 0

    def all_gather(self, obj: Any, what: str = "gathering state") -> list[Any]:
        """Every rank's ``obj`` (picklable), in rank order."""
        if self.size == 1:
            return [obj]
        out: list[Any] = [None] * self.size
        with _collective(self, what):
            dist.all_gather_object(out, obj)
        return out

    def barrier(self, where: str) -> None:
        """Wait for every rank; with gloo a monitored barrier names the ranks that did not come."""
        if self.size == 1:
            return
        with _collective(self, f"the barrier at {where}"):
            if self.backend == "gloo":
                dist.monitored_barrier(timeout=self.timeout, wait_all_ranks=True)
            else:
                dist.barrier(device_ids=[self.local_rank])

    # --- evaluation and random state -------------------------------------------------------------

    def sum_over_shards(
        self, totals: Callable[[torch.Tensor], Sequence[float]], x: torch.Tensor
    ) -> list[float]:
        """``totals(x_shard)`` (a list of sums over rows) on each rank's rows of ``x``, summed
        over ranks: the whole split's sums. A rank without rows contributes zeros."""
        if self.size == 1:
            return list(totals(x))
        rows = torch.arange(x.shape[0], device=x.device)
        mine = x[self.shard(rows)]
        values = list(totals(mine)) if mine.shape[0] else None
        width = len(values) if values is not None else len(totals(x[:1]))
        return self.sum(values if values is not None else [0.0] * width)

    def seed(self, seed: int, *position: int) -> None:
        """Give ranks 1.. their own noise stream, a function of (seed, rank, position).

        Rank 0 keeps the caller's stream, so a world of size 1 is left untouched; without this,
        ranks seeded alike would draw the same noise for different rows.
        """
        if self.rank == 0:
            return
        entropy = [seed % 2**32, self.rank, *position]
        pyro.set_rng_seed(int(np.random.SeedSequence(entropy).generate_state(1)[0]))

    def rng_state(self, state: Mapping[str, Any]) -> Mapping[str, Any] | None:
        """This rank's RNG state in a checkpoint, or None if it was written by another world size.

        Checkpoints of a world of size > 1 hold ``rng_by_rank``; ``rng`` is rank 0's.
        """
        by_rank = state.get("rng_by_rank")
        if by_rank is not None and len(by_rank) == self.size:
            return by_rank[self.rank]
        return state["rng"] if self.rank == 0 else None


def current_world(timeout: timedelta = DEFAULT_TIMEOUT) -> World:
    """The world of the initialized default process group, or the single process."""
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return World(timeout=timeout)
    backend = str(dist.get_backend())
    rank, size = dist.get_rank(), dist.get_world_size()
    if backend == "nccl":
        local = torch.cuda.current_device()
        return World(rank, size, local, backend, f"cuda:{local}", timeout)
    return World(rank, size, int(os.environ.get("LOCAL_RANK", rank)), backend, "cpu", timeout)


def init_from_env(
    device: str = "cpu",
    timeout: timedelta = DEFAULT_TIMEOUT,
    env: Mapping[str, str] | None = None,
) -> World:
    """Join the process group that ``torchrun`` describes in ``env`` (default ``os.environ``).

    Without ``WORLD_SIZE`` (or with 1) nothing is initialized and the single-process world is
    returned; an already initialized default group is used as it is. The backend is ``nccl`` when ``device`` is CUDA, ``gloo`` otherwise; collectives
    fail with :class:`DistributedError` after ``timeout``. A startup barrier checks every rank
    joined.
    """
    env = os.environ if env is None else env
    if dist.is_available() and dist.is_initialized():
        return current_world(timeout)
    try:
        size = int(env.get("WORLD_SIZE", "1"))
        rank, local = int(env.get("RANK", "0")), int(env.get("LOCAL_RANK", "0"))
    except ValueError:
        raise OptionError("WORLD_SIZE, RANK and LOCAL_RANK must be integers") from None
    if size == 1:
        return World(timeout=timeout)
    missing = [k for k in ("MASTER_ADDR", "MASTER_PORT") if k not in env]
    if missing:
        raise OptionError(
            f"WORLD_SIZE={size} but {' and '.join(missing)} not set; launch with torchrun"
        )
    cuda = device.startswith("cuda")
    backend = "nccl" if cuda else "gloo"
    if cuda:
        torch.cuda.set_device(local)
    world = World(rank, size, local, backend, f"cuda:{local}" if cuda else "cpu", timeout, True)
    with _collective(world, f"joining the {backend} process group"):
        dist.init_process_group(backend, rank=rank, world_size=size, timeout=timeout)
    world.barrier("start-up")
    log.info("rank %d of %d joined (%s, %s)", rank, size, backend, world.device)
    return world


def device_for(device: str, world: World) -> str:
    """The device of this rank: ``cuda`` (or ``cuda:N``) becomes ``cuda:<local_rank>`` in a world
    of several processes, one GPU per process; ``cpu`` stays."""
    if world.size > 1 and device.startswith("cuda"):
        return f"cuda:{world.local_rank}"
    return device


def shutdown(world: World) -> None:
    """Leave the process group if :func:`init_from_env` created it (else leave it to its owner)."""
    if world.owns_group and dist.is_initialized():
        dist.destroy_process_group()
