"""Who holds what in the engine: the sequence in each batch row, the KV-cache blocks each row has (through
the ``BlockTable``), and the preempted sequences waiting to come back.

The memory rules stated in ``engine/kv_cache.py`` are applied here, as host bookkeeping only: a prompt
is admitted when a row is free, no preempted sequence waits, and the free blocks cover its prompt plus
one token with a block to spare per running row; a row about to decode takes the block its next
position needs, and when none is free the newest growing sequence is preempted (its row and blocks
freed, queued to be prefilled again, oldest first, once its in-flight tokens have been read back). The
engine does the device side of each change (parking rows, the sampler's state, clearing blocks).
"""

from __future__ import annotations

from quantdeploy.engine.kv_cache import BlockTable, blocks_for
from quantdeploy.engine.sequence import Sequence


class Slots:
    def __init__(self, max_batch: int, table: BlockTable) -> None:
        self.rows: list[Sequence | None] = [None] * max_batch
        self.table = table
        self.preempted: list[Sequence] = []  # by arrival (sequence id), oldest first

    @property
    def free_rows(self) -> int:
        return sum(s is None for s in self.rows)

    @property
    def running(self) -> list[Sequence]:
        """The sequences in progress: in a row, or preempted and waiting to resume."""
        return [s for s in self.rows if s is not None] + [s for s in self.preempted if not s.finished]

    @property
    def usage(self) -> float:
        """The fraction of the pool's blocks that rows hold."""
        return self.table.used_blocks / (self.table.n_blocks - 1)

    def holds(self, seq: Sequence) -> bool:
        return 0 <= seq.row < len(self.rows) and self.rows[seq.row] is seq

    def fits(self, tokens: int) -> bool:
        """Whether a new sequence of ``tokens`` positions fits, leaving a block per running row."""
        return self.table.free_blocks >= blocks_for(tokens) + (len(self.rows) - self.free_rows)

    def can_admit(self, n_prompt: int) -> bool:
        return not self.preempted and self.free_rows > 0 and self.fits(n_prompt + 1)

    def place(self, seq: Sequence) -> None:
        """Give ``seq`` the lowest free row and the blocks of its context plus one token (``fits`` said so)."""
        seq.row = self.rows.index(None)
        self.rows[seq.row] = seq
        self.table.grow(seq.row, seq.context_len + 1)

    def next_to_resume(self) -> Sequence | None:
        """The oldest preempted sequence, taken off the queue, if its tokens are all read back and it fits."""
        self.preempted = [s for s in self.preempted if not s.finished]
        if not self.preempted:
            return None
        seq = self.preempted[0]
        if seq.received < seq.launched or not self.free_rows or not self.fits(seq.context_len + 1):
            return None
        return self.preempted.pop(0)

    def grow(self, launch: list[tuple[int, Sequence]]) -> tuple[list[tuple[int, Sequence]], list[tuple[int, Sequence]]]:
        """Give every row about to decode the block its next position needs, preempting the newest growing
        sequence (possibly the one asking) while none is free. Returns (rows still to launch, rows preempted)."""
        growing = {seq.id: (row, seq) for row, seq in launch}
        preempted = []
        for row, seq in launch:
            while seq.id in growing and not self.table.grow(row, seq.feed_position + 1):
                victim = growing.pop(max(growing))
                self.release(victim[1])
                self.preempted.append(victim[1])
                preempted.append(victim)
        self.preempted.sort(key=lambda s: s.id)
        return list(growing.values()), preempted

    def release(self, seq: Sequence) -> list[int]:
        """Free ``seq``'s row and blocks (it must hold its row); returns the blocks."""
        self.rows[seq.row] = None
        return self.table.release(seq.row)

    def forget(self, seq: Sequence) -> None:
        """Drop ``seq`` from the preempted queue (aborted while waiting)."""
        if seq in self.preempted:
            self.preempted.remove(seq)
