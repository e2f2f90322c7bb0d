"""The plate over a data set's rows, shared by every model and guide in elbo-lab."""

from __future__ import annotations

import pyro
import torch

__all__ = ["data_plate"]


def data_plate(x: torch.Tensor, num_data: int | None = None, name: str = "data") -> pyro.plate:
    """The plate over the rows of ``x`` ``(B, D)`` at dim -1.

    With ``num_data`` = N > B the plate is a subsample of N rows, so every site inside it is
    scaled by N / B and a mini-batch ELBO estimates the whole data set's.
    """
    batch = x.shape[0]
    if num_data is None or num_data == batch:
        return pyro.plate(name, batch, dim=-1)
    return pyro.plate(name, num_data, subsample=torch.arange(batch, device=x.device), dim=-1)
