"""Turning down, for a moment, loggers of Ray that tell elmforge's user nothing (their errors still show)."""

import contextlib
import logging


@contextlib.contextmanager
def errors_only(*logger_names: str):
    loggers = [logging.getLogger(name) for name in logger_names]
    levels = [logger.level for logger in loggers]
    for logger in loggers:
        logger.setLevel(logging.ERROR)
    try:
        yield
    finally:
        for logger, level in zip(loggers, levels):
            logger.setLevel(level)
