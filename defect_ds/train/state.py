"""The loop's counters in one object: what a resume needs besides the engine's state and the RNG.

    python -c "from defect_ds.train.state import TrainState; s = TrainState(step=3); print(s.state_dict())"

A checkpoint stores `state_dict()` among its client state; `load_state_dict` reads it back. Adding a
counter is adding a field here.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass, fields
from typing import Any


@dataclass
class TrainState:
    step: int = 0  # optimizer steps done
    micro_step: int = 0  # micro batches done on this rank; each one's seed comes from it
    epoch: int = 0  # the data epoch being read
    batch_in_epoch: int = 0  # micro batches of `epoch` done on this rank
    samples_replaced: int = 0  # this rank's bad samples replaced by good ones of their batch, over the run
    samples_padded: int = 0  # this rank's samples repeated to make up for unreadable shards, over the run

    def state_dict(self) -> dict[str, int]:
        return asdict(self)

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Reads the counters from a checkpoint's client state (other keys there are ignored)."""
        # checkpoints written before TrainState hold the two data counts as data_counts, or not at all
        replaced, padded = state.get("data_counts", (0, 0))
        state = {"samples_replaced": replaced, "samples_padded": padded, **state}
        for field in fields(self):
            setattr(self, field.name, int(state[field.name]))
