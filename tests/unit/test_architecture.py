"""ARCHITECTURE.md's table of parts names every source file that exists, and nothing that does not."""

from __future__ import annotations

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
PACKAGES = ("infra", "schemas", "producers", "projections", "streams", "nhdp")


def _named() -> set[str]:
    text = (ROOT / "ARCHITECTURE.md").read_text()
    table = text[text.index("## The parts") :]
    table = table[: table.index("\n## ", 5)]
    named: set[str] = set()
    for cell in re.findall(r"^\| (.+?) \|", table, flags=re.M):
        for path in re.findall(r"`([^`]+)`", cell):
            named.add(path)
        # "streams/sink/ (`runner.py`, `main.py`)": files named inside a folder
        folder = re.match(r"`([^`]+/)`\s*\(", cell)
        if folder:
            named |= {folder.group(1) + f for f in re.findall(r"`([^`/]+\.py)`", cell)}
    return named


def test_every_source_file_is_named() -> None:
    named = _named()
    missing = []
    for pkg in PACKAGES:
        for path in sorted((ROOT / pkg).rglob("*.py")):
            rel = path.relative_to(ROOT).as_posix()
            if path.name == "__init__.py":
                continue  # a package marker (its notes belong to the folder)
            folder_named = any(rel.startswith(n) and n.endswith("/") for n in named)
            if rel not in named and not folder_named:
                missing.append(rel)
    assert not missing, f"ARCHITECTURE.md's table of parts does not name: {missing}"


def test_nothing_named_is_missing() -> None:
    gone = []
    for name in _named():
        if "*" in name or not re.match(r"^(infra|schemas|producers|projections|streams|nhdp)/", name):
            continue
        if not (ROOT / name).exists():
            gone.append(name)
    assert not gone, f"ARCHITECTURE.md names files that do not exist: {sorted(gone)}"
