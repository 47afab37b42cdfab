"""No module of spinbox/ or guest/ is over 600 lines unless its docstring
says why, in a line starting "Over 600 lines because". A reader should be able
to hold a module in mind; a longer one owes an explanation."""

from __future__ import annotations

import ast
from pathlib import Path

TOP = Path(__file__).resolve().parents[2]
PARTS = ("spinbox", "guest")
MAX_LINES = 600
REASON = "Over 600 lines because"


def modules(top: Path) -> list[Path]:
    """The Python modules of the parts, without those protoc generates (git ignores them)."""
    return sorted(
        path
        for part in PARTS
        for path in (top / part).rglob("*.py")
        if not path.name.endswith("_pb2.py") and "__pycache__" not in path.parts
    )


def says_why(source: str) -> bool:
    doc = ast.get_docstring(ast.parse(source)) or ""
    return any(line.strip().startswith(REASON) for line in doc.splitlines())


def oversized(top: Path) -> list[str]:
    """The modules over the limit whose docstring does not say why, with their length."""
    found = []
    for path in modules(top):
        source = path.read_text()
        lines = len(source.splitlines())
        if lines > MAX_LINES and not says_why(source):
            found.append(f"{path.relative_to(top)} ({lines} lines)")
    return found


def test_no_module_is_over_600_lines_without_saying_why() -> None:
    assert len(modules(TOP)) > 100
    bad = oversized(TOP)
    assert not bad, (
        f"modules over {MAX_LINES} lines: {', '.join(bad)}; split them, or say why in the "
        f'module docstring with a line starting "{REASON}"'
    )


def test_the_check_fails_on_a_long_module_and_accepts_a_reason(tmp_path: Path) -> None:
    body = "".join(f"x{n} = {n}\n" for n in range(MAX_LINES))
    (tmp_path / "spinbox" / "shim").mkdir(parents=True)
    (tmp_path / "guest").mkdir()
    (tmp_path / "spinbox" / "shim" / "long.py").write_text('"""A module."""\n' + body)
    (tmp_path / "spinbox" / "shim" / "short.py").write_text('"""A module."""\n' + body[:100])
    (tmp_path / "spinbox" / "shim" / "gen_pb2.py").write_text(body * 2)
    (tmp_path / "guest" / "explained.py").write_text(
        f'"""A module.\n\n{REASON} its table is one piece.\n"""\n' + body
    )
    # The sentence only counts in the docstring, not in a comment.
    (tmp_path / "guest" / "commented.py").write_text(f"# {REASON} no docstring says so.\n" + body)
    assert oversized(tmp_path) == [
        f"guest/commented.py ({MAX_LINES + 1} lines)",
        f"spinbox/shim/long.py ({MAX_LINES + 1} lines)",
    ]
