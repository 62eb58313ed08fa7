"""The local stack's secrets: generated on first use, kept as 0600 files in a 0700 folder, never printed.

A real deployment passes its secrets in NHDP_* variables (systemd credentials,
a vault); the local stack generates each one the first time it is asked for and
keeps it in `<data>/secrets/`. Writes are atomic (a temporary file renamed into
place) and created 0600 from the start, so no secret is ever readable by
another user, not even for an instant.
"""

from __future__ import annotations

import os
import re
import secrets
from pathlib import Path

_NAME = re.compile(r"^[a-z0-9][a-z0-9_.-]{0,99}$")


class Secrets:
    def __init__(self, folder: Path):
        self.folder = folder

    def _path(self, name: str) -> Path:
        if not _NAME.fullmatch(name):
            raise ValueError(f"secret name {name!r} must match {_NAME.pattern}")
        return self.folder / name

    def _ensure_folder(self) -> None:
        self.folder.mkdir(mode=0o700, parents=True, exist_ok=True)
        self.folder.chmod(0o700)

    def path(self, name: str) -> Path:
        """Where a secret lives (created first if missing), for programs that read a file (libpq's passfile)."""
        self.get(name)
        return self._path(name)

    def get(self, name: str) -> str:
        """The secret called `name`, generated (256 random bits, URL-safe) if it does not exist yet."""
        path = self._path(name)
        try:
            return path.read_text().strip()
        except FileNotFoundError:
            pass
        self._ensure_folder()
        value = secrets.token_urlsafe(32)
        try:  # O_EXCL: two processes asking at once agree on the first one written
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        except FileExistsError:
            return path.read_text().strip()
        with os.fdopen(fd, "w") as f:
            f.write(value)
        return value

    def exists(self, name: str) -> bool:
        return self._path(name).exists()

    def put(self, name: str, value: str) -> None:
        """Write (or rotate) a secret atomically, 0600 from its first byte."""
        path = self._path(name)
        self._ensure_folder()
        tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "w") as f:
            f.write(value)
        os.replace(tmp, path)

    def remove(self, name: str) -> None:
        self._path(name).unlink(missing_ok=True)

    def names(self) -> list[str]:
        if not self.folder.exists():
            return []
        return sorted(p.name for p in self.folder.iterdir() if _NAME.fullmatch(p.name))
