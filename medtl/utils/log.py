"""Logging that only the primary rank prints (other ranks print errors only)."""
from __future__ import annotations

import os
import sys

_state = {"primary": True}
# MEDTL_LOG_LEVEL=debug adds per-file and per-shard detail (never identifiers: see README, De-identification).
LEVEL_ENV = "MEDTL_LOG_LEVEL"


def set_primary(primary: bool) -> None:
    _state["primary"] = primary


def is_primary() -> bool:
    return _state["primary"]


def log(message: str) -> None:
    """An informational line on stderr, from the primary rank only."""
    if _state["primary"]:
        print(f"medtl: {message}", file=sys.stderr, flush=True)


def debug_enabled() -> bool:
    return os.environ.get(LEVEL_ENV, "info").lower() == "debug"


def debug(message: str) -> None:
    """A detail line on stderr, from the primary rank, when MEDTL_LOG_LEVEL=debug."""
    if _state["primary"] and debug_enabled():
        print(f"medtl: debug: {message}", file=sys.stderr, flush=True)


def error(message: str) -> None:
    """An error line on stderr, from any rank."""
    print(f"medtl: error: {message}", file=sys.stderr, flush=True)
