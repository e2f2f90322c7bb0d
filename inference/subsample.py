"""A plate that subsamples itself, run over all of its rows: the whole data's ELBO and evidence.

``pyro.plate("data", N, subsample_size=B)`` draws B of its N rows on every run and scales their
log-densities by N / B, so one run's ELBO is an unbiased mini-batch estimate of the whole
data's (Hoffman et al. 2013). The evidence L_K and the bound check need the whole data, exactly.
Pyro draws the indices through a sample site named after the plate and insists on B of them
(``SubsampleMessenger`` checks ``subsample_size == len(subsample)``), so the N rows are
covered by a partition into C = ceil(N / B) chunks of B indices, the last one padded with
row 0 and its padding masked out. In chunk c, with R_c its real rows:

    the plate's site takes the indices R_c (as a replayed value);
    a site inside the plate: scale (N / B) * (B / N) = 1, padded rows masked,
        so sum_c over the chunks counts every row n once;
    a site outside the plate (a global latent, a prior): scale w_c, with sum_c w_c = 1.

For the ELBO, chunks are independent runs with w_c = 1 / C:

    E[sum_c ELBO_c] = sum_n E_q[log p(x_n | z)] - KL(q(z) || p(z)) = the whole data's ELBO,

with independent errors, Var = sum_c Var_c. For an importance weight one draw z of the global
latents must serve every row: chunk 0 draws it (w_0 = 1) and chunks c > 0 take its values,
masked (w_c = 0), so that sum_c log w_c = log p(x_1..N, z) - log q(z) exactly.

Reference: M. D. Hoffman, D. M. Blei, C. Wang and J. Paisley, "Stochastic Variational
Inference", JMLR 14, 2013.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import NamedTuple

import torch
from pyro import poutine
from pyro.poutine.messenger import Messenger
from pyro.poutine.util import site_is_subsample

from .errors import OptionError

__all__ = [
    "SubsampledPlate",
    "SubsampleOrigin",
    "TracedPair",
    "chunk_rows",
    "find_subsampled_plate",
    "full_data_pairs",
    "RowChunk",
    "trace_pair",
]


class SubsampledPlate(NamedTuple):
    """A plate that draws its own subsample: ``B = size`` of ``N = full_size`` rows at ``dim``."""

    name: str
    dim: int
    size: int
    full_size: int
    device: torch.device


class SubsampleOrigin(Messenger):
    """Records which plates draw their own indices (``subsample_size=B``), as opposed to taking
    them from the model's arguments (``subsample=ind``).

    A plate sends its indices as a sample site named after it before it is entered: the value is
    None unless the caller gave the indices. Wrap the bare model or guide (innermost), so that
    no replay has filled the value in yet.
    """

    def __init__(self):
        super().__init__()
        self.own: set[str] = set()

    def _pyro_sample(self, msg) -> None:
        if site_is_subsample(msg) and msg["value"] is None:
            self.own.add(msg["name"])


def subsampled_plate(traces, own: set[str]) -> SubsampledPlate | None:
    """The one plate of ``traces`` that subsamples itself (its name in ``own``), or None.

    Raises OptionError for several such plates, each named.
    """
    plates: dict[str, SubsampledPlate] = {}
    for trace in traces:
        for site in trace.nodes.values():
            if site["type"] != "sample" or site_is_subsample(site):
                continue
            for f in site["cond_indep_stack"]:
                if f.name in own and f.full_size is not None and f.full_size > f.size:
                    device = site["value"].device if torch.is_tensor(site["value"]) else "cpu"
                    plates[f.name] = SubsampledPlate(
                        f.name, f.dim, int(f.size), int(f.full_size), torch.device(device)
                    )
    if len(plates) > 1:
        names = ", ".join(repr(p) for p in sorted(plates))
        raise OptionError(
            f"plates {names} each subsample themselves: elbo-lab covers the rows of one such "
            "plate; give the others subsample_size=None"
        )
    return next(iter(plates.values()), None)


class TracedPair(NamedTuple):
    """One run of a model and guide: the guide's trace, the model's replayed on it, and the
    plate that subsamples itself (None if none does)."""

    guide_trace: poutine.Trace
    model_trace: poutine.Trace
    own: SubsampledPlate | None


def trace_pair(model: Callable, guide: Callable, args: tuple, kwargs: Mapping) -> TracedPair:
    """Run the pair once, the caller's noise untouched (:class:`TracedPair`)."""
    model_origin, guide_origin = SubsampleOrigin(), SubsampleOrigin()
    with torch.random.fork_rng(devices=[]):
        guide_trace = poutine.trace(guide_origin(guide)).get_trace(*args, **kwargs)
        replayed = poutine.replay(model_origin(model), trace=guide_trace)
        model_trace = poutine.trace(replayed).get_trace(*args, **kwargs)
    own = subsampled_plate((guide_trace, model_trace), model_origin.own | guide_origin.own)
    return TracedPair(guide_trace, model_trace, own)


