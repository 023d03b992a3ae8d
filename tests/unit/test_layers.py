"""The house's layers: apps (the CLI, the testing package) sit above services/ and libs/."""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
APPS = ("ferry_cli", "ferry_testing")


def _imports(path: Path) -> set[str]:
    out: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            out |= {a.name.split(".")[0] for a in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module and not node.level:
            out.add(node.module.split(".")[0])
    return out


def test_no_service_or_library_imports_an_app() -> None:
    offenders = [
        f"{path.relative_to(ROOT)} imports {sorted(_imports(path) & set(APPS))}"
        for top in ("libs", "services")
        for path in sorted((ROOT / top).rglob("*.py"))
        if _imports(path) & set(APPS)
    ]
    assert offenders == []


def test_the_apps_live_in_apps() -> None:
    import ferry_cli
    import ferry_testing

    for package in (ferry_cli, ferry_testing):
        assert Path(package.__file__ or "").resolve().is_relative_to(ROOT / "apps")
