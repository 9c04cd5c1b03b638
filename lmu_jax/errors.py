"""User-facing errors: one clear line, exit code 2, no traceback.

Everything a user can get wrong (a config value, a CLI argument, a corpus, a sweep spec) raises
``UserError``. The CLI catches it, prints ``error: <message>`` on one line and exits with code 2.
Internal bugs stay ordinary exceptions with tracebacks.
"""

from __future__ import annotations

EXIT_USER_ERROR = 2


class UserError(Exception):
    """A problem with the user's input. ``str(err)`` is one line naming field, value and what is allowed."""

    def __init__(self, message: str):
        super().__init__(" ".join(str(message).split()))  # always one line


def bad_value(field: str, value, allowed: str) -> UserError:
    """The standard message: ``<field>=<value!r> is invalid: <allowed>``."""
    return UserError(f"{field}={value!r} is invalid: {allowed}")
