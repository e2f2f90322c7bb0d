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


@pytest.mark.parametrize("preset", [None, "1"])
def test_the_program_sets_torch_process_options_before_torch_loads(preset):
    """``elbo-lab`` as a program sets OMP_WAIT_POLICY=PASSIVE before torch is imported and,
    where the kernel would stall for them, NUMPY_MADVISE_HUGEPAGE=0 (no huge pages for NumPy's
    arrays) before NumPy is, since each is read once when its library loads; a value the user
    set is kept, and torch's own huge pages (THP_MEM_ALLOC_ENABLE) are left as the user has
    them."""
    import os
    import subprocess
    import sys
    from pathlib import Path

    script = (
        "import os, sys\n"
        "seen = []\n"
        "def hook(event, args):\n"  # the environment as torch starts to load
        "    if event == 'import' and args[0] in ('torch', 'numpy') and args[0] not in seen:\n"
        "        seen.extend([args[0], os.environ.get(VARS[args[0]])])\n"
        "VARS = {'torch': 'OMP_WAIT_POLICY', 'numpy': 'NUMPY_MADVISE_HUGEPAGE'}\n"
        "sys.addaudithook(hook)\n"
        "import inference.cli as cli\n"
        "assert 'torch' not in sys.modules and 'numpy' not in sys.modules\n"
        "sys.argv = ['elbo-lab', 'evaluate', '/no/such/run']\n"
        "code = cli.main()\n"
        "assert 'torch' in sys.modules\n"
        "print(code, dict(zip(seen[::2], seen[1::2]))['torch'],\n"
        "      dict(zip(seen[::2], seen[1::2]))['numpy'], os.environ.get('THP_MEM_ALLOC_ENABLE'))\n"
    )
    names = ("OMP_WAIT_POLICY", "NUMPY_MADVISE_HUGEPAGE", "THP_MEM_ALLOC_ENABLE")
    env = {k: v for k, v in os.environ.items() if k not in names}
    if preset is not None:
        env["NUMPY_MADVISE_HUGEPAGE"] = preset
    root = Path(__file__).resolve().parents[2]
    out = subprocess.run(
        [sys.executable, "-c", script],
        capture_output=True, text=True, timeout=120, cwd=root,
        env={**env, "PYTHONPATH": str(root)},
    )  # fmt: skip
    assert out.returncode == 0, out.stderr[-2000:]
    from inference.cli import huge_pages_stall

    numpy_default = "0" if huge_pages_stall() else "None"  # this machine's kernel decides
    assert out.stdout.split() == ["2", "PASSIVE", preset or numpy_default, "None"]


@pytest.mark.parametrize(
    "text, stall",
    [
        ("always defer defer+madvise [madvise] never\n", True),
        ("[always] defer defer+madvise madvise never\n", True),
        ("always defer [defer+madvise] madvise never\n", True),
        ("always [defer] defer+madvise madvise never\n", False),
        ("always defer defer+madvise madvise [never]\n", False),
    ],
)
def test_numpy_huge_pages_are_declined_where_the_kernel_stalls_for_them(tmp_path, text, stall):
    """The kernel's THP ``defrag`` mode in brackets: NumPy's ``madvise`` huge pages stall the
    allocation for ``always``, ``madvise`` and ``defer+madvise``, not for ``defer``/``never``;
    no such file (not Linux, no THP) means no stall."""
    from inference.cli import huge_pages_stall

    path = tmp_path / "defrag"
    path.write_text(text)
    assert huge_pages_stall(str(path)) is stall
    assert huge_pages_stall(str(tmp_path / "absent")) is False
