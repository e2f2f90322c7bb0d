"""The random state and parameters a checkpoint carries: captured, stored, restored exactly."""

import random

import numpy as np
import pytest
import torch

from inference.errors import RunError
from inference.io import (
    copy_params,
    get_rng_state,
    load_checkpoint,
    save_checkpoint,
    seeded,
    set_rng_state,
)


def _draws():
    """One draw from each generator a Pyro run uses: torch, NumPy's global, Python's."""
    return (torch.rand(3).tolist(), np.random.rand(3).tolist(), [random.random() for _ in range(3)])  # noqa: NPY002


def test_seeded_repeats_its_draws_and_leaves_the_callers_stream_alone():
    torch.manual_seed(1)
    np.random.seed(1)  # noqa: NPY002
    random.seed(1)
    expected = _draws()  # the caller's stream without the block

    torch.manual_seed(1)
    np.random.seed(1)  # noqa: NPY002
    random.seed(1)
    with seeded(5):
        first = _draws()
    with seeded(5):
        again = _draws()
    assert first == again and first != expected
    assert _draws() == expected


def _checkpoint(names, params, rng):
    return {
        "config": {},
        "metadata": {},
        "param_names": names,
        "params": dict(zip(names, params, strict=True)),
        "optimizer": {},
        "rng": rng,
        "position": {"epoch": 1, "step": 0, "loss_sum": 0.0},
        "metrics": {"metrics.jsonl": 0, "metrics.csv": 0},
    }


def test_random_state_and_parameters_round_trip_through_a_checkpoint(tmp_path):
    """get_rng_state survives torch.load(weights_only=True); after set_rng_state every
    generator draws what it would have drawn; copy_params restores the saved values."""
    names, saved = ["a", "b"], [torch.randn(2, 3), torch.randn(4)]
    rng = get_rng_state()
    expected = _draws()
    save_checkpoint(tmp_path / "c.pt", _checkpoint(names, saved, rng))
    _draws()  # move every stream on
    state = load_checkpoint(tmp_path / "c.pt")
    set_rng_state(state["rng"])
    assert _draws() == expected

    params = [torch.zeros(2, 3), torch.zeros(4)]
    copy_params(names, params, state, "c.pt")
    assert all(torch.equal(p, s) for p, s in zip(params, saved, strict=True))


@pytest.mark.parametrize(
    "names, shapes, message",
    [(["a", "c"], [(2, 3), (4,)], "do not match"), (["a", "b"], [(2, 3), (5,)], "has shape")],
    ids=["other-names", "other-shape"],
)
def test_copy_params_refuses_another_models_parameters(names, shapes, message):
    state = _checkpoint(["a", "b"], [torch.randn(2, 3), torch.randn(4)], {})
    params = [torch.zeros(s) for s in shapes]
    with pytest.raises(RunError, match=message):
        copy_params(names, params, state, "c.pt")
    assert all(not p.any() for p in params)
