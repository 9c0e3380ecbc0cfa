"""Functions a reader can take in at once: none over FUNCTION_LINES_MAX lines unless a
comment right above it (``# Long: ...``) says why."""

from __future__ import annotations

import ast
from pathlib import Path

FUNCTION_LINES_MAX = 70
PACKAGE = Path(__file__).resolve().parent.parent / "flowray"


def _long_functions() -> list[tuple[str, str, int, bool]]:
    out = []
    for path in sorted(PACKAGE.rglob("*.py")):
        lines = path.read_text().splitlines()
        for node in ast.walk(ast.parse("\n".join(lines))):
            if not isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef):
                continue
            if node.end_lineno is None or node.end_lineno - node.lineno + 1 <= FUNCTION_LINES_MAX:
                continue
            first = min([node.lineno, *(d.lineno for d in node.decorator_list)])
            above = [lines[i].strip() for i in range(first - 2, -1, -1)]
            comments = []
            for line in above:
                if not line.startswith("#"):
                    break
                comments.append(line)
            reasoned = any(c.startswith("# Long:") for c in comments)
            out.append((str(path.relative_to(PACKAGE.parent)), node.name, node.lineno, reasoned))
    return out


def test_long_functions_say_why() -> None:
    unexplained = [f"{p}:{line} {name}" for p, name, line, ok in _long_functions() if not ok]
    assert not unexplained, (
        f"functions over {FUNCTION_LINES_MAX} lines without a '# Long:' reason above them: "
        + ", ".join(unexplained)
    )


def test_the_check_sees_long_functions() -> None:
    """It must find the long ones that are explained, or it checks nothing."""
    assert any(ok for *_rest, ok in _long_functions())
