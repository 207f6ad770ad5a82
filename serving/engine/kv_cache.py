"""A KV cache for continuous batching on top of any HF model that takes a `Cache`.

Rows of the running batch are left-padded to one length T, so every row writes its next token at
the same column. Each layer keeps a preallocated buffer (B_cap, H, T_cap, D); a decode step writes
one column in place and hands the model views, instead of HF's DynamicCache, which re-concatenates
the whole cache every step. Joining copies the new request's prefill cache into a free row (shifting
the batch right only when the newcomer is longer than T); leaving moves the last row into the hole.
"""
from __future__ import annotations

import torch
from transformers.cache_utils import DynamicCache, DynamicLayer


class _SlotLayer(DynamicLayer):
    """One layer's buffer. `keys`/`values` are views [:B, :, :T] so HF's own bookkeeping
    (get_seq_length, mask sizes) reads the right lengths."""

    def __init__(self, batch_cap: int, length_cap: int) -> None:
        super().__init__()
        self.batch_cap, self.length_cap = batch_cap, length_cap
        self.buf_k: torch.Tensor | None = None
        self.buf_v: torch.Tensor | None = None
        self.rows = 0
        self.length = 0

    def allocate(self, like: torch.Tensor) -> None:
        """Create the buffers from a (1, H, L, D) prefill tensor's head shape, dtype and device."""
        _, h, _, d = like.shape
        self.buf_k = like.new_zeros(self.batch_cap, h, self.length_cap, d)
        self.buf_v = like.new_zeros(self.batch_cap, h, self.length_cap, d)
        self.dtype, self.device = like.dtype, like.device
        self.is_initialized = True

    def refresh_views(self) -> None:
        self.keys = self.buf_k[: self.rows, :, : self.length]
        self.values = self.buf_v[: self.rows, :, : self.length]

    def update(self, key_states, value_states, cache_kwargs=None):
        q = key_states.shape[-2]
        end = self.length + q
        self.buf_k[: self.rows, :, self.length:end] = key_states
        self.buf_v[: self.rows, :, self.length:end] = value_states
        self.length = end
        self.refresh_views()
        return self.keys, self.values


class BatchKVCache:
    """The running batch's cache plus its 2-D attention mask (B, T); 0 marks left padding."""

    def __init__(self, num_layers: int, batch_cap: int, length_cap: int = 256) -> None:
        self.batch_cap = batch_cap
        self.layers = [_SlotLayer(batch_cap, length_cap) for _ in range(num_layers)]
        self.cache = DynamicCache()
        self.cache.layers = self.layers  # the model calls cache.update(); it lands in our buffers
        self.mask: torch.Tensor | None = None  # (B_cap, T_cap) long
        self.rows = 0
        self.length = 0

    # -- shape management -------------------------------------------------------------------------
    def _grow(self, needed: int) -> None:
        """Make room for `needed` columns (doubling), copying the live region."""
        cap = self.layers[0].length_cap
        if needed <= cap:
            return
        new_cap = max(needed, 2 * cap)
        for layer in self.layers:
            for name in ("buf_k", "buf_v"):
                old = getattr(layer, name)
                new = old.new_zeros(old.shape[0], old.shape[1], new_cap, old.shape[3])
                new[:, :, : layer.length] = old[:, :, : layer.length]
                setattr(layer, name, new)
            layer.length_cap = new_cap
        new_mask = self.mask.new_zeros(self.batch_cap, new_cap)
        new_mask[:, : self.length] = self.mask[:, : self.length]
        self.mask = new_mask

    def _shift_right(self, by: int) -> None:
        """Insert `by` columns of padding on the left of every live row."""
        self._grow(self.length + by)
        n, t = self.rows, self.length
        for layer in self.layers:
            for buf in (layer.buf_k, layer.buf_v):
                buf[:n, :, by: by + t] = buf[:n, :, :t].clone()
                buf[:n, :, :by] = 0
        self.mask[:n, by: by + t] = self.mask[:n, :t].clone()
        self.mask[:n, :by] = 0
        self._set_length(t + by)

    def _set_length(self, t: int) -> None:
        self.length = t
        for layer in self.layers:
            layer.length = t
            layer.rows = self.rows
            layer.refresh_views()

    # -- batch membership -------------------------------------------------------------------------
    def add(self, prefill: DynamicCache, row: int = 0, length: int | None = None) -> int:
        """Copy row `row` of a (left-padded) prefill cache into a new batch row; only its last
        `length` columns (the real tokens) are taken. Returns the new row's index."""
        assert self.rows < self.batch_cap
        first = _layer_kv(prefill, 0)[0]
        src_row = row
        if self.mask is None:
            for layer in self.layers:
                layer.allocate(first)
            self.mask = torch.zeros(self.batch_cap, self.layers[0].length_cap, dtype=torch.long,
                                    device=first.device)
        new_len = first.shape[-2] if length is None else length
        src_start = first.shape[-2] - new_len
        if new_len > self.length:
            self._shift_right(new_len - self.length)
        row, start = self.rows, self.length - new_len
        self._grow(self.length)
        for i, layer in enumerate(self.layers):
            k, v = _layer_kv(prefill, i)
            layer.buf_k[row, :, :start] = 0
            layer.buf_v[row, :, :start] = 0
            layer.buf_k[row, :, start: self.length] = k[src_row, :, src_start:]
            layer.buf_v[row, :, start: self.length] = v[src_row, :, src_start:]
        self.mask[row, :start] = 0
        self.mask[row, start: self.length] = 1
        self.rows += 1
        self._set_length(self.length)
        return row

    def remove(self, row: int) -> int | None:
        """Drop a row; the last row moves into its place. Returns the index of the row that moved
        (now at `row`), or None. Trims left padding no live row needs any more."""
        last = self.rows - 1
        moved = None
        if row != last:
            for layer in self.layers:
                layer.buf_k[row, :, : self.length] = layer.buf_k[last, :, : self.length]
                layer.buf_v[row, :, : self.length] = layer.buf_v[last, :, : self.length]
            self.mask[row, : self.length] = self.mask[last, : self.length]
            moved = last
        self.rows -= 1
        if self.rows == 0:
            self._set_length(0)
        else:
            self._trim()
            self._set_length(self.length)
        return moved

    def _trim(self) -> None:
        """Remove leading columns that are padding in every row (after a long request left)."""
        live = self.mask[: self.rows, : self.length].any(dim=0)
        pad = int(torch.argmax(live.to(torch.int8)))  # first column some row uses
        if pad < max(16, self.length // 4):  # not worth a copy yet
            return
        t = self.length - pad
        for layer in self.layers:
            for buf in (layer.buf_k, layer.buf_v):
                buf[: self.rows, :, :t] = buf[: self.rows, :, pad: self.length].clone()
        self.mask[: self.rows, :t] = self.mask[: self.rows, pad: self.length].clone()
        self.length = t

    # -- decode step ------------------------------------------------------------------------------
    def step_mask(self) -> torch.Tensor:
        """Attention mask for a decode step that appends one column: (B, T + 1)."""
        self._grow(self.length + 1)
        self.mask[: self.rows, self.length] = 1
        return self.mask[: self.rows, : self.length + 1]

    def after_step(self) -> None:
        """The model's update() has appended one column to every layer; keep lengths in step."""
        self.length += 1
        assert all(layer.length == self.length for layer in self.layers)


def _layer_kv(cache, i: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(keys, values) of layer i, on transformers 4.5x and 5.x."""
    layer = cache.layers[i]
    return layer.keys, layer.values
