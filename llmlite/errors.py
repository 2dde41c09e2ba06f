"""The one exception type for user mistakes: the CLI prints its message on one line, exit code 2."""


class LlmliteError(Exception):
    """A problem with the user's input, worded as what is wrong and how to fix it."""
