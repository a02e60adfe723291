"""Per-request recurrent-state slots of a hybrid model (pure Python).

A hybrid model (SSM or linear-attention layers beside attention) keeps, per request, a fixed-size
state per such layer (conv windows, SSM / delta-rule states) that cannot be paged: it is
overwritten every step. The engine's state pools hold `num_slots` of them; a request takes one
slot when it is admitted and gives it back when it finishes, is aborted or is preempted. The
scheduler admits a request only when a slot is free, so a full pool means waiting.
"""

from __future__ import annotations


class StateSlots:
    """Slot ids 0..num_slots-1 handed to requests (0, 1, ... at first; then the most recently freed)."""

    def __init__(self, num_slots: int) -> None:
        if num_slots < 1:
            raise ValueError(f"a hybrid model needs at least one state slot, got {num_slots}")
        self.num_slots = num_slots
        self._free = list(range(num_slots - 1, -1, -1))  # a stack: pop() gives 0 first
        self._held: dict[str, int] = {}

    @property
    def num_free(self) -> int:
        return len(self._free)

    def slot_of(self, request_id: str) -> int | None:
        return self._held.get(request_id)

    def allocate(self, request_id: str) -> int:
        """The request's slot (a new one if it holds none); ValueError if none is free."""
        if request_id in self._held:
            return self._held[request_id]
        if not self._free:
            raise ValueError("no free state slot: check num_free before admitting")
        slot = self._held[request_id] = self._free.pop()
        return slot

    def free(self, request_id: str) -> None:
        """Give the request's slot back (no-op if it holds none)."""
        slot = self._held.pop(request_id, None)
        if slot is not None:
            self._free.append(slot)
