"""Point-to-point messages between pipeline ranks (batched ``isend``/``irecv``).

A *message* is the list of tensors one stage hands to its neighbour for one micro-batch: the
activations (a stage's outputs) or the gradients w.r.t. them. Messages between an ordered pair of
ranks form a *channel*; both sides know the whole schedule, so both know the order in which the
sender posts the channel's messages, and the receiver always posts its receives in that same
order. That makes matching independent of tags (NCCL ignores tags) and of when the receiver needs
each message, so no order of posting can pair the wrong tensors or deadlock on a mismatch.

Shapes come either from a fixed list given per instance (``shapes``/``dtype``, the convention of
DeepSeek's ``set_p2p_tensor_shapes``: every message carries those tensors) or from a small int64
header sent before each message (shape, dtype, requires-grad and presence of every tensor), so
stages may return several tensors of any shapes and dtypes, some without gradient.

A rank whose step failed finishes its part of the plan with :meth:`P2PComm.drain`: messages it
never computed go out as placeholders (zeros of the agreed shapes, or a *failure header*, count
-1, where the receiver expects a header), and it receives everything its peers send, so no peer
waits for a message that never comes. A receiver that meets a failure header raises
:class:`~.coordination.PipelineFailure`.

Sends are queued after the compute that produces them; :meth:`P2PComm.issue` issues the groups of
the comm plan (:mod:`.comm_plan`, one ``batch_isend_irecv`` each) and a step waits only for its
own receives. Send works are kept (their tensors alive) until they complete or the step ends.
Headers make the host wait for a group that may hold payload sends, so the runtime allows them
on gloo only.

gloo (CPU): ``batch_isend_irecv`` issues each op as its own asynchronous ``isend``/``irecv`` and
returns one work per op; sends complete without waiting for the receiver's compute, and matching
is in posting order per (peer, tag). NCCL: the batch is one NCCL group, and waiting on any of its
works waits for the whole group; the same code runs with CUDA tensors.
"""

from __future__ import annotations

from collections.abc import Hashable, Sequence
from dataclasses import dataclass, field

import torch
import torch.distributed as dist

from .comm_plan import Group
from .coordination import PipelineFailure
from .walk import ChannelCursor

MAX_DIMS = 8
_FIELDS = 4 + MAX_DIMS  # present, requires_grad, dtype code, ndim, dims...

_DTYPES: tuple[torch.dtype, ...] = (
    torch.float32, torch.float64, torch.float16, torch.bfloat16, torch.int64, torch.int32,
    torch.int16, torch.int8, torch.uint8, torch.bool, torch.complex64, torch.complex128,
)
_DTYPE_CODE = {d: i for i, d in enumerate(_DTYPES)}
FAILED = -1  # tensor count of a failure header


@dataclass(frozen=True)
class TensorMeta:
    """What a receiver needs to allocate one tensor of a message."""

    shape: tuple[int, ...]
    dtype: torch.dtype
    requires_grad: bool


def encode_header(tensors: Sequence[torch.Tensor | None], max_tensors: int,
                  device: torch.device) -> torch.Tensor:
    """Header of a message: count, then per tensor (present, requires_grad, dtype, ndim, dims)."""
    if len(tensors) > max_tensors:
        raise ValueError(f"a stage boundary carries {len(tensors)} tensors, more than "
                         f"max_tensors={max_tensors}; raise max_tensors")
    h = [0] * (1 + max_tensors * _FIELDS)
    h[0] = len(tensors)
    for i, t in enumerate(tensors):
        if t is None:
            continue
        if t.dim() > MAX_DIMS:
            raise ValueError(f"tensor {i} of a message has {t.dim()} dims, at most {MAX_DIMS} "
                             "are supported")
        if t.dtype not in _DTYPE_CODE:
            raise TypeError(f"tensor {i} of a message has unsupported dtype {t.dtype}")
        base = 1 + i * _FIELDS
        h[base:base + 4] = [1, int(t.requires_grad), _DTYPE_CODE[t.dtype], t.dim()]
        h[base + 4:base + 4 + t.dim()] = list(t.shape)
    return torch.tensor(h, dtype=torch.int64, device=device)


def failure_header(max_tensors: int, device: torch.device) -> torch.Tensor:
    """The header a failed rank sends in place of a message it never computed."""
    h = torch.zeros(1 + max_tensors * _FIELDS, dtype=torch.int64, device=device)
    h[0] = FAILED
    return h


