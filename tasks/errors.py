"""The one error type a stage raises for bad user input.

The CLI turns it into a one-line message and exit code 2, before anything is written,
so a typo in params.yaml never costs a half-built output.
"""


class UserError(Exception):
    """Bad input from the user (params, paths, data); the message names the field and value."""
