"""The one base class for errors a user can cause and fix.

The CLI prints such an error as one clear message and exits non-zero; anything else is a bug
and keeps its traceback. Each part raises a subclass (ConfigError, StorageError, ...).
"""

from __future__ import annotations


class PipeloraError(Exception):
    """A problem the user can fix; `str(exc)` says what, where and how."""

    exit_code: int = 1
