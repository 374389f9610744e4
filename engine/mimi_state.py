"""The one place that knows the inside of moshi's streaming states (written against moshi 0.2.13).

The lanes' decoder (`audio.py`) goes through moshi's public streaming surface where it has one:
`streaming(batch)` to make the states, `get_streaming_state()` / `set_streaming_state()` to swap
them, `reset_streaming(mask)` to restart lanes.  What moshi offers no call for -- running a batch
of b lanes on the first b rows of a larger state, and moving one lane's state to another row --
needs the fields of its state objects; that knowledge is here and nowhere else, and
`check_layout` refuses (loudly, naming the field) a moshi whose states hold anything else.
"""
from __future__ import annotations

import copy

import torch
from moshi.modules.transformer import RingKVCache
from moshi.utils.compile import CUDAGraphed

# Fields of a moshi streaming state that are not per-lane: left as they are in a lane view.
SHARED_KINDS = (int, bool, float, type(None), torch.device)


def states(mimi) -> dict[str, object]:
    """Every streaming state of `mimi` (inside `mimi.streaming(...)`), by module name."""
    return {name: state for name, state in mimi.get_streaming_state().items() if state is not None}


def install(mimi, by_name: dict[str, object]) -> None:
    """Make `by_name` the states `mimi` runs with (modules without one keep None)."""
    mimi.set_streaming_state({name: by_name.get(name) for name in mimi.get_streaming_state()})


def check_layout(by_name: dict[str, object]) -> None:
    """Every field of every state is one this module handles: a batch-first tensor, a RingKVCache,
    moshi's CUDAGraphed wrapper, or a plain value shared by the lanes.  Anything else means moshi
    changed what a streaming state holds: a lane view would silently share or drop it."""
    for name, state in by_name.items():
        for field, value in vars(state).items():
            if isinstance(value, torch.Tensor):
                if not _is_batch_tensor(value, state.batch_size):
                    raise RuntimeError(f"moshi's streaming state of {name or 'mimi'!r} has a tensor {field!r} of "
                                       f"shape {tuple(value.shape)} that is not batch-first: misotts.engine.mimi_state "
                                       f"was written for moshi 0.2.13's states")
            elif isinstance(value, RingKVCache):
                _check_kv(name, field, value, state.batch_size)
            elif not isinstance(value, (CUDAGraphed, *SHARED_KINDS)):
                raise RuntimeError(f"moshi's streaming state of {name or 'mimi'!r} holds {field!r} of type "
                                   f"{type(value).__name__}, which misotts.engine.mimi_state does not know: it was "
                                   f"written for moshi 0.2.13's states")


def _check_kv(name: str, field: str, kv: RingKVCache, batch_size: int) -> None:
    for attr, value in vars(kv).items():
        per_lane = {"cache": 1, "end_offset": 0}.get(attr)
        ok = (isinstance(value, torch.Tensor) and value.ndim > (per_lane or 0) and value.shape[per_lane] == batch_size
              if per_lane is not None else isinstance(value, SHARED_KINDS))
        if not ok:
            raise RuntimeError(f"moshi's RingKVCache {field!r} of {name or 'mimi'!r} holds {attr!r} "
                               f"({type(value).__name__}) where misotts.engine.mimi_state expects moshi 0.2.13's "
                               f"cache [2, batch, ...], end_offset [batch] and plain settings")
    if not {"cache", "end_offset"} <= set(vars(kv)):
        raise RuntimeError(f"moshi's RingKVCache {field!r} of {name or 'mimi'!r} has no cache / end_offset: "
                           f"misotts.engine.mimi_state was written for moshi 0.2.13's")


def lane_view(state, lanes: int):
    """A copy of `state` whose per-lane tensors are views of its first `lanes` rows, and the
    (object, attribute, view) triples to restore if moshi reassigns an attribute of the copy."""
    view, watched = copy.copy(state), []
    view.batch_size = lanes
    for name, value in vars(state).items():
        if isinstance(value, torch.Tensor) and _is_batch_tensor(value, state.batch_size):
            setattr(view, name, value[:lanes])
            watched.append((view, name, value[:lanes]))
        elif isinstance(value, RingKVCache):
            kv = copy.copy(value)
            kv.cache, kv.end_offset = value.cache[:, :lanes], value.end_offset[:lanes]
            setattr(view, name, kv)
            watched += [(kv, "cache", kv.cache), (kv, "end_offset", kv.end_offset)]
        elif isinstance(value, CUDAGraphed):  # the engine captures the decode itself
            setattr(view, name, CUDAGraphed(value.func, disable=True))
    return view, watched


def restore(watched) -> None:
    """After a call on lane views: an attribute moshi replaced gets its value copied back into the
    view (so the full state sees it) and the view put back."""
    for obj, name, view in watched:
        value = getattr(obj, name)
        if value is not view:
            view.copy_(value)
            setattr(obj, name, view)


@torch.no_grad()
def move_lane(state, src: int, dst: int) -> None:
    """Row dst of `state` takes over row src's stream."""
    for value in vars(state).values():
        if isinstance(value, torch.Tensor) and _is_batch_tensor(value, state.batch_size):
            value[dst] = value[src]
        elif isinstance(value, RingKVCache):
            value.cache[:, dst] = value.cache[:, src]
            value.end_offset[dst] = value.end_offset[src]


def _is_batch_tensor(value: torch.Tensor, batch_size: int) -> bool:
    # moshi's streaming states keep their per-item tensors batch-first
    return value.ndim > 0 and value.shape[0] == batch_size
