"""User-facing errors: one line that names the file or value and says how to fix it."""


class VisionFTError(Exception):
    """A mistake in the user's input. The CLI prints it as one line, without a traceback."""
