"""What each worker process says about itself, for an admin request any worker may answer.

With ``gateway serve --workers N`` every worker keeps its own config generation, reload result
and Redis breaker. Each writes them as one small JSON file in a directory the supervisor makes
for the run (``GATEWAY_STATE_DIR``), replacing it atomically (write, then rename) whenever they
change, and any worker reads them all. A file whose process is gone is ignored and removed. In
one process there is no directory and the board holds this process's record alone.
"""

from __future__ import annotations

import contextlib
import os
from typing import Any

import orjson

STATE_ENV = "GATEWAY_STATE_DIR"
_PREFIX = "worker-"


class WorkerBoard:
    def __init__(self, directory: str | None) -> None:
        self.directory = directory
        self._own: dict[str, Any] = {}

    @classmethod
    def from_environment(cls) -> WorkerBoard:
        return cls(os.environ.get(STATE_ENV) or None)

    @property
    def shared(self) -> bool:
        return self.directory is not None

    def publish(self, record: dict[str, Any]) -> None:
        """This worker's record, replacing its previous one."""
        self._own = {**record, "pid": os.getpid()}
        if self.directory is None:
            return
        path = os.path.join(self.directory, f"{_PREFIX}{os.getpid()}.json")
        temporary = path + ".tmp"
        try:
            with open(temporary, "wb") as file:
                file.write(orjson.dumps(self._own))
            os.replace(temporary, path)  # readers see the old record or the new, never half
        except OSError:
            # The board is for the admin view; serving never depends on it.
            with contextlib.suppress(OSError):
                os.unlink(temporary)

    def records(self) -> list[dict[str, Any]]:
        """Every live worker's record (this one's included), by pid."""
        if self.directory is None:
            return [self._own] if self._own else []
        found: list[dict[str, Any]] = []
        try:
            names = os.listdir(self.directory)
        except OSError:
            return [self._own] if self._own else []
        for name in names:
            if not (name.startswith(_PREFIX) and name.endswith(".json")):
                continue
            pid_text = name[len(_PREFIX) : -len(".json")]
            if not pid_text.isdigit():
                continue
            path = os.path.join(self.directory, name)
            if not _alive(int(pid_text)):
                with contextlib.suppress(OSError):
                    os.unlink(path)
                continue
            try:
                with open(path, "rb") as file:
                    found.append(orjson.loads(file.read()))
            except (OSError, orjson.JSONDecodeError):
                continue
        return sorted(found, key=lambda record: int(record.get("pid", 0)))


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True
