"""The log of skipped steps: every step that ``FP16Optimizer`` skips for inf/nan grads is
reported, in DeepSpeed's words (the loss scale attempted and the new one), without a host sync.
"""

from __future__ import annotations

import logging
from collections import deque

import torch

logger = logging.getLogger(__name__)

__all__ = ["SkipLog"]

_SLOTS = 8  # CUDA: skip records in flight before one is dropped (its count is kept)


class SkipLog:
    """Logs every skipped step without a host sync.

    ``record`` (fp32, on the device) holds [steps skipped so far, skipped now, scale attempted,
    hysteresis before, scale after, hysteresis after]: ``FP16Optimizer`` counts into the first
    two (``total``, ``now``) and the loss scaler's update writes the rest (``scales``), so keeping
    the record costs no extra op. On CUDA an asynchronous copy takes it to a ring of pinned
    slots, each with an event, and it is read once its event has completed (at a later ``poll``:
    a step or two late); on the CPU it is read at once. Counts come from the running total, so
    they add up even for records that could not be read (a host more than ``_SLOTS`` steps ahead
    of the device, steps in CUDA graph capture): those steps are reported together at the next
    record read, without their scales.
    """

    def __init__(self, device: torch.device, dynamic: bool, reported: int = 0, last_step: int = 0):
        self.device = device
        self.dynamic = dynamic
        self.reported = reported  # the running total at the last record read
        self.last_step = last_step  # the step of that record
        self.record = torch.zeros(6, dtype=torch.float32, device=device)
        self.total, self.now, self.scales = self.record[0], self.record[1], self.record[2:]
        self._cuda = device.type == "cuda"
        if self._cuda:
            self._host = torch.zeros(_SLOTS, 6, dtype=torch.float32, pin_memory=True)
            self._events = [torch.cuda.Event() for _ in range(_SLOTS)]
        self._pending: deque[tuple[int, int]] = deque()  # (slot, step), oldest first
        self._next_slot = 0

    def after_update(self, step: int) -> None:
        """Take this step's record (filled by the step and the scale update) to the host."""
        if not self._cuda:
            record = self.record.tolist()
            if record[1] or record[0] != self.reported:
                self._report(step, record)
            else:
                self.last_step = step
            return
        if torch.cuda.is_current_stream_capturing():
            return  # an event recorded in capture cannot be queried; the total covers it
        if len(self._pending) == _SLOTS:  # the slot to write has not landed: read or drop it
            self.poll()
            if len(self._pending) == _SLOTS:
                self._pending.popleft()
        slot = self._next_slot
        self._next_slot = (slot + 1) % _SLOTS
        with torch.cuda.device(self.device):  # the event goes on the copy's stream
            self._host[slot].copy_(self.record, non_blocking=True)
            self._events[slot].record()
        self._pending.append((slot, step))

    def poll(self, wait: bool = False) -> None:
        """Log the records that have reached the host, oldest first; all of them (waiting for
        the device) if ``wait``."""
        while self._pending:
            slot, step = self._pending[0]
            if wait:
                self._events[slot].synchronize()
            elif not self._events[slot].query():
                return
            self._pending.popleft()
            self._report(step, self._host[slot].tolist())

    def _report(self, step: int, record: list[float]) -> None:
        total, now, attempted, hysteresis, new, hysteresis_after = record
        total, now = int(total), int(now)
        unread = total - now - self.reported
        if unread > 0:
            logger.warning(
                "OVERFLOW! skipped %d optimizer step(s) after step %d and before step %d (%d "
                "skipped in total); their loss scales were not read in time",
                unread,
                self.last_step,
                step,
                total - now,
            )
        if now:
            logger.warning(
                "OVERFLOW! skipped 1 optimizer step: step %d (%d skipped in total). %s",
                step,
                total,
                self._scales(attempted, new, int(hysteresis), int(hysteresis_after)),
            )
        self.reported, self.last_step = total, step

    def _scales(self, attempted: float, new: float, hysteresis: int, hysteresis_after: int):
        """DeepSpeed's words (``DynamicLossScaler.update_scale``) for what the update did."""
        if not self.dynamic:
            return f"Loss scale: {_number(attempted)} (static)"
        if new < attempted:
            return f"Attempted loss scale: {_number(attempted)}, reducing to {_number(new)}"
        if hysteresis_after < hysteresis:
            return (
                f"Attempted loss scale: {_number(attempted)}, but hysteresis is {hysteresis}. "
                f"Reducing hysteresis to {hysteresis_after}"
            )
        return f"Attempted loss scale: {_number(attempted)}, already at the minimum"


def _number(x: float) -> str:
    return str(int(x)) if x.is_integer() else f"{x:g}"
