"""``gateway``: serve, check a config, make keys, print the config's JSON Schema."""

from __future__ import annotations

import argparse
import ipaddress
import json
import os
import shutil
import signal
import sys
import tempfile
from collections.abc import Sequence
from typing import Any, cast

import yaml
from pydantic import ValidationError

from gateway import __version__
from gateway.auth import hash_key, new_key
from gateway.config.loader import ConfigError, load_config, load_config_files
from gateway.config.model import ApiKey, GatewayConfig
from gateway.jobs.signing import new_secret
from gateway.observability import metrics, workers
from gateway.observability.logs import logging_config
from gateway.routing import RouteTable
from gateway.server.protocol import GatewayProtocol


def _print_errors(path: str, exc: ConfigError) -> None:
    print(f"{path}: {len(exc.errors)} error(s)", file=sys.stderr)
    for issue in exc.errors:
        print(f"  {issue}", file=sys.stderr)


def _load(path: str) -> GatewayConfig | None:
    try:
        return load_config(path)
    except ConfigError as exc:
        _print_errors(path, exc)
        return None


def describe(config: GatewayConfig) -> str:
    """The resolved table ``gateway check`` prints: every public path, method and target."""
    table = RouteTable(config.routes)
    rows = [("ROUTE", "METHODS", "PUBLIC PATH", "UPSTREAM", "UPSTREAM PATH", "NOTES")]
    for endpoint in table.endpoints:
        route, alias = endpoint.route, endpoint.alias
        notes = []
        if alias is not None:
            notes.append("alias")
            if alias.deprecated is not False:
                notes.append(
                    "deprecated"
                    + ("" if alias.deprecated is True else f" since {alias.deprecated}")
                )
            if alias.sunset:
                notes.append(f"sunset {alias.sunset}")
            if alias.successor:
                notes.append(f"successor {alias.successor}")
        targets = config.upstreams[route.upstream].target_list()
        base = targets[0].base_url
        if len(targets) > 1:
            notes.append(f"{len(targets)} targets")
        rows.append(
            (
                route.name,
                ",".join(route.methods),
                endpoint.public_path,
                route.upstream,
                base + route.target_path(),
                "; ".join(notes),
            )
        )
    widths = [max(len(row[i]) for row in rows) for i in range(5)]
    lines = [
        "  ".join(cell.ljust(widths[i]) for i, cell in enumerate(row[:5])) + "  " + row[5]
        for row in rows
    ]
    lines.append("")
    lines.append("MODELS")
    for name, model in config.models.items():
        chain = [f"{model.upstream}:{model.model or name}"]
        chain.extend(f"{step.upstream}:{step.model or name}" for step in model.fallbacks)
        lines.append(f"  {name} -> " + ", then ".join(chain))
    unlisted = "routed to the route's upstream" if config.allow_unlisted_models else "refused (404)"
    lines.append(f"  (unlisted models: {unlisted})")
    lines.append("")
    lines.append("KEYS")
    for key in config.keys:
        team = f" team={key.team}" if key.team else ""
        lines.append(
            f"  {key.name}{team} routes={','.join(key.routes)} models={','.join(key.models)}"
        )
    return "\n".join(line.rstrip() for line in lines)


def _print_unexpected(path: str, exc: Exception) -> None:
    # A loader bug or an input it did not foresee: one line names the file and the cause, as a
    # config error does, rather than a traceback the admin must read through.
    print(f"{path}: cannot load: {type(exc).__name__}: {exc}", file=sys.stderr)


def _check(args: argparse.Namespace) -> int:
    try:
        config = _load(args.config)
    except Exception as exc:
        _print_unexpected(args.config, exc)
        return 1
    if config is None:
        return 1
    print(f"{args.config}: OK")
    print(describe(config))
    return 0


# The key the README prints and config/gateway.yaml accepts: anyone who has read the README
# holds it, so it must never be accepted by a gateway others can reach.
DEMO_KEY = "sk-gw-demo"


def is_loopback(host: str) -> bool:
    """Whether listening on ``host`` is reachable from this machine only."""
    if host.lower().rstrip(".") == "localhost":
        return True
    try:
        address = ipaddress.ip_address(host.removeprefix("[").removesuffix("]"))
    except ValueError:
        return False  # any other name (or "" = every interface) may be reachable from outside
    mapped = address.ipv4_mapped if isinstance(address, ipaddress.IPv6Address) else None
    return address.is_loopback or (mapped is not None and mapped.is_loopback)


