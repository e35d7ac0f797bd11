"""``memorize`` (stream a long input into the memories), ``writing`` (``generate`` writes what it
reads into them) and ``reset_memory``."""
from __future__ import annotations

import inspect
from contextlib import contextmanager
from typing import Optional

import torch

from ..memory.protocol import row_mask
from ..ops.utils import check_positive_int, check_tensor
from ..memory.protocol import memory_modules
from .families import base_model
from .state import memory_wrappers, positions_of, require_attached

# Inputs of at least this many chunks show a progress bar when progress=None.
PROGRESS_MIN_CHUNKS = 8


def _model_device(model) -> torch.device:
    return next(model.parameters()).device


def _check_input_ids(model, input_ids) -> None:
    check_tensor("input_ids", input_ids, ndim=2, dtypes=(torch.int32, torch.int64), device=_model_device(model))
    if input_ids.shape[0] == 0 or input_ids.shape[1] == 0:
        raise ValueError(f"input_ids must hold at least one token per row, got shape {tuple(input_ids.shape)}")
    vocab = model.config.vocab_size
    lo, hi = torch.stack(torch.aminmax(input_ids)).tolist()  # one device read
    if lo < 0 or hi >= vocab:
        raise ValueError(f"input_ids must be token ids in 0..{vocab - 1}, got values in {lo}..{hi}")


@torch.no_grad()
def memorize(model, input_ids: torch.Tensor, chunk_size: int = 512,
             attention_mask: Optional[torch.Tensor] = None, progress: Optional[bool] = None):
    """Stream ``input_ids`` through the model chunk by chunk, writing each chunk into the memories.

    Each chunk attends locally to its own tokens (causally) and to the ``chunk_size`` tokens before
    it, held in the model's KV cache (a sliding window, as the model would read the text), and to
    what earlier chunks left in the memories (less the tokens already in that local context, which
    must not count twice); then its keys/values are stored (kNN) and the memories' states advance
    (Titans). The local context matters on real models: a chunk run without the tokens before it
    turns its first tokens into attention sinks (keys that every query scores highly), and stored,
    they would fill every later query's top-k. Afterwards the model continues the text:
    ``model(rest)`` or ``model.generate(rest)`` see positions that follow the memorized tokens, and
    the memories. Separate ``memorize`` calls are separate streams: a call starts without local
    context (the previous call's tokens are in the memories only).

    Args:
        model: a model with memory attached (``attach``).
        input_ids: ``[B, N]`` token ids on the model's device; row b goes to memory row b.
        chunk_size: tokens per forward pass, and the tokens of local context kept before each chunk
            (each token sees between ``chunk_size`` and ``2 * chunk_size - 1`` tokens locally).
        attention_mask: ``[B, N]`` of 0/1 (None: all ones). Rows of different lengths come padded
            (left or right): tokens where the mask is 0 are never stored, and each row's positions
            count only its own tokens. A padded batch is memorized row by row (each row's memories
            are swapped in as a batch of one), so the result equals one ``memorize`` call per row.
        progress: show a tqdm bar (None: for inputs of at least 8 chunks).

    Returns the model. Arguments are checked before any memory changes; the first memorize fixes
    the memories' batch size (``reset_memory()`` of all rows frees it).
    """
    require_attached(model)
    _check_input_ids(model, input_ids)
    check_positive_int("chunk_size", chunk_size)
    B, N = input_ids.shape
    lengths = None
    if attention_mask is not None:
        check_tensor("attention_mask", attention_mask, shape=(B, N), device=input_ids.device)
        if not bool(((attention_mask == 0) | (attention_mask == 1)).all()):
            raise ValueError("attention_mask must hold only 0 (padding) and 1 (a token to memorize)")
        if not bool((attention_mask == 1).any()):
            raise ValueError("attention_mask marks no token to memorize (all zeros)")
        if not bool((attention_mask == 1).all()):
            lengths = [int(n) for n in attention_mask.sum(dim=1).tolist()]
    if progress is not None and not isinstance(progress, bool):
        raise TypeError(f"progress must be a bool or None, got {type(progress).__name__}")
    pos = positions_of(model)
    if pos is not None and pos.max_positions:
        reach, new = pos.memorized + N, N
        if lengths is not None:
            new = max(lengths)
            # Each row continues after its own tokens (offsets from an earlier call of this batch).
            held = pos.offset.tolist() if pos.offset.shape[0] == B else [pos.memorized] * B
            reach = max(h + n for h, n in zip(held, lengths))
        if reach > pos.max_positions:
            raise ValueError(
                f"input_ids: {pos.memorized} memorized + {new} new tokens exceed the model's "
                f"{pos.max_positions} learned positions"
            )
    _prepare_rows(model, pos, B)
    if lengths is not None:
        _memorize_rows(model, pos, input_ids, attention_mask.bool(), chunk_size, progress)
        return model

    starts = range(0, N, chunk_size)
    if progress or (progress is None and len(starts) >= PROGRESS_MIN_CHUNKS):
        from tqdm.auto import tqdm

        starts = tqdm(starts, desc="memorize", unit="chunk")
    decoder = base_model(model)
    # The wrappers that write learn from what they see while their ``writing`` is set (this call only).
    writers = memory_wrappers(model, ("knn", "titans"))
    cache = None  # the local context: the last chunk_size tokens' keys/values in every layer
    cache_arg = _cache_argument(decoder)
    try:
        for start in starts:
            chunk = input_ids[:, start:start + chunk_size]
            for w in writers:
                w.writing = True
            # The decoder stack alone: memorizing needs no logits. Position ids count from the chunk's
            # first token (PositionShift adds the memorized tokens); the cache sits before them.
            out = decoder(input_ids=chunk, use_cache=True, **{cache_arg: cache},
                          position_ids=torch.arange(chunk.shape[1], device=chunk.device)[None])
            for w in writers:
                w.writing = False
            cache = _last_tokens(getattr(out, cache_arg), chunk_size, decoder.config)
            if pos is not None:
                pos.advance(chunk.shape[1])
    finally:
        for w in writers:
            w.writing = False
    return model


