"""One equivalence harness for compiled paths (after Distrax's ``utils/equivalence.py``).

A case is run eagerly and compiled on the same noise (same seed); the outputs, and the
gradients with respect to ``params``, must be equal: bit for bit (``exact=True``, what the
exported graphs promise) or to float rounding (``exact=False``, what ``torch.compile``'s fused
kernels promise). The compiled run must actually have run a graph: ``graph_calls()`` (how many
calls ran a graph so far) has to grow during every compiled run, so a silent eager fallback,
which would compare a path with itself, fails the test.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from typing import Any

import pyro
import torch


def assert_compiled_matches_eager(
    eager: Callable[[], Any],
    compiled: Callable[[], Any],
    graph_calls: Callable[[], int],
    *,
    params: Sequence[torch.Tensor] = (),
    seeds: Sequence[int] = (1, 2),
    exact: bool = True,
    rtol: float = 1e-5,
    atol: float = 1e-6,
) -> None:
    """Run ``eager()`` and ``compiled()`` for each seed and compare what they return.

    Args:
        eager, compiled: the case, each returning a tensor, a float or a (named) tuple of them.
        graph_calls: how many calls have run a compiled graph so far; it must grow during
            every call of ``compiled()``.
        params: tensors to differentiate the (scalar tensor) output with respect to; the
            gradients are compared too.
        seeds: Pyro seeds; each is set before each run, so both draw the same noise.
        exact: compare bit for bit, else with ``rtol`` and ``atol``.
    """
    for seed in seeds:
        pyro.set_rng_seed(seed)
        want = eager()
        want_grads = _grads(want, params)
        before = graph_calls()
        pyro.set_rng_seed(seed)
        got = compiled()
        after = graph_calls()
        assert after > before, "the compiled path ran no graph (an eager fallback)"
        got_grads = _grads(got, params)
        _assert_same(got, want, exact, rtol, atol, "output")
        for i, (a, b) in enumerate(zip(got_grads, want_grads, strict=True)):
            _assert_same(a, b, exact, rtol, atol, f"gradient {i}")


def _grads(out: Any, params: Sequence[torch.Tensor]) -> list[torch.Tensor]:
    if not params:
        return []
    grads = torch.autograd.grad(out, list(params), allow_unused=True)
    return [torch.zeros_like(p) if g is None else g for p, g in zip(params, grads, strict=True)]


def _assert_same(got: Any, want: Any, exact: bool, rtol: float, atol: float, where: str) -> None:
    if isinstance(got, torch.Tensor):
        assert isinstance(want, torch.Tensor), where
        if exact:
            assert got.shape == want.shape and got.dtype == want.dtype, where
            assert torch.equal(got.detach(), want.detach()), (where, got, want)
        else:
            torch.testing.assert_close(got.detach(), want.detach(), rtol=rtol, atol=atol)
    elif isinstance(got, tuple | list):
        assert type(got) is type(want) and len(got) == len(want), where
        fields = getattr(got, "_fields", range(len(got)))
        for field, a, b in zip(fields, got, want, strict=True):
            _assert_same(a, b, exact, rtol, atol, f"{where}.{field}")
    elif isinstance(got, float) and not exact:
        assert math.isclose(got, want, rel_tol=rtol, abs_tol=atol) or (
            math.isnan(got) and math.isnan(want)
        ), (where, got, want)
    elif isinstance(got, float) and math.isnan(got):
        assert isinstance(want, float) and math.isnan(want), (where, got, want)
    else:
        assert got == want, (where, got, want)