def demo_key_refusal(config: GatewayConfig, host: str, demo: bool) -> str | None:
    """Why ``gateway serve`` must not serve ``config`` on ``host``, or None if it may: a config
    accepting the published demo key is for trying the gateway on this machine only."""
    if demo or is_loopback(host):
        return None
    demo_hash = hash_key(DEMO_KEY)
    names = [key.name for key in config.keys if key.hash == demo_hash]
    if not names:
        return None
    return (
        f"refusing to listen on {host!r}: key {names[0]!r} is the published demo key "
        f"{DEMO_KEY!r}, which anyone can use; replace its hash with one from "
        "'gateway keys new NAME', listen on 127.0.0.1, or pass --demo to serve it anyway"
    )


def _serve(args: argparse.Namespace) -> int:
    # Until the app's config reloader installs its SIGHUP handler (at startup), SIGHUP would
    # terminate the process: a reload sent while the gateway starts must not kill it.
    signal.signal(signal.SIGHUP, signal.SIG_IGN)
    try:
        config, files = load_config_files(args.config)
    except ConfigError as exc:
        _print_errors(args.config, exc)
        return 1
    except Exception as exc:
        _print_unexpected(args.config, exc)
        return 1
    refusal = demo_key_refusal(config, args.host or config.server.host, args.demo)
    if refusal is not None:
        print(f"{args.config}: {refusal}", file=sys.stderr)
        return 1
    log_level: str = config.server.log_level if args.log_level is None else args.log_level
    # Metrics: with several workers, prometheus_client's multiprocess mode reads one directory
    # the workers share; it must be set before they import prometheus_client, and be empty.
    own_dirs: list[str] = []
    metrics_dir = os.environ.get(metrics.MULTIPROCESS_ENV) or None
    if args.workers > 1 or metrics_dir is not None:
        made = metrics_dir is None
        metrics_dir = metrics.prepare_multiprocess_directory(metrics_dir)
        if made:
            own_dirs.append(metrics_dir)
        os.environ[metrics.MULTIPROCESS_ENV] = metrics_dir
    if args.workers > 1:
        # Where each worker says what config it serves, for an admin request any worker answers.
        state_dir = tempfile.mkdtemp(prefix="gateway-workers-")
        own_dirs.append(state_dir)
        os.environ[workers.STATE_ENV] = state_dir
    try:
        return _run(args, config, files, log_level, metrics_dir)
    finally:
        for directory in own_dirs:
            shutil.rmtree(directory, ignore_errors=True)


def _run(
    args: argparse.Namespace,
    config: GatewayConfig,
    files: tuple[str, ...],
    log_level: str,
    metrics_dir: str | None,
) -> int:
    import uvicorn

    from gateway.app import Gateway
    from gateway.server import runner

    app: Gateway | str
    if args.workers > 1:
        # Each worker process loads the config itself, from the environment.
        os.environ["GATEWAY_CONFIG"] = os.path.abspath(args.config)
        if args.root_path is not None:
            os.environ["GATEWAY_ROOT_PATH"] = args.root_path
        app = "gateway.app:app_from_environment"
    else:
        # One process serves the very config checked above: loaded once.
        app = Gateway(config, root_path=args.root_path, config_files=files)
    graceful_timeout: float = (
        config.server.graceful_timeout if args.graceful_timeout is None else args.graceful_timeout
    )
    server_config = uvicorn.Config(
        app,
        factory=isinstance(app, str),
        host=args.host or config.server.host,
        port=config.server.port if args.port is None else args.port,
        workers=args.workers,
        # uvicorn's httptools protocol with caps on heads, slow clients and connections.
        http=GatewayProtocol,
        # No WebSocket: the protocol answers an upgrade with an OpenAI-shaped 400.
        ws="none",
        loop="uvloop",
        lifespan="on",
        # One place decides whom to trust: the gateway's middleware, from YAML. uvicorn's own
        # handling covers fewer headers and trusts 127.0.0.1 by default.
        proxy_headers=False,
        forwarded_allow_ips="",
        # The upstream's Server and Date headers pass through; uvicorn adds none of its own.
        server_header=False,
        date_header=False,
        access_log=False,
        log_config=logging_config(log_level, config.server.log_format),
        timeout_keep_alive=config.server.connections.keep_alive_timeout,
        # uvicorn would otherwise wait for every open stream, however long, before exiting.
        # Annotated int, but only ever used as asyncio.timeout()'s delay: fractions work.
        timeout_graceful_shutdown=cast(int, graceful_timeout),
    )
    drain_delay = config.server.drain_delay if args.drain_delay is None else args.drain_delay

    def worker_exited(pid: int) -> None:
        if metrics_dir is not None:
            # Its gauges go; its counters stay in the totals (docs/operations.md).
            metrics.forget_workers(metrics_dir, [pid])

    runner.run(server_config, drain_delay=drain_delay, on_worker_exit=worker_exited)
    return 0


