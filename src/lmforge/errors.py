"""The one exception type for mistakes a user can fix (bad option, missing file, bad data).

The CLI turns it into a single line on stderr and exit status 2; library callers can catch it.
"""


class UserError(ValueError):
    """A problem in the user's input, with a message that names the value and the fix."""
