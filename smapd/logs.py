"""Logging: loguru to stderr, configured once per process by the command that runs.

Text lines carry no colours when stderr is not a TTY (journald stores them verbatim); ``json``
writes one JSON object per line. Library logging (stdlib ``logging``) is routed into loguru.
"""
from __future__ import annotations

import json
import logging
import sys
from typing import Any

from loguru import logger


class _ToLoguru(logging.Handler):
    def emit(self, record: logging.LogRecord) -> None:
        try:
            level: str | int = logger.level(record.levelname).name
        except ValueError:
            level = record.levelno
        logger.opt(depth=6, exception=record.exc_info).log(level, "{}: {}", record.name, record.getMessage())


def _json_sink(message: Any) -> None:
    r = message.record
    line = {"time": r["time"].isoformat(), "level": r["level"].name, "message": r["message"],
            **{k: v for k, v in r["extra"].items() if isinstance(v, (str, int, float, bool)) or v is None}}
    if r["exception"]:
        line["exception"] = "".join(__import__("traceback").format_exception(*r["exception"]))[-4000:]
    sys.stderr.write(json.dumps(line, default=str) + "\n")


def setup_logging(level: str = "INFO", fmt: str = "text", *, timestamps: bool = True) -> None:
    """Configure loguru for this process (idempotent)."""
    logger.remove()
    if fmt == "json":
        logger.add(_json_sink, level=level)
    else:
        # Under systemd journald adds its own timestamp; a terminal user wants one.
        stamp = "{time:YYYY-MM-DD HH:mm:ss} " if timestamps else ""
        logger.add(sys.stderr, level=level, colorize=sys.stderr.isatty(),
                   format=stamp + "<level>{level: <7}</level> {message}")
    logging.basicConfig(handlers=[_ToLoguru()], level=logging.WARNING, force=True)
    for noisy in ("faster_whisper", "apscheduler", "watchdog"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