def _keys_new(args: argparse.Namespace) -> int:
    entry: dict[str, Any] = {"name": args.name}
    if args.team:
        entry["team"] = args.team
    try:
        # The same rules the config applies to a key's name and team, so what is printed loads.
        ApiKey.model_validate({**entry, "hash": "sha256:" + "0" * 64})
    except ValidationError as exc:
        for error in exc.errors(include_url=False, include_input=False):
            field = ".".join(str(part) for part in error["loc"])
            print(f"{field}: {error['msg']}", file=sys.stderr)
        return 1
    key = new_key()
    entry["hash"] = hash_key(key)
    print(f"# The key, shown once; hand it to {args.name} and keep no copy:", file=sys.stderr)
    print(key)
    print("# Add under 'keys:' in the config:", file=sys.stderr)
    # Dumped by YAML itself: a name such as 'yes', 'null' or '1e3' is quoted so it loads back
    # as the string it is, not as a boolean, null or number.
    listed = yaml.safe_dump([entry], sort_keys=False, default_flow_style=False)
    print("\n".join("  " + line for line in listed.splitlines()))
    return 0


def _keys_hash(args: argparse.Namespace) -> int:
    key = sys.stdin.readline().strip()
    if not key:
        print("no key on standard input", file=sys.stderr)
        return 1
    print(hash_key(key))
    return 0


def _webhooks_secret(args: argparse.Namespace) -> int:
    print(
        "# Put it in GATEWAY_WEBHOOK_SECRET (or the variable jobs.webhooks.secret_env names); to "
        "rotate, put the new one first and keep the old one after a space for a while:",
        file=sys.stderr,
    )
    print(new_secret())
    return 0


def _schema(args: argparse.Namespace) -> int:
    print(json.dumps(GatewayConfig.model_json_schema(), indent=2))
    return 0


def _seconds(text: str) -> float:
    """A duration flag: seconds, not negative (as the config's own fields)."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a number of seconds: {text!r}") from None
    if not value >= 0 or value == float("inf"):  # NaN fails the first test
        raise argparse.ArgumentTypeError(f"must be a finite number of seconds >= 0: {text!r}")
    return value


def parser() -> argparse.ArgumentParser:
    root = argparse.ArgumentParser(prog="gateway", description=__doc__)
    root.add_argument("--version", action="version", version=__version__)
    commands = root.add_subparsers(dest="command", required=True)

    serve = commands.add_parser("serve", help="serve the gateway")
    serve.add_argument("--config", default=os.environ.get("GATEWAY_CONFIG", "config/gateway.yaml"))
    serve.add_argument("--host", help="default: server.host from the config")
    serve.add_argument("--port", type=int, help="default: server.port from the config")
    serve.add_argument("--workers", type=int, default=1)
    serve.add_argument("--root-path", help="public path prefix; overrides server.root_path")
    serve.add_argument(
        "--log-level",
        choices=("debug", "info", "warning", "error", "critical"),
        type=str.lower,
        help="the gateway's own log lines; overrides server.log_level (default info)",
    )
    serve.add_argument(
        "--drain-delay",
        type=_seconds,
        help="seconds to go on accepting connections after SIGTERM while /readyz answers 503; "
        "overrides server.drain_delay (default 5)",
    )
    serve.add_argument(
        "--graceful-timeout",
        type=_seconds,
        help="seconds open requests get to finish once the listening socket is closed; "
        "overrides server.graceful_timeout (default 20)",
    )
    serve.add_argument(
        "--demo",
        action="store_true",
        help=f"serve a config accepting the published demo key {DEMO_KEY} on a non-loopback "
        "address (refused otherwise)",
    )
    serve.set_defaults(run=_serve)

    check = commands.add_parser("check", help="validate a config and print its route table")
    check.add_argument("config")
    check.set_defaults(run=_check)

    keys = commands.add_parser("keys", help="client API keys")
    key_commands = keys.add_subparsers(dest="keys_command", required=True)
    new = key_commands.add_parser("new", help="make a key; print it once and its YAML entry")
    new.add_argument("name")
    new.add_argument("--team")
    new.set_defaults(run=_keys_new)
    hashed = key_commands.add_parser("hash", help="print the hash of a key read from stdin")
    hashed.set_defaults(run=_keys_hash)

    webhooks = commands.add_parser("webhooks", help="job webhooks")
    webhook_commands = webhooks.add_subparsers(dest="webhooks_command", required=True)
    secret = webhook_commands.add_parser(
        "secret",
        help="print a fresh signing secret ('whsec_' and base64 of 32 random bytes); several, "
        "space separated in the variable, sign with each (rotation)",
    )
    secret.set_defaults(run=_webhooks_secret)

    schema = commands.add_parser("schema", help="print the config's JSON Schema")
    schema.set_defaults(run=_schema)
    return root


def main(argv: Sequence[str] | None = None) -> int:
    args = parser().parse_args(argv)
    result: int = args.run(args)
    return result


if __name__ == "__main__":
    raise SystemExit(main())
