"""Every error a user can cause, and how each one ends the process.

Bad input is found before anything is written and ends with one line on stderr and exit code 2. The
data and model layers raise their own (`DataError`, `ModelError`); the harness adds its own here.
"""
from __future__ import annotations

import re

from models import ModelError
from pipelines import DataError


class ConfigError(Exception):
    """Flags or settings that cannot be honoured; the message is one line."""


class CheckpointError(Exception):
    """A checkpoint that cannot be read or does not fit what it is used for; the message is one line."""


USER_ERRORS = (ConfigError, CheckpointError, DataError, ModelError)

# Exit codes, the same for every command (interruptions: bench.signals).
EXIT_OK, EXIT_FAILED, EXIT_USAGE = 0, 1, 2


def first_line(error: BaseException, limit: int | None = None) -> str:
    """The informative line of an exception's message, for a row's `error` field or a one-line report.

    torch's weights-only refusal is a page long with its reason after `WeightsUnpickler error:`, and
    some torch messages carry ANSI bold."""
    text = re.sub(r"\x1b\[[0-9;]*m", "", str(error))
    if "WeightsUnpickler error:" in text:
        text = text.split("WeightsUnpickler error:", 1)[1].split(". ")[0]
    lines = [line.strip() for line in text.splitlines() if line.strip()]
    text = lines[0] if lines else type(error).__name__
    return text if limit is None or len(text) <= limit else text[:limit - 3] + "..."
