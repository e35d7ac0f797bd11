"""The kNN-memory read path, shared by ``KNNMemoryAttention`` and the HuggingFace kNN wrapper:
search, gather-attention under a position policy, and the merge with the local attention.

Position policies (how a retrieved key is placed relative to the query; rotary models only):

- ``"rotate"``: keys are stored before rotary embedding and rotated on read at their stored
  absolute positions (Extended Mind's cache): exactly the scores full attention would give them;
- ``"none"``: memories carry no position (Memorizing Transformers, meliad): the query before rotary
  embedding against the stored key;
- ``"fixed"``: every memory sits at one relative distance ``fixed_distance`` (InfLLM); by RoPE's
  relative property, ``rope(q, p_q) . rope(k, p_k) = rope(q, p_q - p_k) . k``, this is the query
  rotated by that distance against the stored key.

Merges: ``"joint"``: one softmax over local and memory keys (log-sum-exp merge; training-free, and
exact full-context attention when every memory is retrieved); ``"gate"``: two softmaxes mixed per
query head by a learned ``sigmoid(gate)`` (Memorizing Transformers).

Defaults (one set, used by both), with the HuggingFace attachment's ``layers=None`` (every layer),
``position="rotate"`` and ``combine="joint"``, chosen by ``bench/sweep_knn_defaults.py`` on the
embedded SmolLM2-135M (results: ``bench/results/knn-defaults.json``; passkey and RULER needle, 2K
to 8K tokens, 512-token window; seeds 1000 and 1001, other than the efficacy table's 0; prompts
whose filler could still end mid-sentence, before ``Haystack.fit``): every
layer reading with top_k 16, 32, 64 or 128 recalled every prompt but one (a 4K passkey at depth
100%, inside the window, which the model misses with full context too), while ``"fixed"`` and
reading in layers 0-23 or 4-23 only missed a 4K passkey that every layer recalled; ``"none"``
missed a 2K passkey in the scratch runs that preceded the sweep. ``top_k=64`` rather than 32: on
those seeds the two tie (9 of 10), and on the efficacy table's own prompts, re-read from the same
memories, 64 recalled three of the four passkeys 32 missed (2K at depth 100%, 4K at 50%, 8K at 75%;
the fourth is the model's own miss) and lost none. ``bench/diagnose_knn_recall.py`` shows why
(``bench/results/knn-recall-diagnosis.json``, the 8K depth-75% passkey): the repeated haystack
stores the same tokens in the same context hundreds of times, so in layers 0-2 the 32 winners of the
question's last query hold 2-3 distinct tokens per head, near-duplicates crowding out the needle,
and in the deeper layers 64 winners hold about twice the needle's tokens that 32 do (layers 14-23:
6.2 against 11.4 of its 25 tokens per head, mean); the answer needs its digits, not only its first
words. 32 against 16: in a scratch run at 4K the needle's answer was less likely with 16 (mean
log-probability per answer token -0.42 against -0.33). ``max_distance`` (HuggingFace configs: half the
model's trained positions) keeps relative distances within what the model was trained on beyond it.
``capacity=65536`` tokens per batch row (the memory
is there for long documents, and eviction is silent, so the default should rarely evict: 65536 is
Memorizing Transformers' largest memory); ``fixed_distance=1024`` (a memory just beyond a typical
local window, as in InfLLM; distance 0 would make ``"fixed"`` the same as ``"none"``).
"""
from __future__ import annotations

from typing import Optional, Tuple

import torch

from ..memory import KNNMemory
from ..ops.memory_attention import memory_attention, merge_attention
from .rotary import RotaryCache, apply_rotary

COMBINES = ("joint", "gate")
POSITIONS = ("rotate", "none", "fixed")
DEFAULT_TOP_K = 64
DEFAULT_CAPACITY = 65536
DEFAULT_FIXED_DISTANCE = 1024


def read_memory(
    memory: KNNMemory,
    q: torch.Tensor,
    q_rot: torch.Tensor,
    *,
    top_k: int,
    scale: float,
    position: str,
    rope: Optional[RotaryCache],
    fixed_distance: int,
    backend: str,
    max_position: int = 0,
    xl_start: Optional[torch.Tensor] = None,
    xl_valid: Optional[torch.Tensor] = None,
    max_distance: int = 0,
) -> Tuple[torch.Tensor, torch.Tensor]:
    """Each query's ``top_k`` memories of its batch row, attended under the position policy.

    Args:
        memory: the store (keys before rotary embedding, absolute positions).
        q: ``[B, Hq, T, D]`` queries before rotary embedding (the search is position-free).
        q_rot: the same queries rotated at their own positions (read by ``"rotate"``).
        top_k, scale, position, fixed_distance, backend: as in ``KNNMemoryAttention``.
        rope: the rotary tables (None: no rotary embedding; then ``position`` is ignored).
        max_position: an upper bound on the stored positions (``"rotate"`` reads tables that far).
        max_distance: under ``"rotate"``, memories stored before ``max_position - max_distance`` are
            read as if stored there (0: no limit): relative distances stay within what the model was
            trained on however long the memorized text (``clamped_positions``).
        xl_start, xl_valid: ``[B]``: row b's memories at positions ``>= xl_start[b]`` are skipped
            where ``xl_valid[b]`` (they are in the local context already, and must not count twice).

    Returns:
        ``(out [B, Hq, T, D], lse [B, Hq, T])``; a query with no memory gets ``lse = -inf``.
    """
    sharded = memory.process_group is not None
    # A sharded memory's slot ids are global: its winners come back gathered instead.
    res = memory.search(q.detach().to(memory.dtype), top_k, gather=sharded)
    indices = res.indices
    if xl_start is not None:
        in_xl = (res.positions >= xl_start[:, None, None, None]) & xl_valid[:, None, None, None]
        indices = indices.masked_fill(in_xl, -1)
    if sharded:
        B, Hq, T = q.shape[:3]
        out, lse = _attend_memories(
            q.reshape(B * Hq, 1, T, -1), q_rot.reshape(B * Hq, 1, T, -1), *_per_query_memory(res, indices),
            memory_dtype=memory.dtype, scale=scale, position=position, rope=rope, fixed_distance=fixed_distance,
            backend=backend, max_position=max_position, max_distance=max_distance)
        return out.reshape(B, Hq, T, -1), lse.reshape(B, Hq, T)
    # Every slot id the search returns lies in the filled prefix: the op (and a snapshot for backward)
    # sees those slots only, not the whole capacity.
    filled = memory.filled
    return _attend_memories(q, q_rot, memory.keys[:, :, :filled], memory.values[:, :, :filled],
                            memory.positions[:, :filled], indices, memory_dtype=memory.dtype, scale=scale,
                            position=position, rope=rope, fixed_distance=fixed_distance, backend=backend,
                            max_position=max_position, max_distance=max_distance)


