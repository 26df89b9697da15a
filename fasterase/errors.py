"""Errors a user can fix. The CLI prints them as one line and exits with status 2."""


class UserError(Exception):
    """Bad input: a wrong option, a missing file, an edit for another model. The message is one line."""
