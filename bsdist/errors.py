"""The one exception type users see: a one-line message naming the problem and the fix."""


class BsdistError(Exception):
    """A mistake in the user's input or environment, reported without a traceback."""
