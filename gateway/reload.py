"""Config reload: on SIGHUP and when a config file changes.

A new config is loaded and validated in full before anything changes; an invalid one is refused,
logged with every error, and shown on ``/readyz``, while the snapshot in service keeps serving.
Files are polled (device, inode, size and mtime) rather than watched with inotify: it works the
same on every filesystem, including the symlink swaps of Kubernetes ConfigMaps.

Files are written in place (editors, ``cat >``), atomically (a temporary file renamed over the
old one) or by a symlink swap (ConfigMaps). In place, a poll can land between the truncate and
the last write, so a changed file is read until two readings ``SETTLE_SECONDS`` apart agree
(the loader also refuses a config without routes, what an emptied file reads as).

Whatever goes wrong in a reload, ConfigError or not (a RecursionError from a hostile file was
once enough to end the watcher silently), is logged, counted, and the watcher goes on.
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

from gateway.config.files import FileStamp, Identity, identity_of, reread
from gateway.config.loader import ConfigSnapshot, collection_paused, read_config
from gateway.config.model import GatewayConfig

logger = logging.getLogger("gateway.reload")

Signature = tuple[tuple[str, Identity | None], ...]

# Editors write a config in one go, in microseconds to milliseconds; a file unchanged for 50 ms
# after it was read is one the writer has finished with. A file still changing after this many
# readings is left for the next poll.
SETTLE_SECONDS = 0.05
SETTLE_READINGS = 10


@dataclass(slots=True)
class ReloadStatus:
    generation: int = 1
    last_reload_at: float | None = None
    last_error: str | None = None
    last_error_at: float | None = None
    failures: int = 0
    # When the last reload ended, applied or refused (an admin's POST /admin/reload waits for it).
    last_attempt_at: float | None = None

    def as_dict(self) -> dict[str, object]:
        return {
            "generation": self.generation,
            "last_reload_at": self.last_reload_at,
            "last_error": self.last_error,
            "last_error_at": self.last_error_at,
            "failures": self.failures,
            "last_attempt_at": self.last_attempt_at,
        }


def _signature(files: tuple[str, ...]) -> Signature:
    out: list[tuple[str, Identity | None]] = []
    for file in files:
        try:
            # Follows symlinks: a ConfigMap swap changes the target.
            out.append((file, identity_of(os.stat(file))))
        except OSError:
            out.append((file, None))
    return tuple(out)


def _signature_of(stamps: tuple[FileStamp, ...]) -> Signature:
    """The signature of the files as they were when read: a change after the reading, even
    during the load, is seen by the next poll."""
    return tuple((stamp.file, stamp.identity) for stamp in stamps)


def _unchanged(stamps: tuple[FileStamp, ...]) -> bool:
    return all(reread(stamp) == stamp for stamp in stamps)


# No cyclic garbage collection while a config is loaded and applied, and none over it after
# (``collection_paused(freeze=True)``). A full collection walks every tracked object while
# holding the GIL: with a config of 10,000 keys alive, twice during a reload, that is 50-170 ms
# in one piece on a small machine, the stalls that took serving p99 from milliseconds to
# hundreds. Loading allocates enough to set off several. So collection waits for the reload,
# and what is alive then (the new config, the process's long-lived objects) is frozen out of
# later collections. The price: cyclic garbage alive at that moment is never collected; reloads
# are rare and a config holds no cycles, so this is a few objects per reload.


class ConfigReloader:
    """Loads ``path`` again when asked or when its files change, and applies it if valid."""

    def __init__(
        self,
        path: str,
        files: tuple[str, ...],
        apply: Callable[[GatewayConfig], Awaitable[None]],
        *,
        interval: float,
        settle: float = SETTLE_SECONDS,
        on_attempt: Callable[[], None] | None = None,
    ) -> None:
        self.path = path
        self.status = ReloadStatus()
        self._apply = apply
        self._interval = interval
        self._settle = settle
        self._files = files
        self._seen = _signature(files)
        self._lock = asyncio.Lock()
        self._task: asyncio.Task[None] | None = None
        self._on_attempt = on_attempt

    async def reload(self) -> bool:
        """Load, validate and apply the config; False (and the old one serving) if it is invalid,
        still being written, or anything else goes wrong."""
        async with self._lock:
            before = _signature(self._files)
            try:
                return await self._reload()
            except Exception as exc:  # the watcher must outlive any failure, expected or not
                self._seen = before  # do not retry the same files every poll
                # The class only: an unexpected exception's text may quote a config value (a
                # secret among them); the traceback is at debug level for whoever needs it.
                reason = f"unexpected {type(exc).__name__}"
                self._refused(reason)
                logger.error("config reload failed; the previous config keeps serving: %s", reason)
                logger.debug("config reload failure", exc_info=True)
                return False
            finally:
                self.status.last_attempt_at = time.time()
                if self._on_attempt is not None:
                    self._on_attempt()

    async def _reload(self) -> bool:
        with collection_paused(freeze=True):
            return await self._load_and_apply()

    async def _load_and_apply(self) -> bool:
        snapshot = await self._settled()
        if snapshot is None:
            logger.warning(
                "config files still changing after %d readings; trying again at the next poll",
                SETTLE_READINGS,
            )
            return False
        if snapshot.config is None:
            # Not the same broken files every poll: watch what was read (a broken file may
            # name other includes, or none) and what was watched before, each as it was seen.
            read = _signature_of(snapshot.stamps)
            named = {file for file, _ in read}
            kept = _signature(tuple(f for f in self._files if f not in named))
            self._seen = (*read, *kept)
            self._files = tuple(file for file, _ in self._seen)
            self._refused(str(snapshot.error))
            logger.error(
                "config reload refused; the previous config keeps serving:\n%s", snapshot.error
            )
            return False
        await self._apply(snapshot.config)
        self._files = snapshot.files
        self._seen = _signature_of(snapshot.stamps)
        self.status.generation += 1
        self.status.last_reload_at = time.time()
        self.status.last_error = None
        logger.info("config reloaded (generation %d)", self.status.generation)
        return True

    async def _settled(self) -> ConfigSnapshot | None:
        """A reading of the config whose files read the same again a moment later."""
        for _ in range(SETTLE_READINGS):
            # In a thread: the event loop keeps serving (the loader gives up the GIL often).
            snapshot = await asyncio.to_thread(read_config, self.path)
            await asyncio.sleep(self._settle)
            if await asyncio.to_thread(_unchanged, snapshot.stamps):
                return snapshot
        return None

    def _refused(self, reason: str) -> None:
        self.status.failures += 1
        self.status.last_error = reason
        self.status.last_error_at = time.time()

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
                await self.reload()  # never raises: see reload()
