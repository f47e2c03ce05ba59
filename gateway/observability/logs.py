"""The gateway's own log lines (not the access log): plain text, or one JSON object per line.

``server.log_format: json`` makes every line of the ``gateway`` and ``uvicorn`` loggers a JSON
object with the same first keys as the access line (``ts``, then ``level``, ``logger``,
``message``, and ``exc`` with the traceback when there is one), so a log pipeline parses both
kinds alike. ``server.log_level`` (or ``--log-level``) sets the level of both loggers.
"""

from __future__ import annotations

import logging
from typing import Any, Literal

import orjson

LogFormat = Literal["text", "json"]
TEXT_FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"


class JsonFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        line: dict[str, Any] = {
            "ts": record.created,
            "level": record.levelname.lower(),
            "logger": record.name,
            "message": record.getMessage(),
        }
        if record.exc_info:
            line["exc"] = self.formatException(record.exc_info)
        elif record.exc_text:
            line["exc"] = record.exc_text
        return orjson.dumps(line).decode()


def logging_config(level: str, log_format: LogFormat = "text") -> dict[str, Any]:
    """A ``logging.config.dictConfig`` for the gateway's and uvicorn's loggers."""
    formatter: dict[str, Any] = (
        {"()": f"{__name__}.JsonFormatter"} if log_format == "json" else {"format": TEXT_FORMAT}
    )
    return {
        "version": 1,
        "disable_existing_loggers": False,
        "formatters": {"gateway": formatter},
        "handlers": {
            "stderr": {"class": "logging.StreamHandler", "formatter": "gateway"},
        },
        "loggers": {
            "gateway": {"handlers": ["stderr"], "level": level.upper(), "propagate": False},
            "uvicorn": {"handlers": ["stderr"], "level": level.upper(), "propagate": False},
        },
    }
