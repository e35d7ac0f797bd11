"""``NeuralMemory``: the Titans long-term memory as an ``nn.Module`` (Miras attentional biases included).

Per head, a memory (a matrix, or the residual MLP ``x + silu(... x W_1 ...) W_L``) learns at test
time to map keys to values (``memlayers.ops.titans.titans_memory``), and every token reads it with
its query. As in the paper, q, k, v are linear projections followed by a short causal depthwise
convolution and SiLU, with l2-normalized q and k; the learning rate ``theta``, momentum ``eta`` and
forgetting ``alpha`` are per-token, per-head sigmoids of the input.

``NeuralMemory`` is functional: it returns its output, and, on request, the state after the input
(``y, state = mem(x, state, return_state=True)``), so a training step never inherits memory from the
previous batch by accident. The state holds the memory after the last token, the memory at the start
of the unfinished chunk with that chunk's pending tokens, and the convolution cache: feeding a
sequence in pieces of any length (single tokens included) gives exactly the outputs of one call.

``StatefulNeuralMemory`` keeps that state per batch row in registered buffers (the memory-state
protocol of ``memlayers.memory.protocol``): it moves with ``.to()``, saves and loads through
``state_dict``, and a row reset is a fresh start whatever the row's history was.
"""
from __future__ import annotations

import math
import warnings
from dataclasses import dataclass, replace
from typing import Dict, List, Optional, Tuple

import torch
import torch.nn as nn
import torch.nn.functional as F

from memlayers.ops.titans import BIASES, memory_apply, titans_memory
from memlayers.memory.protocol import MemoryModule, row_mask
from memlayers.ops.utils import check_choice, check_finite, check_positive_int, check_tensor

MEMORIES = ("linear", "mlp")


@dataclass(frozen=True)
class NeuralMemoryState:
    """Memory carried between calls (all tensors per batch row; weights in fp32).

    Attributes:
        weights: memory after the last token, one ``[B, H, D_in, D_out]`` tensor per layer.
        momentum: surprise ``S`` after the last token (like ``weights``), or None without momentum.
        chunk_weights, chunk_momentum: memory at the start of the unfinished chunk.
        pending: ``(k, v, theta, alpha, eta)`` of the unfinished chunk's tokens (``[B, H, n, D]`` /
            ``[B, H, n]``, ``n < chunk_size``; alpha/eta None when disabled).
        conv_cache: the last ``conv_size - 1`` projected inputs ``[B, 3 H D, conv_size - 1]`` (or None).
        seen: tokens read so far.
    """

    weights: Tuple[torch.Tensor, ...]
    momentum: Optional[Tuple[torch.Tensor, ...]]
    chunk_weights: Tuple[torch.Tensor, ...]
    chunk_momentum: Optional[Tuple[torch.Tensor, ...]]
    pending: Tuple[Optional[torch.Tensor], ...]
    conv_cache: Optional[torch.Tensor]
    seen: int

    @property
    def batch_size(self) -> int:
        return self.weights[0].shape[0]

    def detach(self) -> "NeuralMemoryState":
        """The same state cut from the autograd graph (truncated back-propagation between calls)."""

        def d(xs):
            return None if xs is None else tuple(None if x is None else x.detach() for x in xs)

        return replace(
            self,
            weights=d(self.weights), momentum=d(self.momentum), chunk_weights=d(self.chunk_weights),
            chunk_momentum=d(self.chunk_momentum), pending=d(self.pending),
            conv_cache=None if self.conv_cache is None else self.conv_cache.detach(),
        )


