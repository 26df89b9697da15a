"""Errors a user can fix. The CLI prints them as one line and exits with status 2."""

import contextlib


class UserError(Exception):
    """Bad input: a wrong option, a missing file, an edit for another model. The message is one line."""


def shown(value, limit: int = 40) -> str:
    """A value as an error message quotes it: its repr, cut short."""
    text = repr(value)
    return text if len(text) <= limit else text[: limit - 3] + "..."


def printable(text: str, limit: int = 400) -> str:
    """Text from files or users made safe for a terminal line: control and format characters
    (escape sequences, newlines, bidi overrides) shown as escapes, and cut to `limit` characters."""
    import unicodedata

    safe = "".join(c if not unicodedata.category(c).startswith("C") else ascii(c)[1:-1] for c in text)
    return safe if len(safe) <= limit else safe[: limit - 3] + "..."


@contextlib.contextmanager
def reading_text(path):
    """A block that reads the UTF-8 text file `path`: its OS and decoding errors become one-line UserErrors."""
    try:
        yield
    except OSError as error:
        raise UserError(f"cannot read {path}: {error.strerror or error}") from None
    except UnicodeDecodeError:
        raise UserError(f"{path} is not UTF-8 text") from None


def first_line(exc: BaseException) -> str:
    """The first line of an exception's message (or its type's name), for a one-line error."""
    text = str(exc).strip().splitlines()
    return text[0] if text else type(exc).__name__
