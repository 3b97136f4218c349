"""User-facing errors: one line that names the file or value and says how to fix it."""


class VisionFTError(Exception):
    """A mistake in the user's input. The CLI prints it as one line, without a traceback."""


class TrainingDiverged(VisionFTError):
    """The loss became NaN or infinite: a setting (usually the learning rate) is too aggressive.
    A hyperparameter search records such a trial as failed and goes on."""
