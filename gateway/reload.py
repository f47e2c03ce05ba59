"""Config reload: on SIGHUP and when a config file changes.

A new config is loaded and validated in full before anything changes; an invalid one is refused,
logged with every error, and shown on ``/readyz``, while the snapshot in service keeps serving
(DESIGN §2). Files are polled (size and mtime) rather than watched with inotify: it works the
same on every filesystem, including the symlink swaps of Kubernetes ConfigMaps.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import signal
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass

from gateway.config.loader import ConfigError, load_config_files
from gateway.config.model import GatewayConfig

logger = logging.getLogger("gateway.reload")

Signature = tuple[tuple[str, int, int], ...]


@dataclass(slots=True)
class ReloadStatus:
    generation: int = 1
    last_reload_at: float | None = None
    last_error: str | None = None
    last_error_at: float | None = None
    failures: int = 0

    def as_dict(self) -> dict[str, object]:
        return {
            "generation": self.generation,
            "last_reload_at": self.last_reload_at,
            "last_error": self.last_error,
            "last_error_at": self.last_error_at,
            "failures": self.failures,
        }


def _signature(files: tuple[str, ...]) -> Signature:
    out = []
    for file in files:
        try:
            stat = os.stat(file)  # follows symlinks: a ConfigMap swap changes the target
            out.append((file, stat.st_mtime_ns, stat.st_size))
        except OSError:
            out.append((file, -1, -1))
    return tuple(out)


class ConfigReloader:
    """Loads ``path`` again when asked or when its files change, and applies it if valid."""

    def __init__(
        self,
        path: str,
        files: tuple[str, ...],
        apply: Callable[[GatewayConfig], Awaitable[None]],
        *,
        interval: float,
    ) -> None:
        self.path = path
        self.status = ReloadStatus()
        self._apply = apply
        self._interval = interval
        self._files = files
        self._seen = _signature(files)
        self._lock = asyncio.Lock()
        self._task: asyncio.Task[None] | None = None

    async def reload(self) -> bool:
        """Load, validate and apply the config; False (and the old one serving) if invalid."""
        async with self._lock:
            seen = _signature(self._files)
            try:
                config, files = await asyncio.to_thread(load_config_files, self.path)
            except ConfigError as exc:
                self._seen = seen  # do not retry the same broken files every poll
                self.status.failures += 1
                self.status.last_error = str(exc)
                self.status.last_error_at = time.time()
                logger.error("config reload refused; the previous config keeps serving:\n%s", exc)
                return False
            await self._apply(config)
            self._files = files
            self._seen = _signature(files)
            self.status.generation += 1
            self.status.last_reload_at = time.time()
            self.status.last_error = None
            logger.info("config reloaded (generation %d)", self.status.generation)
            return True

    def start(self) -> None:
        loop = asyncio.get_running_loop()
        with contextlib.suppress(NotImplementedError, RuntimeError, ValueError):
            # Only possible in the main thread of a process; tests that run the app in a
            # thread reload by file change or by calling reload().
            loop.add_signal_handler(signal.SIGHUP, lambda: asyncio.ensure_future(self.reload()))
        if self._interval > 0:
            self._task = asyncio.ensure_future(self._poll())

    async def stop(self) -> None:
        with contextlib.suppress(NotImplementedError, RuntimeError, ValueError):
            asyncio.get_running_loop().remove_signal_handler(signal.SIGHUP)
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task

    async def _poll(self) -> None:
        while True:
            await asyncio.sleep(self._interval)
            if _signature(self._files) != self._seen:
                await self.reload()
