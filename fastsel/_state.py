"""Checks of the states given to ``load_state_dict``. Every class checks the whole state
with these before it changes anything, so a failed load leaves the object as it was.

Each check takes the entry's key path from the state given (``state['table']['count']``)
and raises a ``TypeError`` for a value of the wrong type (a tensor's dtype included) or a
``ValueError`` otherwise, naming that path and the expected form.
"""

from __future__ import annotations

import math
import warnings
from typing import Any, Iterable, Optional, Sequence

import torch

__all__ = ["key", "require_keys", "check_int", "check_float", "check_bool", "check_tensor", "check_history",
           "FLOATS", "INTS"]

FLOATS = (torch.float32, torch.float64)
INTS = (torch.int64, torch.int32)


def key(path: str, name: Any) -> str:
    """The path of ``path[name]``."""
    return f"{path}[{name!r}]"


def require_keys(path: str, state: Any, keys: Iterable[str], *, tag: Optional[str] = None) -> dict:
    """``state`` is a dict with exactly ``keys`` (plus ``"strategy"`` holding ``tag``, the
    class name of the strategy that saved it, when given)."""
    if not isinstance(state, dict):
        raise TypeError(f"{path} must be a dict (a state_dict()), got {type(state).__name__}")
    keys = list(keys)
    if tag is not None:
        # The tag first: another strategy's state is reported as such, not by its keys.
        if "strategy" in state:
            saved = state["strategy"]
            if saved != tag:
                raise ValueError(f"{key(path, 'strategy')} must be {tag!r}, got {saved!r}: a state saved by "
                                 f"{saved} cannot be loaded into {tag}")
            keys = ["strategy", *keys]
        else:  # saved before states were tagged: its keys are all that can be checked
            warnings.warn(f"{path} carries no 'strategy' tag (saved by an earlier fastsel): loaded into {tag} "
                          "on the strength of its keys alone", UserWarning, stacklevel=3)
    for k in keys:
        if k not in state:
            raise ValueError(f"{path} is missing the key {k!r} (expected the keys {keys})")
    unknown = [k for k in state if k not in keys]
    if unknown:
        raise ValueError(f"{path} has unknown keys {unknown} (expected the keys {keys})")
    return state


def _scalar(value: Any) -> Any:
    """A 0-d tensor as a Python number (ints and floats may be saved as such)."""
    if isinstance(value, torch.Tensor) and value.dim() == 0 and value.dtype != torch.bool:
        return value.item()
    return value


def check_int(path: str, value: Any, low: Optional[int] = 0, high: Optional[int] = None, why: str = "") -> int:
    """An int (or 0-d integer tensor; not a bool) in [low, high]."""
    v = _scalar(value)
    if isinstance(v, bool) or not isinstance(v, int):
        raise TypeError(f"{path} must be an int, got {value!r:.80}")
    if (low is not None and v < low) or (high is not None and v > high):
        bounds = f">= {low}" if high is None else f"<= {high}" if low is None else f"in [{low}, {high}]"
        raise ValueError(f"{path} must be an int {bounds}{why}, got {v}")
    return v


def check_float(path: str, value: Any, *, low: Optional[float] = None, optional: bool = False) -> Optional[float]:
    """A finite number (int, float or 0-d float tensor; not a bool) >= ``low``, or None
    with ``optional``."""
    if optional and value is None:
        return None
    v = _scalar(value)
    if isinstance(v, bool) or not isinstance(v, (int, float)):
        raise TypeError(f"{path} must be a number{' or None' if optional else ''}, got {value!r:.80}")
    if not math.isfinite(v) or (low is not None and v < low):
        raise ValueError(f"{path} must be a finite number{f' >= {low}' if low is not None else ''}, got {v}")
    return float(v)


def check_bool(path: str, value: Any) -> bool:
    if not isinstance(value, bool):
        raise TypeError(f"{path} must be a bool, got {value!r:.80}")
    return value


def check_tensor(path: str, value: Any, shape: Sequence[Optional[int]], dtypes: Sequence[torch.dtype], *,
                 low: Optional[float] = None, high: Optional[float] = None, finite: bool = False) -> torch.Tensor:
    """A tensor of exactly ``shape`` (None: any size in that dimension; no broadcasting),
    one of ``dtypes``, with values in [low, high) and, with ``finite``, finite."""
    shape = tuple(shape)
    form = "(" + ", ".join("N" if s is None else str(s) for s in shape) + ("," if len(shape) == 1 else "") + ")"
    names = " or ".join(str(d).replace("torch.", "") for d in dtypes)
    if not isinstance(value, torch.Tensor):
        raise TypeError(f"{path} must be a tensor of shape {form} and dtype {names}, got {type(value).__name__}")
    got = tuple(value.shape)
    if len(got) != len(shape) or any(s is not None and s != g for s, g in zip(shape, got)):
        raise ValueError(f"{path} must be a tensor of shape {form}, got shape {got}")
    if value.dtype not in dtypes:
        raise TypeError(f"{path} must be a tensor of dtype {names}, got {value.dtype}")
    if value.layout != torch.strided or value.device.type == "meta":
        raise TypeError(f"{path} must be a dense tensor holding values, got a {value.layout} tensor on "
                        f"{value.device}")
    value = value.detach()
    if value.numel():
        if finite:
            flat = value.reshape(-1)
            bad = (~torch.isfinite(flat)).nonzero()
            if bad.numel():
                i = int(bad[0, 0])
                raise ValueError(f"{path} must be finite, got {flat[i].item()} at index {i}")
        if low is not None or high is not None:
            lo, hi = (v.item() for v in torch.aminmax(value))
            if (low is not None and not lo >= low) or (high is not None and not hi < high):  # NaN fails
                bounds = f">= {low}" if high is None else f"in [{low if low is not None else '-inf'}, {high})"
                raise ValueError(f"{path} must hold values {bounds}, got values in [{lo}, {hi}]")
    return value


def check_history(path: str, state: Any, size: int, mismatch: str) -> tuple[torch.Tensor, int, int]:
    """A ``History.state_dict()`` of a history of ``size``: (buffer [size], pos in
    [0, size), count in [0, size]), ``pos == count`` while not full (the ring fills from
    position 0). ``mismatch`` (formatted with the state's ``size``) says why another size
    is refused."""
    require_keys(path, state, ("size", "buffer", "pos", "count"))
    saved = check_int(key(path, "size"), state["size"], 1)
    if saved != size:
        raise ValueError(f"{key(path, 'size')} is {saved}: {mismatch.format(size=saved)}")
    buffer = check_tensor(key(path, "buffer"), state["buffer"], (size,),
                          (torch.float32, torch.float64, torch.float16, torch.bfloat16))
    pos = check_int(key(path, "pos"), state["pos"], 0, size - 1)
    count = check_int(key(path, "count"), state["count"], 0, size, why=" (the history's size)")
    if count < size and pos != count:
        raise ValueError(f"{key(path, 'pos')} must equal {key(path, 'count')} = {count} while the history is not "
                         f"full (it fills from position 0), got {pos}")
    return buffer, pos, count
