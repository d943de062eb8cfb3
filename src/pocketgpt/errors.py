class UserError(Exception):
    """An error in the user's input, its message naming the file, line or field: the CLI prints it as one line."""
