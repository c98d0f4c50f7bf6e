"""Errors that end a run for a reason the user must act on: the CLI prints the message, no traceback."""


class TrainingError(RuntimeError):
    pass


def one_line(error: BaseException) -> str:
    """`Type: first line of the message`, for a message that quotes an error it cannot show whole."""
    text = str(error).strip()
    return f"{type(error).__name__}: {text.splitlines()[0] if text else ''}"
