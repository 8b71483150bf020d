"""Row surgery on transformers' dynamic KV caches: what lets a running batch take new rows and lose finished ones.

Use it like this (a batch's rows are right-aligned: each row's tokens end at the last cache position, padding on
the left, masked by the batch's 2-D attention mask)::

    merged = merge_rows(running_cache, new_cache)        # rows of both, the shorter side left-padded with zeros
    select_rows(merged, torch.tensor([0, 2]))            # keep rows 0 and 2, in that order
    trim_left(merged, 5)                                 # drop 5 leading positions that every row has as padding

Works on `DynamicCache` layers of both kinds: full layers (`keys` [rows, heads, length, dim]) and sliding-window
layers (Gemma 3: only the last `sliding_window - 1` positions kept, `cumulative_length` = the full length), and on
an ensemble's tuple of member caches. Padding keeps each layer's positions lined up with the attention mask, so the
model's own mask logic (sliding windows included) sees the merged batch as if it had been prefilled left-padded.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor


def merge_rows(running: Any, new: Any) -> Any:
    """`running`'s rows followed by `new`'s, in `running` (changed in place); see the module docstring."""
    if isinstance(running, tuple):  # an ensemble: one cache per member
        return tuple(merge_rows(a, b) for a, b in zip(running, new))
    for layer, new_layer in zip(running.layers, new.layers):
        if not getattr(layer, "is_initialized", False):
            continue
        full_length = max(_full_length(layer), _full_length(new_layer))
        width = full_length
        if getattr(layer, "is_sliding", False):
            width = min(full_length, layer.sliding_window - 1)
            layer.cumulative_length = full_length
        layer.keys = torch.cat([_left_pad(layer.keys, width), _left_pad(new_layer.keys, width)])
        layer.values = torch.cat([_left_pad(layer.values, width), _left_pad(new_layer.values, width)])
    return running


def select_rows(cache: Any, index: Tensor) -> Any:
    """Keep the rows `index` names, in its order (in place)."""
    if isinstance(cache, tuple):
        return tuple(select_rows(member, index) for member in cache)
    cache.batch_select_indices(index)
    return cache


def trim_left(cache: Any, positions: int) -> Any:
    """Drop the first `positions` cache positions (padding in every row), in place."""
    if positions <= 0:
        return cache
    if isinstance(cache, tuple):
        return tuple(trim_left(member, positions) for member in cache)
    for layer in cache.layers:
        if not getattr(layer, "is_initialized", False):
            continue
        if getattr(layer, "is_sliding", False):
            layer.cumulative_length -= positions
            width = min(layer.cumulative_length, layer.sliding_window - 1)
        else:
            width = layer.keys.shape[-2] - positions
        layer.keys = layer.keys[:, :, layer.keys.shape[-2] - width:]
        layer.values = layer.values[:, :, layer.values.shape[-2] - width:]
    return cache


def _full_length(layer: Any) -> int:
    return int(layer.cumulative_length) if getattr(layer, "is_sliding", False) else int(layer.keys.shape[-2])


def _left_pad(states: Tensor, width: int) -> Tensor:
    missing = width - states.shape[-2]
    if missing <= 0:
        return states
    padding = states.new_zeros((*states.shape[:-2], missing, states.shape[-1]))
    return torch.cat([padding, states], dim=-2)
