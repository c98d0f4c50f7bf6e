"""Garbage collection at step boundaries (trainer/step_gc.py): only every N steps while training,
Python's usual collector before and after, and in processes forked during training."""

import gc
import os
import weakref

from trainer.step_gc import StepCollector


class Node:
    pass


def _cyclic_garbage() -> weakref.ref:
    """An unreachable reference cycle, which only the garbage collector frees; a weak reference to it."""
    a, b = Node(), Node()
    a.other, b.other = b, a
    return weakref.ref(a)


def test_cycles_are_freed_only_at_every_nth_step_and_the_collector_is_restored_after():
    collector = StepCollector(3)
    collector.start()
    try:
        assert not gc.isenabled() and gc.get_freeze_count() > 0  # setup's objects are frozen
        freed_after = {}
        for step in range(1, 7):
            garbage = _cyclic_garbage()
            for _ in range(10_000):  # allocations that would trigger Python's automatic collection
                Node()
                [Node()]
            collector.after_step(step)
            freed_after[step] = garbage() is None
        assert freed_after == {1: False, 2: False, 3: True, 4: False, 5: False, 6: True}
    finally:
        collector.stop()
    assert gc.isenabled() and gc.get_freeze_count() == 0


def test_every_zero_leaves_pythons_collector_alone():
    collector = StepCollector(0)
    collector.start()
    try:
        assert gc.isenabled() and gc.get_freeze_count() == 0
    finally:
        collector.stop()
    assert gc.isenabled()


def test_a_process_forked_during_training_collects_as_usual():
    collector = StepCollector(5)
    collector.start()
    try:
        pid = os.fork()
        if pid == 0:  # the child: a DataLoader worker, say
            os._exit(0 if gc.isenabled() else 1)
        _, status = os.waitpid(pid, 0)
        assert os.waitstatus_to_exitcode(status) == 0
        assert not gc.isenabled()  # the parent still collects only at step boundaries
    finally:
        collector.stop()
