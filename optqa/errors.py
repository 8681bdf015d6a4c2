"""The one exception type the command line turns into a one-line error and a non-zero exit."""


class OptqaError(Exception):
    """A problem the user can fix (bad input, wrong checkpoint, missing file).

    The CLI prints ``error: <message>`` and exits with status 2; anything else is a bug and
    keeps its traceback.
    """
