"""Runs first in every worker process of a run's Ray job (its setup hook): quiets routine
messages of Ray Train (its controller, placement-group cleaner and report logging), which say
nothing to the user of a run that goes normally.

Imports nothing heavy: torch read here would fix each worker's thread count before Ray sets
OMP_NUM_THREADS for it, and Ray Data's actors would pay for torch and DeepSpeed they never use.
"""

import logging
import os

CALLBACK = "ray.train.v2._internal.callbacks.placement_group_callback"
ELASTIC = "ray.train.v2._internal.execution.scaling_policy.elastic"
# Messages of Ray Train's controller that say nothing to the user of a run, by logger:
ROUTINE = {
    # When a run ends, the controller asks the placement-group cleaner to stop and waits a few
    # seconds; a cleaner still inside a State API call (on a busy head) misses that, and the
    # controller logs the timeout with its traceback as an error. The cleaner then finds the
    # controller gone and frees the placement group, its job anyway.
    CALLBACK: "Failed to stop PlacementGroupCleaner gracefully",
    # An elastic group's resize check, every minute of the run (a resize itself is still shown).
    ELASTIC: "Did not detect any changes in the cluster resources",
}


def report_logger() -> str:
    """The logger of a worker's `ray.train.report`, which logs every result it reports (each rank, at
    every validation) and is named by its module's file path."""
    import ray  # loaded already in any Ray worker

    return os.path.join(os.path.dirname(ray.__file__), "train", "v2", "_internal", "execution", "context.py")


def quiet_train_controller() -> None:
    """Every run's hook (a cluster's, or an embedded Ray with a dashboard)."""
    routine = {**ROUTINE, report_logger(): "Reporting training result"}  # our progress lines say it already
    for logger, message in routine.items():
        logging.getLogger(logger).addFilter(lambda record, m=message: not record.getMessage().startswith(m))


def quiet_placement_group_cleaner() -> None:
    """An embedded Ray without a dashboard's hook; besides the above: Ray Train's placement-group
    cleaner asks the State API (which the dashboard serves) every second whether the run's
    controller still lives, and warns each time it cannot; finding no
    answer it may exit before the controller registers the workers' placement group, which then
    warns in eight lines. Its job, freeing a dead controller's CPUs, matters in a Ray that outlives
    the run (a sweep starts the dashboard); an embedded one ends with the run."""
    quiet_train_controller()
    for logger in ("ray.train.v2._internal.execution.controller.placement_group_cleaner", CALLBACK):
        # A filter, not a level: Ray Train's logging set-up (dictConfig) resets the levels of ray.train's loggers.
        logging.getLogger(logger).addFilter(_errors_only)


def _errors_only(record: logging.LogRecord) -> bool:
    return record.levelno >= logging.ERROR
