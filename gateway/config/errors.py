"""How a configuration's problems are reported: each as ``file:line: key.path: message``, all
of them at once (docs/design.md §2)."""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

__all__ = ["ConfigError", "ConfigIssue"]


@dataclass(frozen=True)
class ConfigIssue:
    """One problem, printed as ``file:line: key.path: message``."""

    file: str
    line: int | None
    path: str
    message: str

    def __str__(self) -> str:
        where = self.file if self.line is None else f"{self.file}:{self.line}"
        return f"{where}: {self.path}: {self.message}" if self.path else f"{where}: {self.message}"


class ConfigError(Exception):
    """An invalid configuration; ``errors`` holds every problem found, in file and line order."""

    def __init__(self, errors: Iterable[ConfigIssue]) -> None:
        self.errors = tuple(errors)
        super().__init__("\n".join(str(issue) for issue in self.errors))
