"""The one exception type that reaches users as a message instead of a traceback."""


class HyBNNError(Exception):
    """A problem the user can fix.

    The message names what is wrong and what to do about it. The CLI prints it
    as one paragraph and exits with status 2; it never shows a traceback.
    """
