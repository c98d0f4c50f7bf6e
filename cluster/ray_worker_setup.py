"""Runs first in every worker process of an embedded Ray without a dashboard (its setup hook).

Imports nothing heavy: torch read here would fix each worker's thread count before Ray sets
OMP_NUM_THREADS for it, and Ray Data's actors would pay for torch and DeepSpeed they never use.
"""

import logging


def quiet_placement_group_cleaner() -> None:
    """Ray Train's placement-group cleaner asks the State API (which the dashboard serves) every
    second whether the run's controller still lives, and warns each time it cannot; finding no
    answer it may exit before the controller registers the workers' placement group, which then
    warns in eight lines. Its job, freeing a dead controller's CPUs, matters in a Ray that outlives
    the run (a sweep starts the dashboard); an embedded one ends with the run."""
    for module in ("execution.controller.placement_group_cleaner", "callbacks.placement_group_callback"):
        # A filter, not a level: Ray Train's logging set-up (dictConfig) resets the levels of ray.train's loggers.
        logging.getLogger(f"ray.train.v2._internal.{module}").addFilter(_errors_only)


def _errors_only(record: logging.LogRecord) -> bool:
    return record.levelno >= logging.ERROR
