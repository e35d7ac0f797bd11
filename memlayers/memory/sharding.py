"""A ``KNNMemory`` sharded over a ``torch.distributed`` process group: the slot layout and the merge.

Layout: ``capacity`` C is global. Global slot ``s`` lives on rank ``s % W`` at local slot ``s // W``
(round-robin stripes), so every add spreads its tokens evenly, and rank r holds
``n_r = ceil((C - r) / W)`` real slots in local buffers of at most ``ceil(C / W)`` slots (they grow
with what is stored, as an unsharded memory's do: ``write_reach`` says how far an add may write).
The ring's metadata (count, write_ptr, next_position, all global) is the same on every rank, because
every rank makes the same calls with the same arguments. A rank's valid slots are a prefix of its
stripe, as the global ring fills slots 0..count-1 first; a shard's state holds that prefix only.

Search: each rank searches its stripe exactly, its top-k become global slot ids, the ranks all-gather
scores and ids and keep the k best (the same top-k as one unsharded memory); positions, keys and values
are then fetched for the winners only, each sent by its owner (``fetch_winners``), as bytes in their own
dtype, in one collective per search.
"""
from __future__ import annotations

from typing import Dict, Tuple

import torch
import torch.distributed as dist


class Stripe:
    """Rank ``rank``'s share of ``capacity`` global slots over ``world`` ranks."""

    def __init__(self, rank: int, world: int, capacity: int):
        if capacity < world:
            raise ValueError(f"capacity ({capacity}) must be at least the process group's size ({world})")
        self.rank, self.world, self.capacity = rank, world, capacity
        self.local_capacity = -(-capacity // world)  # ceil: the buffers' slot count on every rank
        self.slots = (capacity - rank + world - 1) // world  # real slots of this rank

    def local_count(self, count: torch.Tensor) -> torch.Tensor:
        """``[B]`` valid local slots for ``[B]`` global counts (mine are the global slots r, r+W, ...)."""
        return ((count - self.rank + self.world - 1) // self.world).clamp_min(0)

    def local_filled(self, filled: int) -> int:
        return max(0, (filled - self.rank + self.world - 1) // self.world)

    def global_slots(self, local: torch.Tensor) -> torch.Tensor:
        """Global slot ids of local slots (``-1`` stays ``-1``)."""
        return torch.where(local >= 0, local * self.world + self.rank, local)

    def _candidates(self, T: int) -> int:
        """J, the local slots ``writes`` names for an add of T tokens."""
        return min(T // self.world + 2, self.slots)

    def write_reach(self, filled: int, T: int) -> int:
        """Local slots 0..n-1 that cover every slot an add of T tokens reads or writes here while
        global slots 0..filled-1 are the filled ones: ``writes``'s J candidates start at a row's
        ``local_filled(count)`` (or wrap once the ring is full, which needs every slot anyway)."""
        return min(self.local_filled(filled) + self._candidates(T), self.local_capacity)

    def writes(self, write_ptr: torch.Tensor, T: int) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Where an add of T tokens (T <= capacity) at ``write_ptr`` ([B]) lands on this rank.

        Returns ``(local [B, J], token [B, J], written [B, J])``: J candidate local slots per row, the
        token each receives, and whether it receives one. No device reads: J is fixed by T, and the
        local slots are distinct, so a scatter of ``where(written, new, old)`` is well defined.
        """
        W, r, C = self.world, self.rank, self.capacity
        J = self._candidates(T)
        first = write_ptr + (r - write_ptr) % W  # my first global slot at or after write_ptr
        first_local = torch.where(first < C, first // W, torch.zeros_like(first))
        local = (first_local[:, None] + torch.arange(J, device=write_ptr.device)) % self.slots
        token = (local * W + r - write_ptr[:, None]) % C
        return local, token.clamp(max=T - 1), token < T

    def take(self, global_state: Dict[str, torch.Tensor]) -> Dict[str, torch.Tensor]:
        """This rank's state from an unsharded one (buffers of S <= ``capacity`` slots, every entry in
        them): the global slots r, r + W, ... below S."""
        out = {name: global_state[name] for name in ("count", "write_ptr", "next_position")}
        slots = torch.arange(self.rank, global_state["keys"].shape[2], self.world)
        for name, axis in (("keys", 2), ("values", 2), ("positions", 1)):
            out[name] = global_state[name].index_select(axis, slots.to(global_state[name].device))
        return out


def assemble(shards: list) -> Dict[str, torch.Tensor]:
    """The unsharded state of ``[(stripe, state), ...]``, one per rank of the group that saved them
    (checked: each holds its slots of the filled prefix): global slots 0..S-1, S the largest count."""
    first_stripe, first = shards[0]
    W, C = first_stripe.world, first_stripe.capacity
    B, H, _, D = first["keys"].shape
    Dv = first["values"].shape[-1]
    S = int(first["count"].max())  # count is global: the same in every shard
    out = {name: first[name].clone() for name in ("count", "write_ptr", "next_position")}
    out["capacity"] = torch.tensor(C)
    out["keys"] = torch.zeros(B, H, S, D, dtype=first["keys"].dtype)
    out["values"] = torch.zeros(B, H, S, Dv, dtype=first["values"].dtype)
    out["positions"] = torch.full((B, S), -1, dtype=torch.long)
    for stripe, state in shards:
        slots = torch.arange(stripe.rank, S, W)
        n = slots.numel()
        out["keys"][:, :, slots] = state["keys"][:, :, :n].cpu()
        out["values"][:, :, slots] = state["values"][:, :, :n].cpu()
        out["positions"][:, slots] = state["positions"][:, :n].cpu()
    return out


def merge_topk(scores: torch.Tensor, ids: torch.Tensor, k: int, group) -> Tuple[torch.Tensor, torch.Tensor]:
    """The global top-k from every rank's ``scores``/``ids`` (``[B, Hq, T, k]``, global slot ids)."""
    world = dist.get_world_size(group)
    all_scores = [torch.empty_like(scores) for _ in range(world)]
    all_ids = [torch.empty_like(ids) for _ in range(world)]
    dist.all_gather(all_scores, scores.contiguous(), group=group)
    dist.all_gather(all_ids, ids.contiguous(), group=group)
    best, pick = torch.cat(all_scores, dim=-1).topk(k, dim=-1)
    best_ids = torch.cat(all_ids, dim=-1).gather(-1, pick)
    return best, best_ids.masked_fill(best == float("-inf"), -1)


def fetch_winners(rows: torch.Tensor, owner: torch.Tensor, group) -> torch.Tensor:
    """Every rank's copy of the winners' rows, each row sent by the rank that owns it.

    Args:
        rows: ``[N, E]`` uint8, the winners' rows; only those this rank owns are read.
        owner: ``[N]`` the rank owning each winner, the same on every rank (``-1``: a missing winner,
            whose row comes back as zeros).

    Each rank packs its own winners (in winner order) and the ranks all-gather the packs, padded to
    the largest; the owners' counts, known to every rank from ``owner``, place each received row. That
    moves ``(W - 1) * max_r n_r`` rows per rank, ``N (W - 1) / W`` when the winners are spread evenly,
    against ``2 N (W - 1) / W`` for an all-reduce. When one rank owns most winners the padding would
    cost more than that, and the rows go by an all-reduce of the byte rows instead (exact: every byte
    is non-zero on its owner only, and adding zeros changes nothing). Both ways send rows in their own
    dtype, as bytes: no widening. One host read per call (the ``W`` counts, to size the buffers).
    """
    world, rank = dist.get_world_size(group), dist.get_rank(group)
    N, E = rows.shape
    key = torch.where(owner >= 0, owner, torch.full_like(owner, world))  # missing winners sort last
    order = torch.argsort(key, stable=True)
    counts = torch.bincount(key, minlength=world + 1)[:world].tolist()
    width, start = max(counts), sum(counts[:rank])
    if width == 0:  # nothing found anywhere: the same on every rank, so no rank enters a collective
        return torch.zeros_like(rows)
    if width * world > 2 * N:
        summed = torch.where((key == rank)[:, None], rows, torch.zeros_like(rows))
        dist.all_reduce(summed, op=dist.ReduceOp.SUM, group=group)
        return summed
    send = rows.new_zeros(width, E)
    send[: counts[rank]] = rows.index_select(0, order[start : start + counts[rank]])
    received = [torch.empty_like(send) for _ in range(world)]
    dist.all_gather(received, send, group=group)
    packed = torch.cat([r[:c] for r, c in zip(received, counts)])  # the found winners, in `order`
    out = torch.zeros_like(rows)
    out[order[: packed.shape[0]]] = packed
    return out
