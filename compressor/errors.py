"""The one exception users see: a message that names the problem and the fix."""


class CompressorError(Exception):
    """Bad input or environment. The CLI prints the message on one line and exits with code 2."""
