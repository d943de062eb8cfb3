"""User-facing errors.

Every problem caused by the user's input (a bad file, a bad option, a missing checkpoint) is raised as a
``UserError`` whose message names the file / line / field at fault. The CLI prints it as one line and exits 2;
library callers can catch it like any other exception.
"""


class UserError(Exception):
    """An error in user input, reported as a single clear line (no traceback)."""