@torch.no_grad()
def find_subsampled_plate(
    model: Callable, guide: Callable, args: tuple, kwargs: Mapping
) -> SubsampledPlate | None:
    """Run the pair once (the caller's noise untouched) and return the plate that subsamples
    itself, or None."""
    return trace_pair(model, guide, args, kwargs).own


def chunk_rows(plate: SubsampledPlate) -> list[tuple[torch.Tensor, int]]:
    """The partition of ``range(N)`` into chunks of B indices: ``(indices (B,), real rows)``;
    the last chunk is padded with row 0."""
    n, b = plate.full_size, plate.size
    chunks = []
    for start in range(0, n, b):
        rows = torch.arange(start, min(start + b, n), device=plate.device)
        real = rows.shape[0]
        if real < b:
            rows = torch.cat([rows, rows.new_zeros(b - real)])
        chunks.append((rows, real))
    return chunks


class RowChunk(Messenger):
    """Run a pair on one chunk of a self-subsampling plate, scaled as the module docstring says.

    Args:
        plate: the plate.
        rows: ``(B,)`` row indices the plate takes.
        real: how many of them are real (the rest are padding, masked out).
        outside: the scale w_c of sites outside the plate; 0 masks them.
        values: values for sites outside the plate (the global latents of chunk 0's draw),
            taken as replayed values; None draws them.
    """

    def __init__(
        self,
        plate: SubsampledPlate,
        rows: torch.Tensor,
        real: int,
        outside: float,
        values: Mapping[str, torch.Tensor] | None = None,
    ):
        super().__init__()
        self.plate, self.rows, self.outside = plate, rows, outside
        self.values = dict(values or {})
        self.mask = None
        if real < rows.shape[0]:  # padded rows, along the plate's dim
            mask = torch.arange(rows.shape[0], device=rows.device) < real
            self.mask = mask.reshape((-1,) + (1,) * (-plate.dim - 1))

    def _pyro_sample(self, msg) -> None:
        if site_is_subsample(msg):
            if msg["name"] == self.plate.name:
                msg["value"] = self.rows
            return
        frame = next((f for f in msg["cond_indep_stack"] if f.name == self.plate.name), None)
        if frame is None:  # outside the plate: counted with weight w_c
            if msg["name"] in self.values and not msg["is_observed"]:
                msg["value"] = self.values[msg["name"]]
            if self.outside == 0:
                msg["mask"] = False
            elif self.outside != 1:
                msg["scale"] = msg["scale"] * self.outside
            return
        # inside: the plate scaled by N / B; each real row counts once
        msg["scale"] = msg["scale"] * frame.size / frame.full_size
        if self.mask is not None:
            msg["mask"] = self.mask if msg["mask"] is None else msg["mask"] & self.mask


def full_data_pairs(
    model: Callable, guide: Callable, args: tuple, kwargs: Mapping
) -> list[tuple[Callable, Callable]]:
    """``[(model, guide)]``, or for a pair with a self-subsampling plate one pair per chunk of
    its rows (w_c = 1 / C), whose ELBOs sum to the whole data's in expectation."""
    plate = find_subsampled_plate(model, guide, args, kwargs)
    if plate is None:
        return [(model, guide)]
    chunks = chunk_rows(plate)
    pairs = []
    for rows, real in chunks:
        chunk = RowChunk(plate, rows, real, 1.0 / len(chunks))
        pairs.append((chunk(model), chunk(guide)))
    return pairs
