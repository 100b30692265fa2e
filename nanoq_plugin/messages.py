"""Loggers that always reach the user: `nanoq: message` on stderr, unless the application configured its own."""

from __future__ import annotations

import logging
import sys


class _StderrHandler(logging.StreamHandler):
    """Writes to whatever `sys.stderr` is when a record is emitted (not the one at creation)."""

    @property
    def stream(self):
        return sys.stderr

    @stream.setter
    def stream(self, value):
        pass


def user_logger(name: str) -> logging.Logger:
    """Logger `name` at INFO with a `nanoq: message` stderr handler, unless one was configured: engines set up
    only their own loggers, and a message nobody sees is a silent fallback."""
    logger = logging.getLogger(name)
    if not logger.handlers:
        handler = _StderrHandler()
        handler.setFormatter(logging.Formatter("nanoq: %(message)s"))
        logger.addHandler(handler)
        logger.setLevel(logging.INFO)
        logger.propagate = False
    return logger
