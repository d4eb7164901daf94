"""The one exception type users see: a one-line message naming the problem and the fix."""


class BsdistError(Exception):
    """A mistake in the user's input or environment, reported without a traceback."""

    exit_code = 2
    every_rank_reports = False  # True where rank 0 itself may be the process that failed

    def __init__(self, message: str, *args):
        message = str(message)
        if message.startswith(f"Caught {type(self).__name__} in DataLoader worker"):
            # a DataLoader re-raises a worker's error with the worker's traceback as its message: keep ours
            message = message.rsplit(f"{type(self).__name__}: ", 1)[-1]
        # one line, whatever a quoted exception brought along (a corrupt file's bytes can hold newlines)
        super().__init__(" ".join(message.splitlines()), *args)


class PeerFailure(BsdistError):
    """A collective failed or timed out: another process died or stopped answering."""

    every_rank_reports = True


class Stopped(BsdistError):
    """Training stopped on a signal at a safe point, after saving a checkpoint; exits 128 + signal."""

    def __init__(self, message: str, signum: int):
        super().__init__(message)
        self.signum = signum
        self.exit_code = 128 + signum
