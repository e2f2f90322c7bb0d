"""Default thread counts: the weight count is the networks' own, and threads grow with the work."""

import pytest
import torch

from inference.threads import MIN_FLOPS_PER_THREAD, step_flops, threads_for, weights_per_row
from models.linear_gaussian import LinearGaussian
from models.vae import VAE


def _weights(module: torch.nn.Module) -> int:
    return sum(p.numel() for p in module.parameters() if p.dim() == 2)


@pytest.mark.parametrize(
    "sizes", [(64, 10, (200,)), (784, 20, (400,)), (30, 3, (16, 8)), (5, 2, ())], ids=str
)
def test_weights_per_row_counts_the_vae_weight_matrices(sizes):
    data_dim, latent_dim, hidden_dims = sizes
    expected = _weights(VAE(data_dim, latent_dim, hidden_dims))
    assert weights_per_row("vae", data_dim, latent_dim, hidden_dims) == expected


def test_weights_per_row_of_ppca_is_its_loading_matrix_both_ways():
    module = LinearGaussian(12, 3)
    loading = max(p.numel() for p in module.parameters())
    assert weights_per_row("ppca", 12, 3) == 2 * loading == 2 * 12 * 3


def test_flops_and_threads():
    assert step_flops(100, 10, backward=False) == 2 * 10 * 100
    assert step_flops(100, 10, backward=True) == 6 * 10 * 100
    default_vae = step_flops(weights_per_row("vae", 64, 10, (200,)), 128, backward=True)
    assert threads_for(default_vae, cores=16) == 1
    assert threads_for(2.5 * MIN_FLOPS_PER_THREAD, cores=16) == 2
    assert threads_for(100 * MIN_FLOPS_PER_THREAD, cores=4) == 4
    assert threads_for(0.0, cores=0) == 1
