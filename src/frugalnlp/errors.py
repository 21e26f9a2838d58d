"""The one exception the CLI turns into a one-line message and exit status 2."""


class FrugalError(Exception):
    """Bad input or an impossible request: the message names the problem and the fix."""
