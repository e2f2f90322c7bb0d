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


PACKAGES = ("inference", "models")


def _user_imports() -> list[tuple[str, str, str]]:
    """``(where, module, name)`` of every ``from inference... / models... import name`` in the
    README's Python blocks and the notebooks' code cells."""
    import ast
    import json
    import re

    sources = []
    readme = (ROOT / "README.md").read_text()
    sources += [("README.md", b) for b in re.findall(r"```python\n(.*?)```", readme, re.S)]
    for path in sorted((ROOT / "notebooks").glob("*.ipynb")):
        cells = json.loads(path.read_text())["cells"]
        code = ["".join(c["source"]) for c in cells if c["cell_type"] == "code"]
        sources += [(path.name, c) for c in code]
    found = []
    for where, source in sources:
        python = "\n".join(line for line in source.splitlines() if not line.startswith(("%", "!")))
        for node in ast.walk(ast.parse(python)):
            if isinstance(node, ast.ImportFrom) and node.module.split(".")[0] in PACKAGES:
                found += [(where, node.module, alias.name) for alias in node.names]
    return found


def test_what_the_readme_and_notebooks_import_is_public():
    import importlib

    imports = _user_imports()
    assert {m for _, m, _ in imports} >= {"inference", "models"}
    for where, module, name in imports:
        assert name in importlib.import_module(module).__all__, f"{where}: {module}.{name}"


def test_the_command_line_machinery_is_not_exported():
    assert not {"World", "init_from_env", "compare_guides"} & set(inference.__all__)
