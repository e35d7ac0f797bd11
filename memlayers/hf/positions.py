"""Positions continue after the memorized tokens.

After ``memorize`` of N tokens, the next input is token N, N+1, ... of the same text, but the model
numbers it from 0 (its cache is empty). ``PositionShift`` wraps the module that turns position ids
into position information (the rotary embedding of Llama-family models, the learned position
embedding of GPT-2) and adds each batch row's count of memorized tokens, so that every layer sees
the positions a full-context pass would give. For rotary models this changes nothing but the
memory layers' relative distances to their memories (RoPE is relative); for GPT-2 it is what makes
memory + local context equal the full context.
"""
from __future__ import annotations

import torch
from torch import nn

from ..layers.rotary import RotaryCache


class PositionShift(nn.Module):
    """Wraps ``base_layer`` (called as ``base_layer(x, position_ids)`` for rotary embeddings, or
    ``base_layer(position_ids)`` for a position embedding table) and shifts row b's position ids by
    ``offset[b]``, the tokens memorized in that row.

    It is the model-wide part of a kNN attachment, found by walking the model: ``offset`` (a buffer:
    saved, moved and loaded with the model), ``memorized`` (the largest offset, kept on the host so
    that no decode step reads the device), and ``base_attn``, the model's attention implementation
    before kNN memory was attached (``detach`` restores it). ``validate=True`` checks on every call
    that shifted positions stay inside a learned position table (a device read per step; off by
    default: ``memorize`` checks its own input, and the table lookup fails on an overflow anyway).
    """

    _memlayers_wrapper = True
    attachment_kind = "positions"

    def __init__(self, base_layer: nn.Module, rotary: bool, max_positions: int = 0, base_attn: str = "sdpa",
                 validate: bool = False):
        super().__init__()
        self.base_layer = base_layer
        self.rotary = rotary
        # Learned tables end at max_positions; rotary embeddings extrapolate (0: no limit).
        self.max_positions = max_positions
        self.base_attn = base_attn
        self.validate = validate
        self.memorized = 0
        # No rows until the first memorize fixes the batch size.
        self.register_buffer("offset", torch.zeros(0, dtype=torch.long, device=self._device()))
        # Rotary tables for positions 0..P-1 made by the model's own rotary embedding (it may scale
        # frequencies or carry an attention scaling): the kNN read rotates stored keys with them.
        self.rope = RotaryCache(0, tables=self._model_tables) if rotary else None
        self.train(base_layer.training)  # the model's mode

    def _device(self) -> torch.device:
        for t in list(self.base_layer.parameters()) + list(self.base_layer.buffers()):
            return t.device
        return torch.device("cpu")

    def shifted(self, position_ids: torch.Tensor) -> torch.Tensor:
        if self.memorized == 0:  # host-side: nothing memorized in any row
            return position_ids
        B = self.offset.shape[0]
        if position_ids.shape[0] not in (1, B):
            raise ValueError(
                f"the model's memory holds {B} batch rows but the input has {position_ids.shape[0]}; "
                "generate with the batch that was memorized (no beams or num_return_sequences > 1), "
                "or reset_memory first"
            )
        shifted = position_ids + self.offset.to(position_ids.device)[:, None]
        if self.validate and self.max_positions and int(shifted.max()) >= self.max_positions:
            raise ValueError(
                f"memorized plus current tokens reach position {int(shifted.max())}, past the model's "
                f"{self.max_positions} learned positions; memorize less or reset_memory"
            )
        return shifted

    def forward(self, *args, **kwargs):
        if self.rotary:
            x, position_ids = _rotary_args(args, kwargs)
            return self.base_layer(x, self.shifted(position_ids))
        (position_ids,) = args
        return self.base_layer(self.shifted(position_ids))

    def resize(self, batch_size: int) -> None:
        """Give the offsets ``batch_size`` rows, all zero (only while nothing is memorized)."""
        self.offset = torch.zeros(batch_size, dtype=torch.long, device=self.offset.device)
        self.memorized = 0

    def advance(self, tokens: int) -> None:
        """Every row memorized ``tokens`` more."""
        self.offset += tokens
        self.memorized += tokens

    def sync(self) -> None:
        """Recount ``memorized`` from the offsets (one device read: after a reset or a load)."""
        self.memorized = int(self.offset.max()) if self.offset.numel() else 0

    def _load_from_state_dict(self, state_dict, prefix, *args):
        # The saved offsets carry their own batch size.
        saved = state_dict.get(prefix + "offset")
        if saved is not None and saved.dim() == 1 and saved.shape != self.offset.shape:
            self.offset = torch.zeros_like(saved, device=self.offset.device)
        super()._load_from_state_dict(state_dict, prefix, *args)
        self.sync()

    @torch.no_grad()
    def _model_tables(self, length: int, device: torch.device):
        ids = torch.arange(length, device=device)[None]
        cos, sin = self.base_layer(torch.empty(0, device=device, dtype=torch.float32), ids)
        return cos[0], sin[0]

    def _apply(self, fn, recurse=True):
        # A move or cast of the model's rotary embedding invalidates the tables made from it.
        if self.rope is not None:
            self.rope.clear()
        return super()._apply(fn, recurse)


def _rotary_args(args, kwargs):
    x = args[0] if args else kwargs["x"]
    if len(args) > 1:
        return x, args[1]
    return x, kwargs["position_ids"]