def _per_query_memory(res, indices: torch.Tensor):
    """The gathered winners ``res.keys/values [B, Hq, T, k, D]`` as one memory of ``T * k`` slots per
    (row, query head): ``(keys [B*Hq, 1, T*k, D], values, positions [B*Hq, T*k], indices [B*Hq, 1, T, k])``."""
    B, Hq, T, k = indices.shape
    keys = res.keys.reshape(B * Hq, 1, T * k, -1)
    values = res.values.reshape(B * Hq, 1, T * k, -1)
    positions = res.positions.reshape(B * Hq, T * k)
    slots = torch.arange(T * k, device=indices.device).view(1, 1, T, k).expand(B * Hq, 1, T, k)
    return keys, values, positions, slots.masked_fill(indices.reshape(B * Hq, 1, T, k) < 0, -1)


def clamped_positions(positions: torch.Tensor, max_position: int, max_distance: int) -> torch.Tensor:
    """``positions`` with those before ``max_position - max_distance`` moved up to it (``max_distance``
    0: unchanged; empty slots, -1, stay -1)."""
    floor = max_position - max_distance
    if not max_distance or floor <= 0:
        return positions
    return torch.where(positions >= 0, positions.clamp(min=floor), positions)


def _attend_memories(q, q_rot, keys, values, positions, indices, *, memory_dtype, scale, position, rope,
                          fixed_distance, backend, max_position, max_distance):
    """Attention of ``q [B, Hq, T, D]`` over the memories ``indices`` names in ``keys/values [B, Hkv, M, D]``
    (absolute ``positions [B, M]``), under the position policy (``read_memory``'s arguments)."""
    if torch.is_grad_enabled() and (q.requires_grad or q_rot.requires_grad):
        # The op keeps the buffers for backward, and the next write changes them in place: read a
        # snapshot so that backward sees what forward saw (issue 13).
        keys, values, positions = keys.clone(), values.clone(), positions.clone()
    kwargs = {}
    if rope is None or position == "none":
        q_mem = q if rope is not None else q_rot
    elif position == "fixed":
        cos, sin = rope.get(fixed_distance + 1, q.device)
        q_mem = apply_rotary(q, cos[fixed_distance], sin[fixed_distance])
    else:  # rotate
        cos, sin = rope.get(max_position, q.device)
        q_mem = q_rot
        kwargs = dict(mem_positions=clamped_positions(positions, max_position, max_distance), rotary_cos=cos,
                      rotary_sin=sin)
    # The indices come from a search of these same buffers (or are -1): no per-call range check, which
    # would read the device on every decode step.
    return memory_attention(q_mem.to(memory_dtype), keys, values, indices, scale=scale, backend=backend,
                            validate=False, **kwargs)


def combine_memory(
    out_local: torch.Tensor,
    lse_local: Optional[torch.Tensor],
    out_mem: torch.Tensor,
    lse_mem: torch.Tensor,
    combine: str,
    gate: Optional[torch.Tensor] = None,
) -> torch.Tensor:
    """Merge the local attention ``out_local [B, Hq, T, D]`` with the memories' ``out_mem``.

    ``"joint"`` needs the local log-sum-exp ``lse_local [B, Hq, T]``; ``"gate"`` mixes with
    ``sigmoid(gate [Hq])``, and a query with no memory (``lse_mem = -inf``) keeps its local output.
    Returns fp32.
    """
    if combine == "joint":
        out, _ = merge_attention(out_local.float(), lse_local, out_mem.float(), lse_mem)
        return out.float()
    g = torch.sigmoid(gate.float()).view(1, -1, 1, 1)
    mixed = g * out_mem.float() + (1 - g) * out_local.float()
    return torch.where(torch.isfinite(lse_mem)[..., None], mixed, out_local.float())


__all__ = ["read_memory", "combine_memory", "clamped_positions", "COMBINES", "POSITIONS", "DEFAULT_TOP_K", "DEFAULT_CAPACITY",
           "DEFAULT_FIXED_DISTANCE"]
