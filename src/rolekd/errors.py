"""The one exception type for bad user input (config, files, names).

The CLI prints ``rolekd: error: <message>`` and exits with status 2 for it, without a traceback.
Messages are one line: what is wrong and how to fix it.
"""


class UserError(Exception):
    """Bad input from the user: printed as one line by the CLI, exit status 2."""


class RunFailed(RuntimeError):
    """A run stopped by something other than bad input or divergence (a worker process that died, a
    stage's unexpected error): printed as one line by the CLI, exit status 1; a rerun resumes."""
