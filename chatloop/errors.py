"""The one exception type for bad input from a user."""


class UserError(Exception):
    """Bad input (a file, a field, a checkpoint, a flag): the CLI prints it as one line and exits with 2.

    The message names the thing (file and line, field, flag) and what was expected.
    """
