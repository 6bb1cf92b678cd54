"""The one error type users see: a one-line message, a non-zero exit, no traceback."""


class PacerayError(Exception):
    """A problem the user can fix. `str(e)` is one line naming the file, field or path."""

    exit_code = 2


def one_line(text: str) -> str:
    return " ".join(str(text).split())
