"""The error every layer raises for input a user can fix (the bottom layer, so that any package can raise it)."""


class UserError(Exception):
    """Input a user can fix: the message names the file, key or limit and what to do. Scripts print it as one
    sentence and exit with code 2, without a traceback."""
