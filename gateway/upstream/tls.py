"""The TLS context an upstream's connections use: its own CAs, a client certificate (mTLS), or no
checks at all (a lab).

An upstream with the default ``tls`` gets None: the transport then keeps the context it builds
once for itself (the system's CAs, name checks on), so the common case costs nothing here.
Anything else is one ``ssl.SSLContext`` per upstream, built once per config load or reload and
shared by the clients of all its targets.

``tls_problem`` is for the config checks: it says, without quoting any file's content, which
file is missing, unreadable, not PEM, encrypted, or a key that does not belong to its
certificate, so a bad config is refused before it serves instead of failing every request.
Relative paths are relative to the process's working directory, as ``open()`` has them.
"""

from __future__ import annotations

import logging
import os
import ssl

from gateway.config.resilience import UpstreamTLS

__all__ = ["client_ssl_context", "tls_problem"]

logger = logging.getLogger("gateway.upstream.tls")

# What a PEM file of each kind must hold (RFC 7468 §5: certificates; §10-§11: private keys,
# whose label varies with the format: PRIVATE KEY, RSA PRIVATE KEY, EC PRIVATE KEY, ...).
_CERTIFICATE = b"-----BEGIN CERTIFICATE-----"
_PRIVATE_KEY = b"PRIVATE KEY-----"
# An encrypted key: PKCS #8 (RFC 7468 §11) or OpenSSL's legacy Proc-Type header. The gateway has
# no passphrase to give, and OpenSSL would otherwise ask for one on the terminal.
_ENCRYPTED = (b"-----BEGIN ENCRYPTED PRIVATE KEY-----", b"Proc-Type: 4,ENCRYPTED")


class _NoPassphrase(Exception):
    """Raised by the password callback: an encrypted key must never prompt a terminal."""


def _no_passphrase() -> bytes:
    raise _NoPassphrase


def _is_default(tls: UpstreamTLS) -> bool:
    return tls.ca_file is None and tls.cert_file is None and tls.key_file is None and tls.verify


def client_ssl_context(tls: UpstreamTLS, *, upstream: str | None = None) -> ssl.SSLContext | None:
    """The context for an upstream's https connections; None when ``tls`` is all defaults.

    Call it once per config load or reload for each upstream (not per target): with
    ``verify: false`` it logs the warning that must be seen at start. ``upstream`` names the
    upstream in that warning. Raises ``ValueError`` with ``tls_problem``'s message when a file
    cannot be used (the config checks should have said so first)."""
    if _is_default(tls):
        return None
    try:
        # With cafile, only those CAs are trusted: an internal CA replaces the system's.
        context = ssl.create_default_context(cafile=tls.ca_file)
        if tls.cert_file is not None:
            context.load_cert_chain(tls.cert_file, tls.key_file, password=_no_passphrase)
    except (OSError, ssl.SSLError, _NoPassphrase):
        raise ValueError(tls_problem(tls) or "the TLS files cannot be loaded") from None
    if not tls.verify:
        # Order matters: CERT_NONE is refused while check_hostname is on.
        context.check_hostname = False
        context.verify_mode = ssl.CERT_NONE
        warn_unverified(upstream)
    return context


def warn_unverified(upstream: str | None) -> None:
    """The warning an upstream with ``verify: false`` gets at every load and reload."""
    named = f"upstream {upstream!r}" if upstream else "an upstream"
    logger.warning(
        "TLS verification is OFF for %s (tls.verify: false): its certificate and name are "
        "NOT checked, so anyone on the path can pose as it and receive the API keys and "
        "prompts sent to it. Use this only in a lab; give tls.ca_file for an internal CA.",
        named,
    )


def tls_files_stamp(tls: UpstreamTLS) -> tuple[tuple[str, int, int], ...]:
    """Each TLS file's path, modification time and size: a reload reuses an upstream's pools
    (and the context they hold) only while these are unchanged, so a certificate rotated in
    place (cert-manager, a mounted Secret) is read by the next reload."""
    stamp = []
    for path in (tls.ca_file, tls.cert_file, tls.key_file):
        if path is None:
            continue
        try:
            info = os.stat(path)
        except OSError:
            stamp.append((path, -1, -1))
        else:
            stamp.append((path, info.st_mtime_ns, info.st_size))
    return tuple(stamp)


def tls_problem(tls: UpstreamTLS) -> str | None:
    """What makes ``tls`` unusable, naming the field and the path (never a file's content), or
    None when every file loads and the key belongs to its certificate."""
    if tls.ca_file is not None:
        problem = _pem_problem("ca_file", tls.ca_file, (_CERTIFICATE,), "certificates")
        if problem is not None:
            return problem
        try:
            ssl.create_default_context(cafile=tls.ca_file)
        except (OSError, ssl.SSLError):
            return f"ca_file {tls.ca_file}: not a PEM file of CA certificates"
    if tls.cert_file is None or tls.key_file is None:
        return None  # the model refuses one without the other
    problem = _pem_problem("cert_file", tls.cert_file, (_CERTIFICATE,), "a certificate")
    if problem is not None:
        return problem
    problem = _pem_problem("key_file", tls.key_file, (_PRIVATE_KEY,), "a private key")
    if problem is not None:
        return problem
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    try:
        context.load_cert_chain(tls.cert_file, tls.key_file, password=_no_passphrase)
    except _NoPassphrase:
        return f"key_file {tls.key_file}: the key is encrypted; give it without a passphrase"
    except ssl.SSLError as exc:
        # OpenSSL's reason codes, not its message text: they name no file and no key material.
        if exc.reason == "KEY_VALUES_MISMATCH":
            return (
                f"key_file {tls.key_file}: the key does not belong to the certificate in "
                f"cert_file {tls.cert_file}"
            )
        return (
            f"cert_file {tls.cert_file} and key_file {tls.key_file}: cannot be loaded as a "
            f"client certificate and its key ({exc.reason or 'unknown reason'})"
        )
    except OSError as exc:
        return f"cert_file {tls.cert_file}, key_file {tls.key_file}: {_os_reason(exc)}"
    return None


def _pem_problem(field: str, path: str, markers: tuple[bytes, ...], holds: str) -> str | None:
    try:
        with open(path, "rb") as file:
            data = file.read()
    except OSError as exc:
        return f"{field} {path}: {_os_reason(exc)}"
    if field == "key_file" and any(marker in data for marker in _ENCRYPTED):
        return f"{field} {path}: the key is encrypted; give it without a passphrase"
    if not all(marker in data for marker in markers):
        return f"{field} {path}: not a PEM file holding {holds}"
    return None


def _os_reason(exc: OSError) -> str:
    if isinstance(exc, FileNotFoundError):
        return "no such file (relative paths start at the working directory)"
    if isinstance(exc, PermissionError):
        return "cannot be read (permission denied)"
    if isinstance(exc, IsADirectoryError):
        return "is a directory, not a file"
    return f"cannot be read ({exc.strerror or type(exc).__name__})"
