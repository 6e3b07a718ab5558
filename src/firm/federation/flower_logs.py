"""What FIRM's Flower apps print through Flower's log, in Flower's own terms.

- A FIRM input error (a bad run-config value, a run directory outside the allowed root) ends
  the ServerApp like any exception, so Flower marks the run failed and the ServerApp process
  exits non-zero; but Flower logs every app exception with its traceback, and for an input
  error the one line that names the setting is all there is to say (``OneLineFirmErrors``).
- Flower logs the whole train ConfigRecord when a strategy starts: every FIRM setting, more than
  a thousand characters. The run directory's config.json holds them; the log says where
  (``ShortConfigRecord``).
- Notices about choices FIRM makes for the user (no federated evaluation: `firm eval` evaluates)
  are dropped (``SilencedNotices``).
- Library FutureWarnings (transformers, peft, Ray, torch) in the app processes are about those
  libraries' next versions, not about the run (``quiet_library_warnings``).
"""

from __future__ import annotations

import logging
import warnings
from contextlib import contextmanager
from typing import Iterator

from flwr.common.logger import FLOWER_LOGGER

from firm.errors import FirmError

# Flower's own notices about choices FIRM makes for the user.
SILENCED_FLOWER_NOTICES = ("`run_simulation` function is deprecated", "Federated evaluation will be skipped")
CONFIG_RECORD_LOG_PREFIX = "\t├── ConfigRecord (train)"
LIBRARY_MODULES = r"(transformers|peft|ray|torch|huggingface_hub)(\.|$)"


class OneLineFirmErrors(logging.Filter):
    """A log record that carries a FirmError (Flower's "ServerApp raised an exception") becomes
    one line with the error's message, without the traceback."""

    def filter(self, record: logging.LogRecord) -> bool:
        error = record.exc_info[1] if record.exc_info else None
        if isinstance(error, FirmError):
            record.msg, record.args = "FIRM: %s", (" ".join(str(error).split()),)
            record.exc_info, record.exc_text = None, None
        return True


class ShortConfigRecord(logging.Filter):
    """Flower's dump of the train ConfigRecord becomes a count of settings and where they are."""

    def __init__(self, count: int, where: str):
        super().__init__()
        self.summary = f"{count} FIRM settings, as in {where}"

    def filter(self, record: logging.LogRecord) -> bool:
        if isinstance(record.msg, str) and record.msg.startswith(CONFIG_RECORD_LOG_PREFIX):
            record.args = (self.summary,)
        return True


class SilencedNotices(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        message = record.getMessage()
        return not any(notice in message for notice in SILENCED_FLOWER_NOTICES)


def install_app_filters() -> None:
    """Once per process that loads the FIRM apps: one-line input errors, no silenced notices."""
    for cls in (OneLineFirmErrors, SilencedNotices):
        if not any(isinstance(f, cls) for f in FLOWER_LOGGER.filters):
            FLOWER_LOGGER.addFilter(cls())


@contextmanager
def short_config_record(count: int, where: str) -> Iterator[None]:
    """While a strategy starts and runs: Flower's ConfigRecord dump is one short line."""
    log_filter = ShortConfigRecord(count, where)
    FLOWER_LOGGER.addFilter(log_filter)
    try:
        yield
    finally:
        FLOWER_LOGGER.removeFilter(log_filter)


def quiet_library_warnings() -> None:
    """Hide the libraries' FutureWarnings in an app process (Flower's runtimes start the apps in
    processes of their own, where `firm`'s CLI filters do not apply)."""
    warnings.filterwarnings("ignore", category=FutureWarning, module=LIBRARY_MODULES)
