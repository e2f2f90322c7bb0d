"""The package's public surface imports on first use and is the same as an eager import's."""

import subprocess
import sys
from pathlib import Path

import inference

ROOT = Path(__file__).resolve().parents[2]


def test_every_public_name_resolves():
    for name in inference.__all__:
        assert getattr(inference, name) is not None, name
    assert set(inference.__all__) <= set(dir(inference))


def test_functions_named_like_their_modules_stay_functions():
    """``inference.compare`` and ``inference.explain`` are functions, whichever loads first."""
    code = (
        "import inference.compare, inference.explain, inference\n"
        "assert callable(inference.compare) and inference.compare.__name__ == 'compare'\n"
        "assert callable(inference.explain) and inference.explain.__name__ == 'explain'\n"
        "assert inference.compare.__module__ == 'inference.compare'\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True, cwd=ROOT)


def test_import_inference_loads_no_torch():
    code = "import sys, inference; assert 'torch' not in sys.modules"
    subprocess.run([sys.executable, "-c", code], check=True, cwd=ROOT)
