"""The one exception type the CLI turns into a one-line message and exit code 2."""


class UserError(Exception):
    """Bad input from the user: a path, an image, a CSV, a model file.

    The message must name the thing and the problem in one line; the CLI prints
    it without a traceback (unless --debug) and exits with code 2.
    """