class NeuralMemory(nn.Module):
    """Titans neural long-term memory with data-dependent learning rate, momentum and forgetting.

    Args:
        dim: model width of the input and output ``[B, T, dim]``.
        heads: memory heads (each its own memory); ``head_dim`` defaults to ``dim // heads``.
        memory: ``"linear"`` (a ``head_dim x head_dim`` matrix) or ``"mlp"`` (residual MLP).
        depth: MLP layers (>= 2; the Triton kernels cover depth 2, deeper runs on the torch path).
        expansion: MLP hidden width = ``expansion * head_dim``.
        chunk_size: tokens per parallel mini-batch (power of two >= 16 for the kernels).
        momentum: keep the surprise momentum ``S`` (else ``S_t = -theta_t grad``).
        forget: weight-decay retention gate ``alpha`` (else the memory never forgets).
        bias: Miras attentional bias: ``"l2"`` (Titans), ``"lp"`` (Moneta, exponent ``p``),
            ``"huber"`` (Yaad, threshold ``delta``).
        conv_size: causal depthwise convolution width after the q/k/v projections (0 or 1: none).
        max_lr: ``theta = max_lr * sigmoid(.)``.
        backend, allow_tf32: passed to ``titans_memory``.

    Shapes: ``x [B, T, dim] -> y [B, T, dim]``.

    Example:
        >>> import torch, memlayers as ml
        >>> mem = ml.NeuralMemory(dim=64, heads=2, memory="mlp", chunk_size=16)
        >>> x = torch.randn(2, 40, 64)
        >>> y, state = mem(x, return_state=True)                 # one call
        >>> y2, state = mem(x[:, :1], state, return_state=True)  # then one more token
        >>> y.shape, y2.shape
        (torch.Size([2, 40, 64]), torch.Size([2, 1, 64]))
    """

    def __init__(
        self,
        dim: int,
        heads: int = 4,
        head_dim: Optional[int] = None,
        memory: str = "linear",
        depth: int = 2,
        expansion: int = 2,
        chunk_size: int = 64,
        momentum: bool = True,
        forget: bool = True,
        bias: str = "l2",
        p: float = 3.0,
        delta: float = 1.0,
        conv_size: int = 4,
        max_lr: float = 0.01,
        backend: str = "auto",
        allow_tf32: bool = False,
    ):
        super().__init__()
        check_positive_int("dim", dim)
        check_positive_int("heads", heads)
        head_dim = dim // heads if head_dim is None else head_dim
        check_positive_int("head_dim", head_dim)
        check_choice("memory", memory, MEMORIES)
        check_choice("bias", bias, BIASES)
        check_positive_int("chunk_size", chunk_size)
        check_positive_int("conv_size", conv_size, minimum=0)
        check_positive_int("expansion", expansion)
        if memory == "mlp":
            check_positive_int("depth", depth, minimum=2)
        if not (isinstance(max_lr, (int, float)) and math.isfinite(max_lr) and max_lr > 0):
            raise ValueError(f"max_lr must be a finite float > 0, got {max_lr!r}")
        self.dim, self.heads, self.head_dim = dim, heads, head_dim
        self.memory, self.depth = memory, (depth if memory == "mlp" else 1)
        self.chunk_size, self.use_momentum, self.use_forget = chunk_size, momentum, forget
        self.bias, self.p, self.delta = bias, float(p), float(delta)
        self.conv_size, self.max_lr = conv_size, float(max_lr)
        self.backend, self.allow_tf32 = backend, allow_tf32

        inner = heads * head_dim
        self.to_qkv = nn.Linear(dim, 3 * inner, bias=False)
        self.conv = nn.Conv1d(3 * inner, 3 * inner, conv_size, groups=3 * inner) if conv_size > 1 else None
        self.to_gates = nn.Linear(dim, 3 * heads)
        with torch.no_grad():
            # Start near: learning rate max_lr / 2, momentum 0.9, forgetting 0.007 per token.
            self.to_gates.weight.mul_(0.1)
            self.to_gates.bias.copy_(torch.tensor([0.0, math.log(9.0), -5.0]).repeat_interleave(heads))
        hidden = expansion * head_dim
        dims = [head_dim] + [hidden] * (self.depth - 1) + [head_dim]
        self.init_weights = nn.ParameterList()
        for i in range(self.depth):
            w = torch.zeros(heads, dims[i], dims[i + 1])
            if memory == "mlp":
                # Residual MLP: x + ... so a small last layer starts near the identity map.
                nn.init.normal_(w, std=(1.0 if i < self.depth - 1 else 0.1) / math.sqrt(dims[i]))
            self.init_weights.append(nn.Parameter(w))
        self.norm = nn.RMSNorm(head_dim)
        self.to_out = nn.Linear(inner, dim, bias=False)

    # ----------------------------------------------------------------------------------- helpers
    def _check_x(self, x, state: Optional[NeuralMemoryState], finite: bool = True) -> None:
        check_tensor("x", x, ndim=3, dtypes=(self.to_qkv.weight.dtype,), device=self.to_qkv.weight.device)
        if x.shape[-1] != self.dim:
            raise ValueError(f"x must have shape [B, T, {self.dim}], got {tuple(x.shape)}")
        if finite:  # reads the device: only where a non-finite input would poison the learned state
            check_finite("x", x)
        if state is not None:
            if not isinstance(state, NeuralMemoryState):
                raise TypeError(f"state must be a NeuralMemoryState or None, got {type(state).__name__}")
            if state.batch_size != x.shape[0]:
                raise ValueError(f"state holds batch size {state.batch_size}, but x has batch size {x.shape[0]}")
            if len(state.weights) != self.depth or state.weights[0].shape[1] != self.heads:
                raise ValueError("state was made by a NeuralMemory with another memory/depth/heads")

    def initial_state(self, batch_size: int, device=None) -> NeuralMemoryState:
        """Fresh state: the learned initial memory, zero momentum, nothing pending."""
        device = device or self.to_qkv.weight.device
        weights = tuple(w.to(device).unsqueeze(0).expand(batch_size, *w.shape) for w in self.init_weights)
        momentum = tuple(torch.zeros_like(w, dtype=torch.float32) for w in weights) if self.use_momentum else None
        return NeuralMemoryState(weights, momentum, weights, momentum, (None,) * 5, None, 0)

    def _heads(self, t: torch.Tensor) -> torch.Tensor:
        B, T, _ = t.shape
        return t.view(B, T, self.heads, self.head_dim).transpose(1, 2)

    def _project(self, x: torch.Tensor, cache: Optional[torch.Tensor]):
        """q, k, v ``[B, H, T, D]`` (conv + SiLU, l2-normalized q, k) and the new convolution cache."""
        qkv = self.to_qkv(x).transpose(1, 2)  # [B, 3 H D, T]
        new_cache = None
        if self.conv is not None:
            if cache is None:
                cache = qkv.new_zeros(qkv.shape[0], qkv.shape[1], self.conv_size - 1)
            qkv_ext = torch.cat([cache.to(qkv.dtype), qkv], dim=-1)
            new_cache = qkv_ext[..., qkv_ext.shape[-1] - (self.conv_size - 1):]
            qkv = self.conv(qkv_ext)
        q, k, v = F.silu(qkv.transpose(1, 2)).chunk(3, dim=-1)
        q = F.normalize(self._heads(q), dim=-1)
        k = F.normalize(self._heads(k), dim=-1)
        return q, k, self._heads(v), new_cache

    def _gates(self, x: torch.Tensor):
        g = self.to_gates(x).float().transpose(1, 2)  # [B, 3 H, T]
        th, et, al = g.view(g.shape[0], 3, self.heads, g.shape[-1]).unbind(1)
        theta = self.max_lr * torch.sigmoid(th)
        eta = torch.sigmoid(et) if self.use_momentum else None
        alpha = torch.sigmoid(al) if self.use_forget else None
        return theta, alpha, eta

    def _run(self, q, k, v, theta, alpha, eta, weights, momentum):
        # The gates are sigmoids (in range by construction) and x was checked where it would be
        # learned: the op's value checks would only add a device read per call.
        return titans_memory(
            q, k, v, theta, weights, alpha=alpha, eta=eta, momentum=momentum, chunk_size=self.chunk_size,
            bias=self.bias, p=self.p, delta=self.delta, allow_tf32=self.allow_tf32, backend=self.backend,
            validate=False,
        )

    def _output(self, y: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
        B, H, T, D = y.shape
        y = self.norm(y.to(self.norm.weight.dtype)).transpose(1, 2).reshape(B, T, H * D)
        return self.to_out(y.to(self.to_out.weight.dtype)).to(dtype)

    # ----------------------------------------------------------------------------------- public
    def forward(self, x: torch.Tensor, state: Optional[NeuralMemoryState] = None,
                return_state: Optional[bool] = None):
        """Read ``x [B, T, dim]`` into the memory and retrieve with its queries.

        Args:
            x: ``[B, T, dim]``.
            state: where to start (None: the learned initial memory); never modified.
            return_state: also return the state after ``x`` (to continue the sequence later).

        Returns ``y [B, T, dim]``, or ``(y, new_state)`` with ``return_state=True``. Not passing
        ``return_state`` returns ``(y, new_state)`` with a DeprecationWarning (the calling convention
        before the rule "a module returns its output; extra information only on request"); from the
        next release the default is ``False``.
        """
        if return_state is None:
            warnings.warn(
                "NeuralMemory(x, state) returning (y, state) is deprecated: pass return_state=True to keep "
                "getting the state, or return_state=False for y alone (the default from the next release)",
                DeprecationWarning, stacklevel=2,
            )
            return_state = True
        y, new_state = self._forward(x, state)
        return (y, new_state) if return_state else y

    def _forward(self, x: torch.Tensor, state: Optional[NeuralMemoryState]):
        self._check_x(x, state)
        if state is None:
            state = self.initial_state(x.shape[0], x.device)
        B, T, _ = x.shape
        if T == 0:  # nothing to read or learn: an empty output, the state as it was
            return x.new_zeros(x.shape), state
        q, k, v, conv_cache = self._project(x, state.conv_cache)
        theta, alpha, eta = self._gates(x)
        # Resume the unfinished chunk from its start so chunk boundaries match a single call.
        new = (k, v, theta, alpha, eta)
        n_old = 0 if state.pending[0] is None else state.pending[0].shape[2]
        seq = tuple(
            None if t is None else (t if n_old == 0 else torch.cat([old.to(t.dtype), t], dim=2))
            for old, t in zip(state.pending, new)
        )
        q_all = q if n_old == 0 else torch.cat([q.new_zeros(B, self.heads, n_old, self.head_dim), q], dim=2)
        L = n_old + T
        cut = (L // self.chunk_size) * self.chunk_size

        def part(sl):
            return tuple(None if t is None else t[:, :, sl] for t in seq)

        weights, momentum = state.chunk_weights, state.chunk_momentum
        ys = []
        if cut > 0:
            kk, vv, th, al, et = part(slice(0, cut))
            y, weights, momentum = self._run(q_all[:, :, :cut], kk, vv, th, al, et, weights, momentum)
            ys.append(y)
        chunk_weights, chunk_momentum = weights, momentum
        if cut < L:
            kk, vv, th, al, et = part(slice(cut, L))
            y, weights, momentum = self._run(q_all[:, :, cut:], kk, vv, th, al, et, weights, momentum)
            ys.append(y)
        y = torch.cat(ys, dim=2)[:, :, n_old:]
        new_state = NeuralMemoryState(
            weights, momentum, chunk_weights, chunk_momentum, part(slice(cut, L)) if cut < L else (None,) * 5,
            conv_cache, state.seen + T,
        )
        return self._output(y, x.dtype), new_state

    def read(self, x: torch.Tensor, state: Optional[NeuralMemoryState] = None) -> torch.Tensor:
        """Retrieve without learning: ``M(q)`` for queries projected from ``x [B, T, dim]``.

        Uses the memory after the state's last token (the initial memory when ``state`` is None)
        and the query projection without the convolution (so no convolution state is consumed).
        Returns ``[B, T, dim]``. Reads no tensor data on the host (a decode step stays sync-free):
        a non-finite ``x`` gives a non-finite output and changes nothing.
        """
        self._check_x(x, state, finite=False)
        if state is None:
            state = self.initial_state(x.shape[0], x.device)
        inner = self.heads * self.head_dim
        q = F.linear(x, self.to_qkv.weight[:inner])
        q = F.normalize(self._heads(F.silu(q)), dim=-1).float()
        y = memory_apply([w.float() for w in state.weights], q)
        return self._output(y, x.dtype)


class StatefulNeuralMemory(nn.Module, MemoryModule):
    """A ``NeuralMemory`` (``neural_memory``) with its state per batch row in registered buffers.

    ``forward(x)`` reads ``x`` into each row's memory and returns the memory's output, exactly as
    ``NeuralMemory`` called on the whole history would (pieces of any length); ``forward(x,
    learn=False)`` retrieves without learning (``NeuralMemory.read``). The state is the memory-state
    protocol's: buffers (``.to()`` moves them, ``state_dict`` saves and loads them), ``bind_batch``,
    ``reset_memory(rows)`` (a reset row starts over from the learned initial memory with nothing
    pending: a fresh start whatever its history length), ``memory_batch_size``.

    Buffers (``B`` rows; none until ``bind_batch`` or the first learning call fixes ``B``):
    ``weights_<i>``/``momentum_<i>`` (memory after the last token), ``chunk_weights_<i>``/
    ``chunk_momentum_<i>`` (at the start of the unfinished chunk), ``pending_<k|v|theta|alpha|eta>``
    (the unfinished chunk's tokens, the first ``pending_len[b]`` of ``chunk_size - 1`` slots valid),
    ``conv_cache`` and ``seen`` (tokens read per row). Rows may hold unfinished chunks of different
    lengths (after a reset); a learning call runs once per distinct length.

    Args:
        neural_memory: the memory whose parameters read and learn.

    Example:
        >>> import torch, memlayers as ml
        >>> mem = ml.StatefulNeuralMemory(ml.NeuralMemory(dim=32, heads=2, chunk_size=16))
        >>> y = mem(torch.randn(2, 20, 32))      # rows 0 and 1 learn 20 tokens
        >>> mem.reset_memory(rows=[1])           # row 1 starts over
        >>> mem(torch.randn(2, 5, 32)).shape
        torch.Size([2, 5, 32])
    """

    def __init__(self, neural_memory: NeuralMemory):
        super().__init__()
        if not isinstance(neural_memory, NeuralMemory):
            raise TypeError(f"neural_memory must be a NeuralMemory, got {type(neural_memory).__name__}")
        self.neural_memory = neural_memory
        for name, t in self._fresh(0).items():
            self.register_buffer(name, t)

    # ------------------------------------------------------------------ layout
    def _fresh(self, batch_size: int) -> Dict[str, torch.Tensor]:
        """Every buffer for ``batch_size`` fresh rows, on the module's device."""
        m = self.neural_memory
        B, H, D, n = batch_size, m.heads, m.head_dim, m.chunk_size - 1
        p = m.to_qkv.weight
        out = {}
        for i, w in enumerate(m.init_weights):
            init = w.detach().float().unsqueeze(0).expand(B, *w.shape)
            out[f"weights_{i}"] = init.clone()
            out[f"chunk_weights_{i}"] = init.clone()
            if m.use_momentum:
                out[f"momentum_{i}"] = torch.zeros_like(out[f"weights_{i}"])
                out[f"chunk_momentum_{i}"] = torch.zeros_like(out[f"weights_{i}"])
        out["pending_k"] = p.new_zeros(B, H, n, D)
        out["pending_v"] = p.new_zeros(B, H, n, D)
        for gate, used in (("theta", True), ("alpha", m.use_forget), ("eta", m.use_momentum)):
            if used:
                out[f"pending_{gate}"] = torch.zeros(B, H, n, device=p.device)
        out["pending_len"] = torch.zeros(B, dtype=torch.long, device=p.device)
        if m.conv is not None:
            out["conv_cache"] = p.new_zeros(B, 3 * H * D, m.conv_size - 1)
        out["seen"] = torch.zeros(B, dtype=torch.long, device=p.device)
        return out

    def _list(self, name: str) -> Optional[Tuple[torch.Tensor, ...]]:
        if not hasattr(self, f"{name}_0"):
            return None
        return tuple(getattr(self, f"{name}_{i}") for i in range(self.neural_memory.depth))

    def _pending(self, gate: str) -> Optional[torch.Tensor]:
        return getattr(self, f"pending_{gate}", None)

    # ------------------------------------------------------------------ protocol
    @property
    def memory_batch_size(self) -> Optional[int]:
        B = self.seen.shape[0]
        return B or None

    def bind_batch(self, batch_size: int) -> None:
        """Give the state ``batch_size`` fresh rows (what it held is dropped)."""
        check_positive_int("batch_size", batch_size)
        for name, t in self._fresh(batch_size).items():
            setattr(self, name, t.to(getattr(self, name).dtype))

    @torch.no_grad()
    def reset_memory(self, rows=None) -> None:
        """Forget the chosen rows (None: all): each starts over from the learned initial memory, with
        no unfinished chunk and an empty convolution cache. Other rows are left bit for bit."""
        B = self.seen.shape[0]
        mask = row_mask(rows, B, self.seen.device)
        if B == 0:
            return
        fresh = self._fresh(1)
        for name, t in fresh.items():
            buf = getattr(self, name)
            buf[mask] = t.to(buf.dtype)

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys,
                              error_msgs):
        # A saved state of another batch size loads: the buffers take its row count first. Checked
        # before anything changes: a state that does not fit leaves the module as it was.
        lens = state_dict.get(prefix + "pending_len")
        if lens is not None and lens.numel() and (int(lens.min()) < 0 or int(lens.max()) >= self.neural_memory.chunk_size):
            error_msgs.append(f"StatefulNeuralMemory {prefix.rstrip('.')}: pending_len must lie in "
                              f"0..{self.neural_memory.chunk_size - 1}, got {lens.tolist()}")
            return
        seen = state_dict.get(prefix + "seen")
        if seen is not None and seen.dim() == 1 and seen.shape[0] != self.seen.shape[0]:
            expected = {name: t.shape for name, t in self._fresh(seen.shape[0]).items()}
            bad = [n for n, shape in expected.items()
                   if prefix + n in state_dict and state_dict[prefix + n].shape != shape]
            if bad:
                error_msgs.append(f"StatefulNeuralMemory {prefix.rstrip('.')}: saved buffers {bad} do not fit "
                                  f"this memory's shape for {seen.shape[0]} rows")
                return
            for name, t in self._fresh(seen.shape[0]).items():
                setattr(self, name, t.to(getattr(self, name).dtype))
        super()._load_from_state_dict(state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys,
                                      error_msgs)

    # ------------------------------------------------------------------ reading and learning
    def state(self, rows: Optional[torch.Tensor] = None, pending: int = 0) -> NeuralMemoryState:
        """The ``NeuralMemoryState`` of the chosen rows (None: all), whose unfinished chunk holds
        ``pending`` tokens (every chosen row's ``pending_len``). Tensors are copies of the buffers."""

        def take(t):
            if t is None:
                return None
            return (t if rows is None else t[rows]).clone()

        def take_all(ts):  # memories in fp32, whatever dtype the module was cast to
            return None if ts is None else tuple(take(t).float() for t in ts)

        pend = tuple(None if t is None else take(t)[:, :, :pending] if pending else None
                     for t in (self.pending_k, self.pending_v, self._pending("theta"), self._pending("alpha"),
                               self._pending("eta")))
        return NeuralMemoryState(
            take_all(self._list("weights")), take_all(self._list("momentum")), take_all(self._list("chunk_weights")),
            take_all(self._list("chunk_momentum")), pend, take(getattr(self, "conv_cache", None)), 0,
        )

    def forward(self, x: torch.Tensor, learn: bool = True) -> torch.Tensor:
        """``x [B, T, dim] -> y [B, T, dim]``. ``learn=True`` reads ``x`` into each row's memory
        (binding ``B`` rows when none are bound); ``learn=False`` retrieves from the memory after
        each row's last token and changes nothing."""
        B = self.memory_batch_size
        if not learn:
            if B is None:
                return self.neural_memory.read(x)
            return self.neural_memory.read(x, NeuralMemoryState(self._list("weights"), None, (), None, (None,) * 5,
                                                                None, 0))
        if isinstance(x, torch.Tensor) and x.dim() == 3 and B is not None and x.shape[0] != B:
            raise ValueError(f"x has {x.shape[0]} batch rows but the memory holds {B}; reset_memory() and "
                             "bind_batch to change the batch size")
        self.neural_memory._check_x(x, None)  # before any state changes
        if B is None:
            self.bind_batch(x.shape[0])
        # Rows whose unfinished chunks differ in length (after a reset) learn in separate calls, so
        # that every row's chunk boundaries are its own history's.
        lens = self.pending_len.tolist()  # a host read per learning call, never when only reading
        groups: Dict[int, List[int]] = {}
        for b, n in enumerate(lens):
            groups.setdefault(n, []).append(b)
        if len(groups) == 1:
            return self._learn(x, None, lens[0])
        y = None
        for n, ids in groups.items():
            rows = torch.tensor(ids, device=x.device)
            part = self._learn(x[rows], rows, n)
            if y is None:
                y = part.new_empty(x.shape[0], *part.shape[1:])
            y[rows] = part
        return y

    def _learn(self, x: torch.Tensor, rows: Optional[torch.Tensor], pending: int) -> torch.Tensor:
        y, new = self.neural_memory._forward(x, self.state(rows, pending))
        new = new.detach()  # truncated back-propagation: the stored state carries no graph

        def put(buf, value):
            with torch.no_grad():
                if rows is None:
                    buf.copy_(value)
                else:
                    buf[rows] = value.to(buf.dtype)

        for name in ("weights", "momentum", "chunk_weights", "chunk_momentum"):
            for buf, value in zip(self._list(name) or (), getattr(new, name) or ()):
                put(buf, value)
        n = 0 if new.pending[0] is None else new.pending[0].shape[2]
        for gate, value in zip(("k", "v", "theta", "alpha", "eta"), new.pending):
            buf = self._pending(gate)
            if buf is None:
                continue
            padded = torch.zeros_like(buf if rows is None else buf[rows])
            if n:
                padded[:, :, :n] = value
            put(buf, padded)
        put(self.pending_len, torch.full_like(self.pending_len if rows is None else self.pending_len[rows], n))
        if new.conv_cache is not None:
            put(self.conv_cache, new.conv_cache)
        put(self.seen, (self.seen if rows is None else self.seen[rows]) + x.shape[1])
        return y


__all__ = ["MEMORIES", "NeuralMemory", "NeuralMemoryState", "StatefulNeuralMemory"]
