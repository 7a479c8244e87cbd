"""The error a process stops on with a message instead of a traceback."""


class FatalError(RuntimeError):
    """A condition a command cannot continue through (a corrupt state file, a refused registration,
    a global model of the wrong shape...). The CLI prints the message and exits with status 2."""
