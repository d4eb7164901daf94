"""The one exception type users see: a one-line message naming the problem and the fix."""


class BsdistError(Exception):
    """A mistake in the user's input or environment, reported without a traceback."""

    exit_code = 2


class Stopped(BsdistError):
    """Training stopped on a signal at a safe point, after saving a checkpoint; exits 128 + signal."""

    def __init__(self, message: str, signum: int):
        super().__init__(message)
        self.exit_code = 128 + signum
