"""User-facing errors.

A `UserError` is bad input the user can fix (a missing file, a bad ratio, a malformed manifest line).
The CLI prints its message as one sentence on stderr and exits with code 2, never a traceback.
Anything else that escapes is a bug and is allowed to raise.
"""


class UserError(Exception):
    """Bad input: the message names what is wrong, which file/value, and how to fix it."""

    exit_code = 2
