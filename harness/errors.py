"""The one exception type for user mistakes (bad recipe, missing data, bad parameters).

The CLI prints a HarnessError as one line and exits with status 2; anything else is a bug and shows a traceback.
"""


class HarnessError(Exception):
    """A problem the user can fix; the message says what is wrong and how to fix it."""
