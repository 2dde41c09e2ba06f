"""The one exception type for user mistakes: the CLI prints its message on one line, exit code 2."""


class LlmliteError(Exception):
    """A problem with the user's input, worded as what is wrong and how to fix it."""


class Terminated(KeyboardInterrupt):
    """SIGTERM or SIGHUP (what ``timeout``, ``docker stop``, schedulers and closed terminals send),
    raised where Ctrl-C's KeyboardInterrupt would be, so that the same cleanup runs."""

    def __init__(self, signum: int) -> None:
        import signal

        super().__init__(signal.Signals(signum).name)
        self.signum = signum
