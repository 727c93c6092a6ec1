"""The project's user-facing error type: bad params, data, models or paths.

Stages catch `UserError` (and only it) and print its one-line message; anything else is a bug
and keeps its traceback.
"""


class UserError(Exception):
    """A problem the user can fix; the message names the file/key and the fix, on one line."""
