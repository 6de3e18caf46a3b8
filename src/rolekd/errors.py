"""The one exception type for bad user input (config, files, names).

The CLI prints ``rolekd: error: <message>`` and exits with status 2 for it, without a traceback.
Messages are one line: what is wrong and how to fix it.
"""

import re


class UserError(Exception):
    """Bad input from the user: printed as one line by the CLI, exit status 2."""


class RunFailed(RuntimeError):
    """A run stopped by something other than bad input or divergence (a worker process that died, a
    stage's unexpected error): printed as one line by the CLI, exit status 1; a rerun resumes."""


class OutOfMemory(RunFailed):
    """The device ran out of memory (CUDA out of memory): one line saying what to lower; exit status 1; a
    rerun resumes from the last checkpoint."""


def out_of_memory(e: BaseException, where: str, lower: list[str]) -> OutOfMemory:
    """An :class:`OutOfMemory` for torch's out-of-memory error ``e`` in ``where``, naming the settings to lower."""
    text = " ".join(str(e).split())
    tried = next(iter(re.findall(r"Tried to allocate [0-9.]+ [KMGT]?i?B", text)), "")
    return OutOfMemory(f"out of memory in {where}{f' ({tried})' if tried else ''}: lower {' or '.join(lower)}; "
                       f"then rerun the same command to resume")
