"""Logging that only the primary rank prints (other ranks print errors only)."""
from __future__ import annotations

import sys

_state = {"primary": True}


def set_primary(primary: bool) -> None:
    _state["primary"] = primary


def is_primary() -> bool:
    return _state["primary"]


def log(message: str) -> None:
    """An informational line on stderr, from the primary rank only."""
    if _state["primary"]:
        print(f"medtl: {message}", file=sys.stderr, flush=True)


def error(message: str) -> None:
    """An error line on stderr, from any rank."""
    print(f"medtl: error: {message}", file=sys.stderr, flush=True)
