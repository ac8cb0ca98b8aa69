"""One exception type for every user-facing failure.

The CLI turns an ``ActTailError`` into one line on stderr and a non-zero exit; anything else is a bug
and keeps its traceback.
"""


class ActTailError(Exception):
    """A problem with the user's input (path, file, plan, option), stated in one line."""
