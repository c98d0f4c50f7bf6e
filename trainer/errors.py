"""Errors that end a run for a reason the user must act on: the CLI prints the message, no traceback."""


class TrainingError(RuntimeError):
    pass
