"""medtl's log lines on stdlib `logging`: `medtl: MESSAGE` on stderr, from the primary rank only
(errors from any rank), optionally timestamped, with a copy in the run folder."""
from __future__ import annotations

import contextlib
import logging
import os
import sys
import time

from medtl.errors import MedtlError

# MEDTL_LOG_LEVEL=debug adds per-study and per-shard detail (studies by salted id: never a name from the input;
# see docs/ingest.md, De-identification).
LEVEL_ENV = "MEDTL_LOG_LEVEL"
# MEDTL_LOG_TIMESTAMPS=1 (or `medtl --log-timestamps`) starts each stderr line with the UTC time.
TIMESTAMPS_ENV = "MEDTL_LOG_TIMESTAMPS"
# The copy of a training run's log, in its run folder (always timestamped: runs resume across days).
RUN_LOG_FILE = "medtl.log"

LOGGER_NAME = "medtl"
_state = {"primary": True}
_logger = logging.getLogger(LOGGER_NAME)


def set_primary(primary: bool) -> None:
    _state["primary"] = primary


def is_primary() -> bool:
    return _state["primary"]


def debug_enabled() -> bool:
    return os.environ.get(LEVEL_ENV, "info").lower() == "debug"


def timestamps_enabled() -> bool:
    return os.environ.get(TIMESTAMPS_ENV, "").lower() in ("1", "true", "yes", "on")


class _RankFilter(logging.Filter):
    """Errors pass from every rank; other lines from the primary rank only, debug lines on request."""

    def filter(self, record: logging.LogRecord) -> bool:
        if record.levelno >= logging.ERROR:
            return True
        if record.levelno < logging.INFO and not debug_enabled():
            return False
        return _state["primary"]


class _Formatter(logging.Formatter):
    """`medtl: MESSAGE` for info, `medtl: debug: ...`, `medtl: warning: ...`, `medtl: error: ...`;
    with `timestamped`, `2026-12-01T01:02:03Z medtl: ...`."""

    converter = time.gmtime
    _PREFIX = {logging.DEBUG: "debug: ", logging.WARNING: "warning: ", logging.ERROR: "error: ",
               logging.CRITICAL: "error: "}

    def __init__(self, timestamped: bool | None = None):
        super().__init__(datefmt="%Y-%m-%dT%H:%M:%SZ")
        self.timestamped = timestamped

    def format(self, record: logging.LogRecord) -> str:
        line = f"medtl: {self._PREFIX.get(record.levelno, '')}{record.getMessage()}"
        stamped = timestamps_enabled() if self.timestamped is None else self.timestamped
        return f"{self.formatTime(record, self.datefmt)} {line}" if stamped else line


class _StderrHandler(logging.StreamHandler):
    """Writes to whatever sys.stderr is at the time (pytest and notebooks replace it)."""

    @property
    def stream(self):
        return sys.stderr

    @stream.setter
    def stream(self, _value):
        pass


def _configure() -> None:
    if any(isinstance(h, _StderrHandler) for h in _logger.handlers):
        return
    handler = _StderrHandler()
    handler.setFormatter(_Formatter())
    handler.addFilter(_RankFilter())
    _logger.addHandler(handler)
    _logger.setLevel(logging.DEBUG)  # the filter decides; a user may still raise this level
    _logger.propagate = False  # one line per message, even when a notebook configured the root logger


_configure()


def log(message: str) -> None:
    """An informational line on stderr, from the primary rank only."""
    _logger.info(message)


def debug(message: str) -> None:
    """A detail line on stderr, from the primary rank, when MEDTL_LOG_LEVEL=debug."""
    _logger.debug(message)


def warning(message: str) -> None:
    """A `medtl: warning:` line on stderr, from the primary rank only."""
    _logger.warning(message)


def error(message: str) -> None:
    """An error line on stderr, from any rank."""
    _logger.error(message)


class _RunFolderHandler(logging.Handler):
    """Appends the primary rank's lines to FOLDER/medtl.log once FOLDER exists.

    Lines logged before the trainer creates the folder wait in memory, so a run that
    fails its checks early (e.g. a run folder inside the records) creates nothing.
    """

    def __init__(self, folder: str):
        super().__init__()
        self.path = os.path.join(folder, RUN_LOG_FILE)
        self.pending: list[str] = []
        self.file = None
        self.addFilter(_RankFilter())
        self.setFormatter(_Formatter(timestamped=True))

    def emit(self, record: logging.LogRecord) -> None:
        if not _state["primary"]:  # other ranks' errors go to their stderr only
            self.pending.clear()
            return
        try:
            self.pending.append(self.format(record) + "\n")
            if self.file is None and os.path.isdir(os.path.dirname(self.path)):
                self.file = open(self.path, "a", encoding="utf-8")
            if self.file is not None:
                self.file.writelines(self.pending)
                self.file.flush()
                self.pending.clear()
        except Exception:
            self.handleError(record)

    def close(self) -> None:
        if self.file is not None:
            self.file.close()
            self.file = None
        super().close()


@contextlib.contextmanager
def copy_to_run_folder(folder: str):
    """Within the block, also append medtl's log lines to FOLDER/medtl.log (primary rank only),
    ending with the error that stopped the block, if any."""
    handler = _RunFolderHandler(folder)
    _logger.addHandler(handler)
    try:
        yield handler.path
    except BaseException as exc:
        if isinstance(exc, KeyboardInterrupt):
            message = "interrupted"
        elif isinstance(exc, MedtlError):
            message = str(exc)
        else:
            message = f"{type(exc).__name__}: {exc}"
        # Into the file only: the caller (e.g. the CLI) prints the error on stderr itself.
        handler.handle(_logger.makeRecord(LOGGER_NAME, logging.ERROR, __file__, 0, message, None, None))
        raise
    finally:
        _logger.removeHandler(handler)
        handler.close()
