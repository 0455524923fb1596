"""The one exception type that means "the user asked for something we cannot do".

The CLI turns it into a single line on stderr and exit status 2; library users
catch it like any ValueError.
"""


class UserError(ValueError):
    """Bad input: the message names what was wrong and what is accepted."""