def _cache_argument(decoder) -> str:
    """The name of the KV cache in the decoder's forward and output (``cache`` since transformers
    5.24, ``past_key_values`` before)."""
    return "cache" if "cache" in inspect.signature(decoder.forward).parameters else "past_key_values"


def _last_tokens(cache, tokens: int, config):
    """A new ``DynamicCache`` that holds the last ``tokens`` keys/values of every layer of ``cache``."""
    from transformers import DynamicCache

    kept = DynamicCache(config=config)
    for i, layer in enumerate(cache.layers):
        kept.update(layer.keys[:, :, -tokens:], layer.values[:, :, -tokens:], i)
    return kept


@contextmanager
def writing(model):
    """A block whose forward passes (``model.generate``, ``model(...)``) write what they read into the
    memories, so that a conversation keeps its history beyond the window. Off unless opened.

        >>> with ml.writing(model):
        ...     out = model.generate(prompt_ids, max_new_tokens=32)
        >>> # the memories now hold prompt_ids and out's new tokens but the last

    Inside the block the memories are read as they were when it opened (the tokens of the block are
    in the model's own KV cache meanwhile); the kNN layers keep each token's keys and values and the
    Titans layers their inputs. When the block ends without an exception they are stored after the
    memorized tokens, in reading order, as ``memorize`` of the same tokens in one chunk would store
    them (kNN: the same keys, values and positions; Titans learns them in one call; tested equal),
    and positions continue after them. ``generate`` never reads the last token it samples: feed it back as the start of the
    next input (or ``memorize`` it) to keep it. Every token of every row is stored: prompts without
    padding, one sequence per memorized row (greedy or sampling; no beams), the default dynamic
    cache. An exception inside the block stores nothing.
    """
    require_attached(model)
    recorders = memory_wrappers(model, ("knn", "titans"))
    if any(w.recorded is not None for w in recorders):
        raise ValueError("model: a writing(model) block is already open")
    for w in recorders:
        w.recorded = []
    try:
        yield model
        pieces = [w.recorded for w in recorders]
    finally:
        for w in recorders:
            w.recorded = None
    _store_recorded(model, recorders, pieces)


def _row_memories(model):
    """The memories whose state is per batch row (learned tables such as DKVB's are shared)."""
    from ..layers.neural_memory import StatefulNeuralMemory
    from ..memory import KNNMemory

    return [m for _, m in memory_modules(model) if isinstance(m, (KNNMemory, StatefulNeuralMemory))]


def _row(state: dict, b: int) -> dict:
    """Row ``b`` (a batch of one) of a per-row memory's state dict: its own buffers, which lead with
    the batch (names without a dot; not a ``KNNMemory``'s FAISS blobs, rebuilt from the keys on load,
    nor the parameters of submodules), and the entries that describe the whole memory as they are (0-d
    ones such as a ``KNNMemory``'s ``capacity``, and a shard's ``shard``: which stripe of the slots
    this rank holds, the same for every row)."""
    return {k: v.clone() if v.dim() == 0 or k == "shard" else v[b:b + 1].clone()
            for k, v in state.items() if "." not in k}


def _cat_rows(memory, rows: list) -> dict:
    """The state of a batch made of ``rows`` (``_row`` states, in order). A ``KNNMemory`` row holds
    its filled slots only, which differ between rows: ``cat_rows`` pads them to the longest."""
    from ..memory import KNNMemory
    from ..memory.state import cat_rows

    if isinstance(memory, KNNMemory):
        return cat_rows(rows)
    return {k: rows[0][k] if rows[0][k].dim() == 0 else torch.cat([r[k] for r in rows]) for k in rows[0]}


