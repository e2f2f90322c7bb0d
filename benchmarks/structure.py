"""Structure figures for the codebase: module sizes, the longest functions, the import graph,
and the command line's option table.

    python benchmarks/structure.py            # the figures for the working tree
    python benchmarks/structure.py --root DIR # the figures for another checkout (e.g. a worktree)

Issue "One clear house" asks for these before and after a restructuring. Nothing is imported
from the package except ``inference.cli`` (for the option table), so the figures describe the
source as written; imports inside functions count as edges, since they are how cycles hide.
"""

from __future__ import annotations

import argparse
import ast
import subprocess
import sys
from pathlib import Path

PACKAGES = ("models", "inference")


def modules(root: Path) -> dict[str, Path]:
    found = {}
    for package in PACKAGES:
        for path in sorted((root / package).glob("*.py")):
            name = package if path.stem == "__init__" else f"{package}.{path.stem}"
            found[name] = path
    return found


def functions(tree: ast.AST):
    for node in ast.walk(tree):
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
            yield node.name, node.lineno, node.end_lineno - node.lineno + 1


def imports(name: str, tree: ast.AST, known: set[str]) -> set[str]:
    package = name if name in PACKAGES else name.rsplit(".", 1)[0]
    edges = set()
    for node in ast.walk(tree):
        targets = []
        if isinstance(node, ast.Import):
            targets = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                base = package + ("." + base if base else "")
            targets = [base] + [f"{base}.{alias.name}" for alias in node.names]
        for target in targets:
            if target in known and target != name:
                edges.add(target)
    return edges


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    found, state, stack = [], {}, []

    def visit(node):
        state[node] = 1
        stack.append(node)
        for nxt in sorted(graph[node]):
            if state.get(nxt) == 1:
                found.append(stack[stack.index(nxt) :] + [nxt])
            elif nxt not in state:
                visit(nxt)
        stack.pop()
        state[node] = 2

    for node in sorted(graph):
        if node not in state:
            visit(node)
    return found


def option_table(root: Path) -> str:
    code = (
        "import sys; sys.path.insert(0, sys.argv[1])\n"
        "import argparse\n"
        "from inference.cli import build_parser\n"
        "parser = build_parser()\n"
        "sub = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))\n"
        "for name, p in sub.choices.items():\n"
        "    opts = []\n"
        "    for a in p._actions:\n"
        "        if a.option_strings and '--help' not in a.option_strings:\n"
        "            default = '' if a.default in (None, False, argparse.SUPPRESS) else f'={a.default}'\n"
        "            opts.append('/'.join(a.option_strings) + default)\n"
        "    print(f'{name}: ' + ' '.join(opts))\n"
    )
    result = subprocess.run(
        [sys.executable, "-c", code, str(root)], capture_output=True, text=True, check=False
    )
    return result.stdout if result.returncode == 0 else f"(no option table: {result.stderr[-300:]})"


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--root", type=Path, default=Path(__file__).resolve().parents[1])
    parser.add_argument("--top", type=int, default=5)
    args = parser.parse_args(argv)
    found = modules(args.root)
    trees = {name: ast.parse(path.read_text()) for name, path in found.items()}
    sizes = {name: len(path.read_text().splitlines()) for name, path in found.items()}
    print(f"## {args.top} largest modules (lines)")
    for name, size in sorted(sizes.items(), key=lambda kv: -kv[1])[: args.top]:
        print(f"  {size:5d}  {name}")
    print(f"## {args.top} longest functions (lines)")
    lengths = [
        (length, f"{name}.{fn}:{line}")
        for name, tree in trees.items()
        for fn, line, length in functions(tree)
    ]
    for length, where in sorted(lengths, reverse=True)[: args.top]:
        print(f"  {length:5d}  {where}")
    graph = {name: imports(name, tree, set(found)) for name, tree in trees.items()}
    print("## import graph (module -> the package modules it imports, at any depth of the file)")
    for name in sorted(graph):
        print(f"  {name} -> {', '.join(sorted(graph[name])) or '-'}")
    found_cycles = cycles(graph)
    print(f"## cycles: {len(found_cycles)}")
    for cycle in found_cycles:
        print("  " + " -> ".join(cycle))
    leaf = all(not dep.startswith("inference") for n, d in graph.items() if n.startswith("models") for dep in d)
    print(f"## models imports inference: {'no' if leaf else 'YES'}")
    print("## command-line options")
    print(option_table(args.root), end="")


if __name__ == "__main__":
    main()
