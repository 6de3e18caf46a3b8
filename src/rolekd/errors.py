"""The one exception type for bad user input (config, files, names).

The CLI prints ``rolekd: error: <message>`` and exits with status 2 for it, without a traceback.
Messages are one line: what is wrong and how to fix it.
"""


class UserError(Exception):
    """Bad input from the user: printed as one line by the CLI, exit status 2."""