def decode_header(header: torch.Tensor) -> list[TensorMeta | None] | None:
    """Inverse of :func:`encode_header`; ``None`` for a failure header."""
    h = header.tolist()
    if h[0] == FAILED:
        return None
    out: list[TensorMeta | None] = []
    for i in range(h[0]):
        base = 1 + i * _FIELDS
        present, rg, code, ndim = h[base:base + 4]
        if not present:
            out.append(None)
            continue
        shape = tuple(h[base + 4:base + 4 + ndim])
        out.append(TensorMeta(shape, _DTYPES[code], bool(rg)))
    return out


@dataclass
class _Incoming:
    """Receive state of one message."""

    src: int
    tensors: list[torch.Tensor | None] | None = None
    works: list = field(default_factory=list)
    requires_grad: list[bool] = field(default_factory=list)
    done: bool = False


class P2PComm:
    """Channel-ordered batched P2P for one pipeline step.

    ``group_ranks`` maps pipeline rank -> rank in ``group``. ``plan[(src, dst)]`` is the ordered
    list of message keys ``src`` sends to ``dst`` in this step (both sides compute it from the
    schedule); ``groups`` this rank's comm-plan groups, issued in that order. ``fixed`` (per
    message kind) gives fixed tensor shapes instead of headers; ``known`` the shapes of the
    messages agreed on an earlier step (no headers for them).
    """

    def __init__(self, group: dist.ProcessGroup | None, group_ranks: Sequence[int], me: int,
                 device: torch.device, plan: dict[tuple[int, int], list[Hashable]],
                 groups: Sequence[Group], fixed: dict[str, list[TensorMeta]] | None = None,
                 max_tensors: int = 16,
                 known: dict[Hashable, list[TensorMeta | None]] | None = None) -> None:
        self.group = group
        self.global_ranks = [dist.get_global_rank(group, g) if group is not None else g
                             for g in group_ranks]
        self.me = me
        self.device = device
        self.fixed = fixed
        self.max_tensors = max_tensors
        # how far this rank has posted its receives and queued its sends on each channel
        self._in_cursor = ChannelCursor(plan, me, "recv")
        self._out_cursor = ChannelCursor(plan, me, "send")
        self._incoming: dict[Hashable, _Incoming] = {}
        self._queued: dict[Hashable, list[dist.P2POp]] = {}
        self._send_works: list = []
        self._keep: list[torch.Tensor] = []
        self.bytes_sent = 0
        self.known = known
        self.seen: dict[Hashable, list[TensorMeta | None]] = {}
        self.headers = 0
        self._groups = list(groups)
        self._issued = 0  # groups of the plan issued so far
        self._draining = False

    # ------------------------------------------------------------------ helpers
    def _peer(self, rank: int) -> int:
        return self.global_ranks[rank]

    def _op(self, fn, tensor: torch.Tensor, rank: int) -> dist.P2POp:
        return dist.P2POp(fn, tensor, self._peer(rank), self.group)

    def _issue(self, ops: list[dist.P2POp]) -> list:
        """Issue ``ops`` as one batch; one work per op. Backends return either one work per
        op (gloo) or one for the whole batch (NCCL's coalesced group: waiting on it waits for
        every op), which then stands for each op; anything else is an error, since the step
        could not tell when its tensors are ready or free."""
        if not ops:
            return []
        works = list(dist.batch_isend_irecv(ops) or [])
        if len(works) == len(ops):
            return works
        if len(works) == 1:
            return works * len(ops)
        raise RuntimeError(f"rank {self.me}: batch_isend_irecv returned {len(works)} works for "
                           f"{len(ops)} operations; expected one per operation or one in all")

    @staticmethod
    def _kind(key: Hashable) -> str:
        return key[0] if isinstance(key, tuple) else "activation"  # type: ignore[index]

    # ------------------------------------------------------------------ send side
    def send(self, key: Hashable, dst: int, tensors: Sequence[torch.Tensor | None]) -> None:
        """Queue ``tensors`` for ``dst``; issued with the plan's group that sends ``key``."""
        ops: list[dist.P2POp] = []
        fixed = self.fixed.get(self._kind(key)) if self.fixed is not None else None
        if fixed is not None:
            payload = self._fixed_payload(key, tensors, fixed)
        else:
            metas = [None if t is None else TensorMeta(tuple(t.shape), t.dtype, t.requires_grad)
                     for t in tensors]
            if self.known is not None and key in self.known:
                if metas != self.known[key]:
                    raise RuntimeError(
                        f"rank {self.me}: message {key} changed shapes since the last step with "
                        "the same input shapes; build the pipeline with cache_shapes=False")
            else:
                header = encode_header(tensors, self.max_tensors, self.device)
                ops.append(self._op(dist.isend, header, dst))
                self._keep.append(header)
                self.headers += 1
                self.seen[key] = metas
            payload = [t.detach() for t in tensors if t is not None]
        for t in payload:
            t = t.contiguous()
            self._keep.append(t)
            self.bytes_sent += t.numel() * t.element_size()
            ops.append(self._op(dist.isend, t, dst))
        self._advance_out(key, dst)
        self._queued[key] = ops

    def _advance_out(self, key: Hashable, dst: int) -> None:
        if self._out_cursor.take(dst, key) is None:
            raise RuntimeError(f"rank {self.me}: send {key} to rank {dst} is out of the "
                               "schedule's channel order")

    def _fixed_payload(self, key: Hashable, tensors: Sequence[torch.Tensor | None],
                       fixed: list[TensorMeta]) -> list[torch.Tensor]:
        if len(tensors) != len(fixed):
            raise ValueError(f"message {key} has {len(tensors)} tensors but the p2p shapes "
                             f"given list {len(fixed)}")
        out = []
        for t, m in zip(tensors, fixed):
            if t is None:
                t = torch.zeros(m.shape, dtype=m.dtype, device=self.device)
            if tuple(t.shape) != m.shape or t.dtype != m.dtype:
                raise ValueError(f"message {key}: tensor of shape {tuple(t.shape)} and dtype "
                                 f"{t.dtype} does not match the p2p shape {m.shape}, {m.dtype}")
            out.append(t.detach())
        return out

    def issue(self, group: Group) -> None:
        """Issue one group of the comm plan as one ``batch_isend_irecv``: its sends (queued by
        :meth:`send`) first, then its receives. With headers (gloo only, see the runtime), each
        received message's header is waited for and its payload posted before the next one,
        keeping every channel's op order the same on both sides."""
        if self._issued >= len(self._groups) or self._groups[self._issued] != group:
            raise RuntimeError(f"rank {self.me}: comm-plan group issued out of order")
        self._issued += 1
        ops: list[dist.P2POp] = []
        for key, _dst in group.sends:
            if key not in self._queued:
                raise RuntimeError(f"rank {self.me}: the plan sends {key} before it is computed")
            ops += self._queued.pop(key)
        incs: list[_Incoming] = []
        headered: list[tuple[Hashable, int]] = []
        for key, src in group.recvs:
            if self._in_cursor.take(src, key) is None:
                raise RuntimeError(f"rank {self.me}: receive of {key} from rank {src} is out "
                                   "of the schedule's channel order")
            inc = _Incoming(src)
            fixed = self.fixed.get(self._kind(key)) if self.fixed is not None else None
            if fixed is not None:
                metas: list[TensorMeta | None] | None = list(fixed)
            elif self.known is not None and key in self.known:
                metas = self.known[key]
            else:
                metas = None
            self._incoming[key] = inc
            if metas is None:
                headered.append((key, src))
                continue
            self._post_payload(inc, metas, src, ops)
            incs.append(inc)
        self._issue_pending(ops, incs)
        failed_peer: int | None = None
        for key, src in headered:  # gloo: a header is waited for before its payload is posted
            header = torch.empty(1 + self.max_tensors * _FIELDS, dtype=torch.int64,
                                 device=self.device)
            for w in self._issue([self._op(dist.irecv, header, src)]):
                w.wait()
            metas = decode_header(header)
            self.headers += 1
            inc = self._incoming[key]
            if metas is None:  # the sender failed and sends nothing more of this message
                inc.tensors, inc.works, inc.requires_grad = [], [], []
                failed_peer = src if failed_peer is None else failed_peer
                continue
            self.seen[key] = metas
            payload: list[dist.P2POp] = []
            self._post_payload(inc, metas, src, payload)
            self._issue_pending(payload, [inc])
        self._reap()
        if failed_peer is not None and not self._draining:
            raise PipelineFailure(f"rank {self.me}: rank {failed_peer} failed during the step")

    def _reap(self) -> None:
        if self._send_works and all(w.is_completed() for w in self._send_works):
            self._send_works = []
            self._keep = []

    # ------------------------------------------------------------------ receive side
    def _post_payload(self, inc: _Incoming, metas: list[TensorMeta | None], src: int,
                      ops: list[dist.P2POp]) -> None:
        """Append to ``ops`` the receives of a message's tensors; ``inc.works`` keeps their
        positions in ``ops`` until :meth:`_issue_pending` turns them into works."""
        inc.tensors, inc.works = [], []
        for m in metas:
            if m is None:
                inc.tensors.append(None)
                continue
            t = torch.empty(m.shape, dtype=m.dtype, device=self.device)
            inc.tensors.append(t)
            ops.append(self._op(dist.irecv, t, src))
            inc.works.append(len(ops) - 1)
        inc.requires_grad = [m is not None and m.requires_grad for m in metas]

    def _issue_pending(self, ops: list[dist.P2POp], incs: list[_Incoming]) -> None:
        """Issue ``ops`` as one batch; turn the op indices stored in ``incs`` into works."""
        works = self._issue(ops)
        recv_idx = {i for inc in incs for i in inc.works if isinstance(i, int)}
        self._send_works.extend(w for i, w in enumerate(works) if i not in recv_idx)
        for inc in incs:
            inc.works = [works[i] if isinstance(i, int) else i for i in inc.works]

    def wait(self, needs: Sequence[Hashable]) -> list[list[torch.Tensor | None]]:
        """Wait for the messages ``needs`` (posted by earlier groups of the plan); returns their
        tensors (``None`` for absent ones), with ``requires_grad`` as the sender's had it."""
        out = []
        for key in needs:
            if key not in self._incoming:
                raise RuntimeError(f"rank {self.me}: message {key} is needed but the plan has "
                                   "not posted its receive")
            inc = self._incoming.pop(key)
            for w in inc.works:
                w.wait()
            for t, rg in zip(inc.tensors, inc.requires_grad):  # type: ignore[arg-type]
                if t is not None and rg:
                    t.requires_grad_(True)
            inc.done = True
            out.append(inc.tensors)  # type: ignore[arg-type]
        self._reap()
        return out

    def finish(self) -> None:
        """End of step: wait for every send, check nothing is left unsent or unused."""
        if self._queued:
            raise RuntimeError(f"rank {self.me}: sends never issued: {list(self._queued)}")
        for w in self._send_works:
            w.wait()
        self._send_works = []
        self._keep = []
        left = [k for k, i in self._incoming.items() if not i.done]
        if left:
            raise RuntimeError(f"rank {self.me}: messages received but never used: {left}")

    def drain(self) -> None:
        """After a failure on this rank: issue the rest of the plan, with placeholders for the
        messages never computed, and wait for every receive and send, so that every peer's
        matching operations complete."""
        self._draining = True
        for group in self._groups[self._issued:]:
            for key, dst in group.sends:
                if key not in self._queued:
                    self._queue_placeholder(key, dst)
            self.issue(group)
        for inc in self._incoming.values():
            for w in inc.works:
                w.wait()
        for w in self._send_works:
            w.wait()
        self._incoming.clear()
        self._queued.clear()
        self._send_works = []
        self._keep = []

    def _queue_placeholder(self, key: Hashable, dst: int) -> None:
        """Queue zeros of the message's agreed shapes, or a failure header when the receiver
        expects a header."""
        fixed = self.fixed.get(self._kind(key)) if self.fixed is not None else None
        metas = fixed if fixed is not None else (self.known or {}).get(key)
        if metas is None:
            self._advance_out(key, dst)
            header = failure_header(self.max_tensors, self.device)
            self._keep.append(header)
            self._queued[key] = [self._op(dist.isend, header, dst)]
            return
        self.send(key, dst, [None if m is None else
                             torch.zeros(m.shape, dtype=m.dtype, device=self.device
                                         ).requires_grad_(m.requires_grad)
                             for m in metas])


__all__ = ["FAILED", "MAX_DIMS", "P2PComm", "TensorMeta", "decode_header", "encode_header",
           "failure_header"]
