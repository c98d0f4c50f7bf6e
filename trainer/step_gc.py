"""Python's garbage collector during training: at step boundaries, the same steps on every rank.

Left automatic, Python's full collections walk every object the process holds: in a Ray-free
training process of the tiny model on CPU (torch, DeepSpeed, the data stack) some 430,000 objects
and 0.27 s, about once every 100 steps, a step and a half lost. With several ranks each one
pauses at its own moment and the others wait for it at the next collective. So training
collects once (setup's garbage), freezes what is left (gc.freeze: never walked again), turns
automatic collection off, and collects every `train.gc_every` steps on every rank at once:
what remains to walk is what the steps themselves created, about a millisecond's work.
"""

import gc
import os

_active = False


def _collect_in_forked_children() -> None:
    # DataLoader workers fork from the training process mid-run; they collect as usual.
    if _active:
        gc.enable()


os.register_at_fork(after_in_child=_collect_in_forked_children)


class StepCollector:
    """start() before the loop, after_step(step) after each step, stop() when the loop ends (in a
    `finally`); every=0 leaves Python's automatic collection as it is."""

    def __init__(self, every: int):
        self.every = every

    def start(self) -> None:
        global _active
        if self.every:
            gc.collect()
            gc.freeze()
            self._was_enabled = gc.isenabled()
            gc.disable()
            _active = True

    def after_step(self, step: int) -> None:
        if self.every and step % self.every == 0:
            gc.collect()

    def stop(self) -> None:
        global _active
        if self.every:
            _active = False
            gc.unfreeze()  # a later run in this process (a sweep's next trial) starts from the usual state
            if self._was_enabled:
                gc.enable()
