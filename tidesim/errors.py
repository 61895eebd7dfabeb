"""One exception type for bad input: the CLI turns it into exit status 2 and one line."""


class InputError(Exception):
    """Bad input from the user (file, flag, format); the message is the one line shown."""
