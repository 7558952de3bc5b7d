"""Lines per function of the cnncodes package (code lines, docstrings excluded), largest first.

    python benchmarks/function_sizes.py [ROOT] [--top N]

ROOT defaults to this checkout; give another checkout (a ``git worktree``) to compare layouts.
"""

from __future__ import annotations

import argparse
import ast
from pathlib import Path


def _code_lines(node: ast.AST) -> int:
    """Lines of ``node`` holding code: its span minus its docstring's lines."""
    span = node.end_lineno - node.lineno + 1
    body = getattr(node, "body", [])
    if body and isinstance(body[0], ast.Expr) and isinstance(getattr(body[0], "value", None), ast.Constant) \
            and isinstance(body[0].value.value, str):
        span -= body[0].end_lineno - body[0].lineno + 1
    return span


def function_sizes(root: Path) -> list[tuple[int, int, str]]:
    """(code lines, full span, "module:qualname") of every function under ``root/cnncodes``."""
    out = []
    for path in sorted((root / "cnncodes").rglob("*.py")):
        tree = ast.parse(path.read_text())
        rel = path.relative_to(root)

        def walk(node, prefix):
            for child in ast.iter_child_nodes(node):
                if isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef)):
                    name = f"{prefix}{child.name}"
                    out.append((_code_lines(child), child.end_lineno - child.lineno + 1, f"{rel}:{name}"))
                    walk(child, name + ".")
                elif isinstance(child, ast.ClassDef):
                    walk(child, f"{prefix}{child.name}.")

        walk(tree, "")
    return sorted(out, reverse=True)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("root", nargs="?", default=str(Path(__file__).resolve().parents[1]))
    ap.add_argument("--top", type=int, default=15)
    args = ap.parse_args()
    sizes = function_sizes(Path(args.root))
    for code, span, name in sizes[: args.top]:
        print(f"{code:5d} ({span:4d})  {name}")
    print(f"{len(sizes)} functions; over 80 code lines: {sum(c > 80 for c, _s, _n in sizes)}, "
          f"over 50: {sum(c > 50 for c, _s, _n in sizes)}")


if __name__ == "__main__":
    main()
