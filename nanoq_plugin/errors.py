"""The one exception type for bad user input: the CLI prints its message on one line and exits 2."""


class NanoqError(Exception):
    """A user-facing error: bad input file, bad recipe, unsupported model. The message names the file and tensor."""
