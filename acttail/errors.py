"""One exception type for every user-facing failure, and one warning type for what the user should know.

The CLI turns an ``ActTailError`` into one line on stderr and a non-zero exit, and an ``ActTailWarning``
into one ``acttail: warning: ...`` line; anything else is a bug and keeps its traceback.
"""


class ActTailError(Exception):
    """A problem with the user's input (path, file, plan, option), stated in one line."""


class ActTailWarning(UserWarning):
    """Something the result depends on that the user did not ask for (a fallback, a loss), in one line."""
