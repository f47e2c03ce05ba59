"""The reloader in process, driven by real file writes: a config caught mid-write never goes live,
any failure leaves the watcher running, and a big reload leaves the event loop free to serve."""

from __future__ import annotations

import asyncio
import logging
import os
import time
from collections.abc import Awaitable, Callable
from pathlib import Path

import pytest

from gateway.config.loader import load_config_files, read_config
from gateway.config.model import GatewayConfig
from gateway.reload import ConfigReloader
from tests.config.bigconfig import big_config

ROUTES = 12


def versioned(version: int) -> str:
    """A valid config with ``ROUTES`` routes; the model ``v<version>`` tells which one it is."""
    routes = "".join(
        f"  - {{name: r{i}, path: /v1/r{i}/chat/completions, upstream: u}}\n" for i in range(ROUTES)
    )
    return (
        "upstreams:\n  u: {base_url: 'http://127.0.0.1:1/v1'}\n"
        f"models:\n  v{version}: {{upstream: u}}\nroutes:\n{routes}"
    )


def version_of(config: GatewayConfig) -> int:
    (name,) = config.models
    return int(name[1:])


def write_in_place(path: Path, text: str) -> None:
    """As an editor or ``cat >`` does: truncate, then write (in two writes, as a large file is)."""
    with path.open("w") as file:
        file.flush()
        time.sleep(0.002)
        file.write(text[: len(text) // 2])
        file.flush()
        time.sleep(0.002)
        file.write(text[len(text) // 2 :])


def write_atomically(path: Path, text: str) -> None:
    """A temporary file renamed over the old one."""
    temporary = path.with_name(f".{path.name}.tmp")
    temporary.write_text(text)
    os.replace(temporary, path)


class ConfigMapVolume:
    """A Kubernetes ConfigMap volume: ``gateway.yaml -> ..data/gateway.yaml``, and ``..data`` a
    symlink to a timestamped directory that the kubelet swaps with a rename."""

    def __init__(self, directory: Path) -> None:
        self.directory = directory
        self.count = 0
        self.path = directory / "gateway.yaml"

    def write(self, text: str) -> None:
        self.count += 1
        version = self.directory / f"..2025_01_01_00_00_{self.count:04d}"
        version.mkdir()
        (version / "gateway.yaml").write_text(text)
        link = self.directory / "..data_tmp"
        link.symlink_to(version.name)
        old = (
            (self.directory / "..data").resolve() if (self.directory / "..data").exists() else None
        )
        os.replace(link, self.directory / "..data")
        if not self.path.is_symlink():
            self.path.symlink_to("..data/gateway.yaml")
        if old is not None:
            (old / "gateway.yaml").unlink()
            old.rmdir()


async def wait_for(condition: Callable[[], bool], timeout: float = 5.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError("condition not met in time")
        await asyncio.sleep(0.01)


class Watched:
    """A ConfigReloader polling ``path`` every few ms, recording every config it applies."""

    def __init__(self, path: Path, interval: float = 0.005) -> None:
        self.applied: list[GatewayConfig] = []
        _, files = load_config_files(path)
        self.reloader = ConfigReloader(str(path), files, self._apply, interval=interval)

    async def _apply(self, config: GatewayConfig) -> None:
        self.applied.append(config)

    async def __aenter__(self) -> Watched:
        self.reloader.start()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.reloader.stop()


async def rewrite_while_watched(path: Path, write: Callable[[str], None], versions: int) -> None:
    """Write ``versions`` new versions while the reloader polls; every applied config must be
    whole, and the last version must go live."""
    async with Watched(path) as watched:

        def writes() -> None:
            for version in range(1, versions + 1):
                write(versioned(version))
                time.sleep(0.004)

        await asyncio.to_thread(writes)
        await wait_for(
            lambda: bool(watched.applied) and version_of(watched.applied[-1]) == versions
        )
    assert watched.applied
    for config in watched.applied:
        assert len(config.routes) == ROUTES


async def test_config_caught_mid_write_in_place_never_goes_live(tmp_path: Path) -> None:
    path = tmp_path / "gateway.yaml"
    path.write_text(versioned(0))
    await rewrite_while_watched(path, lambda text: write_in_place(path, text), versions=80)


async def test_config_written_atomically_goes_live_whole(tmp_path: Path) -> None:
    path = tmp_path / "gateway.yaml"
    path.write_text(versioned(0))
    await rewrite_while_watched(path, lambda text: write_atomically(path, text), versions=80)


async def test_config_map_symlink_swap_goes_live_whole(tmp_path: Path) -> None:
    volume = ConfigMapVolume(tmp_path)
    volume.write(versioned(0))
    await rewrite_while_watched(volume.path, volume.write, versions=80)


async def test_config_map_includes_resolve_inside_the_volume(tmp_path: Path) -> None:
    # Both files are symlinks into the same ..data directory, which a swap replaces at once.
    volume = ConfigMapVolume(tmp_path)
    volume.write("include: [routes.yaml]\n")
    data = tmp_path / "..data"
    (data.resolve() / "routes.yaml").write_text(versioned(1))
    (tmp_path / "routes.yaml").symlink_to("..data/routes.yaml")
    config, files = load_config_files(volume.path, {})
    assert len(config.routes) == ROUTES
    assert files == (str(volume.path), str(tmp_path / "routes.yaml"))


async def test_an_emptied_file_is_refused_and_the_old_config_keeps_serving(
    tmp_path: Path,
) -> None:
    path = tmp_path / "gateway.yaml"
    path.write_text(versioned(0))
    async with Watched(path) as watched:
        path.write_text("")
        await wait_for(lambda: watched.reloader.status.failures == 1)
        assert watched.applied == []
        path.write_text(versioned(1))
        await wait_for(lambda: len(watched.applied) == 1)
    assert version_of(watched.applied[0]) == 1


# --- hot reload never stops ------------------------------------------------------------------


async def test_a_hostile_file_over_the_live_config_is_refused_and_later_edits_apply(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    path = tmp_path / "gateway.yaml"
    path.write_text(versioned(0))
    async with Watched(path) as watched:
        path.write_text("routes: " + "[" * 100_000 + "]" * 100_000 + "\n")
        await wait_for(lambda: watched.reloader.status.failures == 1)
        assert "nesting deeper than 64 levels" in (watched.reloader.status.last_error or "")
        path.write_text(versioned(1))
        await wait_for(lambda: len(watched.applied) == 1)
    assert version_of(watched.applied[0]) == 1
    assert watched.reloader.status.last_error is None


@pytest.mark.parametrize("where", ["loading", "applying"])
async def test_an_unexpected_error_is_logged_counted_and_watching_goes_on(
    tmp_path: Path,
    caplog: pytest.LogCaptureFixture,
    monkeypatch: pytest.MonkeyPatch,
    where: str,
) -> None:
    path = tmp_path / "gateway.yaml"
    path.write_text(versioned(0))
    async with Watched(path) as watched:
        if where == "loading":
            calls = 0

            def failing_once(*args: object) -> object:
                nonlocal calls
                calls += 1
                if calls == 1:
                    raise RecursionError("maximum recursion depth exceeded")
                return read_config(*args)  # type: ignore[arg-type]

            monkeypatch.setattr("gateway.reload.read_config", failing_once)
        else:
            real_apply = watched.reloader._apply
            applies = 0

            async def apply_failing_once(config: GatewayConfig) -> None:
                nonlocal applies
                applies += 1
                if applies == 1:
                    raise RecursionError("maximum recursion depth exceeded")
                await real_apply(config)

            apply: Callable[[GatewayConfig], Awaitable[None]] = apply_failing_once
            monkeypatch.setattr(watched.reloader, "_apply", apply)
        with caplog.at_level(logging.ERROR, logger="gateway.reload"):
            path.write_text(versioned(1))
            await wait_for(lambda: watched.reloader.status.failures == 1)
        status = watched.reloader.status
        # The class only: an unexpected exception's text may quote a config value.
        assert status.last_error == "unexpected RecursionError"
        assert status.generation == 1
        (record,) = caplog.records
        assert record.getMessage() == (
            "config reload failed; the previous config keeps serving: unexpected RecursionError"
        )
        assert record.exc_info is None  # the traceback is logged at debug level only
        path.write_text(versioned(2))
        await wait_for(lambda: len(watched.applied) == 1)
    assert version_of(watched.applied[0]) == 2
    assert watched.reloader.status.generation == 2


# --- a big reload does not freeze serving ----------------------------------------------------


async def test_reloading_a_big_config_leaves_the_event_loop_responsive(tmp_path: Path) -> None:
    """1,000 routes and 10,000 keys: the loop must keep its turns while the reload runs in a
    thread (every step gives the GIL up within milliseconds). 50 ms leaves room for a loaded
    2-core CI machine; the worst gap measured on one was about 20 ms."""
    path = tmp_path / "gateway.yaml"
    path.write_text(big_config())
    applied: list[GatewayConfig] = []

    async def apply(config: GatewayConfig) -> None:
        applied.append(config)

    reloader = ConfigReloader(str(path), (str(path),), apply, interval=0)
    loop = asyncio.get_running_loop()
    gaps: list[float] = []
    done = asyncio.Event()

    async def tick() -> None:
        last = loop.time()
        while not done.is_set():
            await asyncio.sleep(0.001)
            now = loop.time()
            gaps.append(now - last)
            last = now

    ticker = asyncio.create_task(tick())
    try:
        assert await reloader.reload()
    finally:
        done.set()
        await ticker
    assert len(applied[0].keys) == 10_000
    assert max(gaps) < 0.05, f"worst event-loop stall {max(gaps) * 1000:.0f} ms"


@pytest.mark.parametrize(
    "broken",
    [
        "include: [routes.yaml]\nroutes: [unclosed\n",  # its includes are never read
        "include: [routes.yaml, not-yet.yaml]\n",  # names a file that does not exist yet
    ],
)
async def test_one_broken_edit_is_refused_once_not_at_every_poll(
    tmp_path: Path, broken: str
) -> None:
    (tmp_path / "routes.yaml").write_text(versioned(0))
    path = tmp_path / "gateway.yaml"
    path.write_text("include: [routes.yaml]\n")
    async with Watched(path, interval=0.02) as watched:
        path.write_text(broken)
        await wait_for(lambda: watched.reloader.status.failures == 1)
        await asyncio.sleep(0.5)  # 25 polls
        assert watched.reloader.status.failures == 1
        path.write_text("include: [routes.yaml]\n")
        (tmp_path / "routes.yaml").write_text(versioned(1))
        await wait_for(lambda: len(watched.applied) == 1)
    assert version_of(watched.applied[0]) == 1
