"""YAML files -> one ``GatewayConfig``, or every error at once with its file, line and key path.

The steps, each reporting all it finds (the module doing each is named in brackets):

1. Read each file (regular files only, at most 4 MiB each and 16 MiB in all: ``files``) and
   parse it into plain values (``yamldoc``: duplicate keys, ``${NAME}`` expansion, bounded
   nesting and aliases), recording where every mapping key and sequence item sits.
2. Follow ``include:`` (``includes``; paths relative to the including file; for
   ``parse_config_text`` relative to the directory of ``filename``, so the current directory for
   ``"<string>"``), and merge (``merge``): ``routes`` and ``keys`` are concatenated (main file
   first, then includes depth first, in order), ``upstreams`` and ``models`` are merged by name,
   every other section is set by one file only. Positions follow the merge, so
   ``routes[5].path`` still points into its own file. An include must resolve, symlinks
   followed, inside the main file's directory (or the directory a symlinked main file really is
   in: a Kubernetes ConfigMap mounts files as symlinks into a ``..data`` directory beside them),
   unless the main file says ``include_outside: true``.
3. Validate with pydantic entry by entry (``validation``: each route, key, upstream and model,
   each other section), then run ``checks.check_config`` over the entries that are valid, so
   field errors and cross-reference errors are reported together. A reference to an entry that
   is itself invalid is not reported: its own error is. The checks wait only for files that
   could not be read or parsed, since the missing entries would make every reference to them
   look dangling.
4. A config read from files must declare ``routes`` in some file: a file caught between an
   editor's truncate and its write reads as empty, and an empty config would answer every request
   with 404. ``routes: []`` declares that no route is meant.

Upstream keys come from the environment, so no message ever carries an expanded value: pydantic's
``input`` is never printed, and, as a second line of defence, text taken from the environment is
replaced by its ``${NAME}`` wherever a message would show it (values of 8 characters or more, and
of 3 or more under an upstream's ``auth``, ``headers`` and ``query``), both as written and
without surrounding whitespace, the form the model keeps.
"""

from __future__ import annotations

import contextlib
import gc
import os
from collections.abc import Iterator, Mapping
from dataclasses import dataclass

from gateway.config.errors import ConfigError, ConfigIssue
from gateway.config.files import MAX_FILE_BYTES, FileStamp
from gateway.config.includes import INCLUDE_OUTSIDE, LoadSession, include_roots
from gateway.config.model import GatewayConfig

__all__ = [
    "INCLUDE_OUTSIDE",
    "ConfigError",
    "ConfigIssue",
    "ConfigSnapshot",
    "collection_paused",
    "load_config",
    "load_config_files",
    "parse_config_text",
    "read_config",
]


@dataclass(frozen=True)
class ConfigSnapshot:
    """One reading of a config: the config or the error, and exactly which bytes were read."""

    config: GatewayConfig | None
    error: ConfigError | None
    stamps: tuple[FileStamp, ...]  # every file named, in the order read; unreadable ones too

    @property
    def files(self) -> tuple[str, ...]:
        return tuple(stamp.file for stamp in self.stamps)


def load_config(
    path: str | os.PathLike[str], env: Mapping[str, str] | None = None
) -> GatewayConfig:
    """Load the file at ``path`` and its includes; ``env`` defaults to ``os.environ``."""
    return load_config_files(path, env)[0]


def load_config_files(
    path: str | os.PathLike[str], env: Mapping[str, str] | None = None
) -> tuple[GatewayConfig, tuple[str, ...]]:
    """Like :func:`load_config`, also naming every file read (for reload on change)."""
    snapshot = read_config(path, env)
    if snapshot.config is None:
        assert snapshot.error is not None
        raise snapshot.error
    return snapshot.config, snapshot.files


def read_config(
    path: str | os.PathLike[str], env: Mapping[str, str] | None = None
) -> ConfigSnapshot:
    """Read, parse and validate the config at ``path``; never raises ``ConfigError``."""
    file = os.fspath(path)
    session = LoadSession(
        os.environ if env is None else env, include_roots(file), require_routes=True
    )
    with collection_paused():
        data = session.read(file)
        if isinstance(data, str):
            session.issues.append(ConfigIssue(file, None, "", f"cannot read: {data}"))
        else:
            session.add(data, file, ((os.path.realpath(file), file),))
        config, error = session.finish()
        session.release()
    return ConfigSnapshot(config, error, tuple(session.stamps))


@contextlib.contextmanager
def collection_paused(*, freeze: bool = False) -> Iterator[None]:
    """Cyclic garbage collection paused while a config is built.

    Everything a load allocates stays alive until it ends, so collections during it find nothing
    to free; with a large config they were a third of the time. Left as it is if already paused
    (the reloader pauses it for longer). ``freeze``: what is alive at the end is moved out of
    later collections (``gc.freeze``, bpo-31558); see gateway/reload.py for why a reload does.
    """
    if not gc.isenabled():
        yield
        return
    gc.disable()
    try:
        yield
    finally:
        if freeze:
            gc.freeze()
        gc.enable()


def parse_config_text(
    text: str, filename: str = "<string>", env: Mapping[str, str] | None = None
) -> GatewayConfig:
    """Parse ``text`` as if read from ``filename``; includes are relative to its directory.

    Unlike a file, text in memory cannot be caught half-written, so it may leave out ``routes``.
    """
    session = LoadSession(os.environ if env is None else env, include_roots(filename))
    data = text.encode()
    if len(data) > MAX_FILE_BYTES:
        problem = f"it is {len(data):,} bytes, over the limit of {MAX_FILE_BYTES:,} bytes"
        session.issues.append(ConfigIssue(filename, None, "", f"cannot read: {problem}"))
    else:
        session.total = len(data)
        session.add(data, filename, ((os.path.realpath(filename), filename),))
    config, error = session.finish()
    if config is None:
        assert error is not None
        raise error
    return config
