"""Runs first in every worker process of a run's Ray job (its setup hook): quiets Ray Train's
placement-group cleaner, whose messages say nothing to the user of a run that ends normally.

Imports nothing heavy: torch read here would fix each worker's thread count before Ray sets
OMP_NUM_THREADS for it, and Ray Data's actors would pay for torch and DeepSpeed they never use.
"""

import logging


CALLBACK = "ray.train.v2._internal.callbacks.placement_group_callback"


def quiet_cleaner_shutdown() -> None:
    """When a run ends, the controller asks the cleaner to stop and waits a few seconds; a cleaner
    still inside a State API call (on a busy head) misses that, and the controller logs a timeout
    with its traceback as an error. The cleaner then finds the controller gone and frees the
    placement group, its job anyway."""
    logging.getLogger(CALLBACK).addFilter(_not_the_stop_timeout)


def _not_the_stop_timeout(record: logging.LogRecord) -> bool:
    return not record.getMessage().startswith("Failed to stop PlacementGroupCleaner gracefully")


def quiet_placement_group_cleaner() -> None:
    """For an embedded Ray without a dashboard, also this: Ray Train's placement-group cleaner asks the State API (which the dashboard serves) every
    second whether the run's controller still lives, and warns each time it cannot; finding no
    answer it may exit before the controller registers the workers' placement group, which then
    warns in eight lines. Its job, freeing a dead controller's CPUs, matters in a Ray that outlives
    the run (a sweep starts the dashboard); an embedded one ends with the run."""
    quiet_cleaner_shutdown()
    for logger in ("ray.train.v2._internal.execution.controller.placement_group_cleaner", CALLBACK):
        # A filter, not a level: Ray Train's logging set-up (dictConfig) resets the levels of ray.train's loggers.
        logging.getLogger(logger).addFilter(_errors_only)


def _errors_only(record: logging.LogRecord) -> bool:
    return record.levelno >= logging.ERROR