def _memorize_rows(model, pos, input_ids, mask, chunk_size, progress) -> None:
    """``memorize`` of each row's unmasked tokens on its own: every per-row memory (and the row's
    position offset) is loaded with that row as a batch of one, fed the row's tokens, and its state
    is put back in the row. A failure restores every memory as it was."""
    memories = _row_memories(model)
    saved = [{k: v.clone() for k, v in m.state_dict().items()} for m in memories]
    saved_offsets = pos.offset.clone() if pos is not None else None
    done = [[] for _ in memories]  # per memory, each row's state after its tokens
    offsets = []  # each row's position offset after its tokens
    try:
        for b in range(input_ids.shape[0]):
            for m, state in zip(memories, saved):
                m.load_state_dict(_row(state, b), strict=False)
            if pos is not None:
                pos.offset = saved_offsets[b:b + 1].clone()
                pos.sync()
            tokens = input_ids[b:b + 1, mask[b]]
            if tokens.shape[1]:
                memorize(model, tokens, chunk_size=chunk_size, progress=progress)
            for m, rows in zip(memories, done):
                rows.append(_row(m.state_dict(), 0))
            if pos is not None:
                offsets.append(pos.offset.clone())
        merged = [_cat_rows(m, rows) for m, rows in zip(memories, done)]
    except BaseException:
        for m, state in zip(memories, saved):
            m.load_state_dict(state)
        if pos is not None:
            pos.offset = saved_offsets
            pos.sync()
        raise
    for m, state in zip(memories, merged):
        m.load_state_dict(state, strict=False)
    if pos is not None:
        pos.offset = torch.cat(offsets)
        pos.sync()


def _recorded_shape(wrapper, pieces):
    """``(rows, tokens)`` of what ``wrapper`` recorded: kNN pieces ``(keys, values) [B, H, T, D]``,
    Titans pieces ``[B, T, hidden]``."""
    if wrapper.attachment_kind == "knn":
        return pieces[0][0].shape[0], sum(k.shape[2] for k, _ in pieces)
    return pieces[0].shape[0], sum(x.shape[1] for x in pieces)


@torch.no_grad()
def _store_recorded(model, recorders, pieces) -> None:
    if not recorders or not pieces[0]:  # nothing ran inside the block
        return
    # Every layer reads every token: the first recorder's count is the block's.
    B, N = _recorded_shape(recorders[0], pieces[0])
    pos = positions_of(model)
    if pos is not None and pos.max_positions and pos.memorized + N > pos.max_positions:
        raise ValueError(f"writing: {pos.memorized} memorized + {N} read tokens exceed the model's "
                         f"{pos.max_positions} learned positions")
    _prepare_rows(model, pos, B)
    for w, p in zip(recorders, pieces):
        if w.attachment_kind == "knn":
            w.store(torch.cat([k for k, _ in p], dim=2), torch.cat([v for _, v in p], dim=2))
        else:
            w.learn(torch.cat(p, dim=1))
    if pos is not None:
        pos.advance(N)


def _held_rows(model) -> Optional[int]:
    """The batch size of the memories that hold something (None: all are empty)."""
    from ..memory import KNNMemory

    for _, m in memory_modules(model):
        rows = m.memory_batch_size
        if rows is None:
            continue
        if isinstance(m, KNNMemory):  # its host-side count: no device read per layer
            if m.filled:
                return rows
            continue
        seen = getattr(m, "seen", None)  # StatefulNeuralMemory: tokens read per row
        if seen is not None and bool(seen.any()):
            return rows
    return None


def _prepare_rows(model, pos, batch_size: int) -> None:
    """Give every memory ``batch_size`` rows; refuse a different batch while memories are held."""
    held = _held_rows(model)
    if held is not None and held != batch_size:
        raise ValueError(
            f"input_ids has {batch_size} rows but the memories hold {held}; reset_memory() first to change the batch size"
        )
    param = next(model.parameters())
    for wrapper in memory_wrappers(model, ("knn",)):
        wrapper.ensure_memory(batch_size, param.device, param.dtype)
    for _, m in memory_modules(model):  # learned tables (DKVB) accept any batch and change nothing
        if m.memory_batch_size != batch_size:
            m.bind_batch(batch_size)
    if pos is not None and pos.offset.shape[0] != batch_size:
        pos.resize(batch_size)


@torch.no_grad()
def reset_memory(model, rows=None):
    """Forget what was memorized, in every attached memory.

    Args:
        rows: None (every row), an int, a list or LongTensor of row ids, or a ``[B]`` bool mask
            (tensor or list of bools), read by ``memlayers.memory.protocol.row_mask``. Other rows are
            left exactly as they were.

    Returns the model.
    """
    require_attached(model)
    pos = positions_of(model)
    sizes = {m.memory_batch_size for _, m in memory_modules(model)} - {None}
    if pos is not None and pos.offset.numel():
        sizes.add(pos.offset.shape[0])
    if not sizes:  # nothing was ever memorized
        if rows is not None:
            raise ValueError("rows: nothing was memorized yet, so there are no rows to reset")
        return model
    (batch,) = sizes  # memorize binds every memory to one batch size
    mask = row_mask(rows, batch)  # checked before anything changes
    for _, m in memory_modules(model):
        if m.memory_batch_size is not None:
            m.reset_memory(mask)
    if pos is not None and pos.offset.numel():
        pos.offset[mask.to(pos.offset.device)] = 0
        pos.sync()
    return model
