"""minirlhf: the complete RLHF pipeline that runs, and reads, on one small machine."""

__version__ = "0.1.0"


class UserError(Exception):
    """A problem the user can fix (bad input, missing file, bad config value).

    The CLI prints it as one line and exits with code 2; it never shows a traceback.
    """
