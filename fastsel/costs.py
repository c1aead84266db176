"""What selection costs, counted in samples: forwarded for scoring only, and forwarded
and backpropagated for training (docs/methods.md section 4: steps alone hide scoring).
Kept by ``ScoreSampler`` and ``BatchSelector`` alike."""

from __future__ import annotations

from typing import Any, Callable

from fastsel import _state

__all__ = ["Costs", "ScorerCosts"]


class Costs:
    """Samples forwarded for scoring only, and samples forwarded and backpropagated for
    training (docs/methods.md section 4: steps alone hide scoring)."""

    FIELDS: tuple[str, ...] = ("scored", "trained", "steps")

    def __init__(self):
        for f in self.FIELDS:
            setattr(self, f, 0)

    def as_dict(self) -> dict:
        return {f: getattr(self, f) for f in self.FIELDS}

    def load(self, d: dict) -> None:
        """Loads an ``as_dict()``, checked whole first: on error nothing has changed."""
        self._prepare_load(d, "state")()

    state_dict, load_state_dict = as_dict, load

    def _prepare_load(self, state: Any, path: str) -> Callable[[], None]:
        keys = self.FIELDS
        _state.require_keys(path, state, keys)
        values = [_state.check_int(_state.key(path, k), state[k], 0) for k in keys]

        def load() -> None:
            for k, v in zip(keys, values):
                setattr(self, k, v)
        return load

    def __repr__(self) -> str:
        return f"{type(self).__name__}(" + ", ".join(f"{f}={getattr(self, f)}" for f in self.FIELDS) + ")"


class ScorerCosts(Costs):
    """``Costs`` of a ``BatchSelector`` whose scorer learns online (has ``observe``):
    ``scorer_trained`` also counts the samples the scorer took optimizer steps on (forward
    and backward through the scorer, not the model), so that a proxy's training is part
    of the bill. ``scored`` counts the samples forwarded through the scorer."""

    FIELDS = Costs.FIELDS + ("scorer_trained",)
