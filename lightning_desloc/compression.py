"""Wire formats for compressed averaging, chosen per category (parameters, each state key), and the
coded round that carries them.

A compressed category is not all-reduced. Each rank turns its flat tensor into a float32 *message*
(the value itself, or for int8 parameters its change since the anchor plus error feedback, below);
for a group of M ranks a coded reduce-scatter and an all-gather then average the messages:

1. the message is cut into M consecutive parts of :meth:`~Int8Codec.part_numel` elements (the last ones
   shorter or empty; :func:`part_numels`) and each part is encoded alone (:func:`encode_parts`); one
   ``all_to_all_single`` hands part ``j`` of every rank to rank ``j``. For int8 a part is a whole number
   of scale chunks, so the parts' encodings decode to exactly what the whole message's would, and
   together they are exactly as long as it (``codec.nbytes(numel)``);
2. rank ``j`` decodes the M encodings of its part, adds them in float32 in rank order, divides by M and
   encodes that mean part again;
3. one all-gather (every rank's encoded mean parts, zero padded to the longest rank's) hands every
   rank all M mean parts, which every rank decodes: every rank applies the same bytes, so all ranks
   end bit-identical (results and anchors).

Each compressed category travels in buckets (:func:`bucket_numels`): consecutive ranges of its flat
elements whose float32 message is at most ``bucket_cap_bytes`` (at least ``granule * M`` elements, a
multiple of it but for the last bucket), each averaged by steps 1-3 with its own two collectives; a
bucket may cut a tensor in two. As every bucket but the last is a whole number of scale chunks per
rank, the parts, their scales and every decoded value are what one message of the whole category would
give, and the buckets' encodings add up to ``codec.nbytes(numel)``. Step 2's second encoding rounds the
mean once more. That rounding is part of the common result every rank applies, so it causes no drift
between ranks; it is in no rank's error feedback. For delta-coded parameters it is not lost either:
the next message is measured from the anchor, which includes it, so the next round corrects it. For
states it is one more rounding of the mean (bf16: the mean is rounded to bfloat16; int8: to the scales
of the mean part).

Bytes: the ledger records per compressed category the codec's encoded size of the message,
``codec.nbytes(numel)``, once per message, as an exact category records ``numel * element_size`` of
its tensors once; it is exactly what a rank hands to the reduce-scatter. On the wire, for exact
categories (a ring all-reduce, or for bfloat16/float16 buckets a reduce-scatter plus an all-gather, see
:mod:`lightning_desloc.averaging`) and for coded ones alike, each rank sends and receives about
``2 (M - 1) / M`` times the counted payload (the all-gather's padding is under one part), whereas the
previous all-gather of every rank's whole encoded message moved ``M - 1`` times it. A rank decodes and
holds one part's float32 sum instead of M decoded messages.

* ``"bf16"``: the values rounded to bfloat16, 2 bytes per element.
* ``"int8"``: per chunk of ``chunk`` elements a float32 scale ``s = max|x| / 127`` and
  ``q = round(x / s)`` as int8: ``1 + 4 / chunk`` bytes per element. For non-negative states (second
  moments) the square root is coded instead, which halves the dynamic range, and a value never
  decodes to exactly zero (it decodes to at least ``(s / 2)^2``) so ``u / sqrt(v)`` stays bounded.

Parameters coded as int8 are sent as the difference to the last consensus (the *anchor*, equal on
every rank) with error feedback: what rounding left out of one message is added to the next, so
the error does not accumulate (Seide et al. 2014; Karimireddy et al. 2019). With ``Q`` the int8
round trip of step 1 and ``Q'`` that of step 2::

    m_i = x_i - anchor + e_i          e_i <- m_i - Q(m_i)
    x   = anchor + Q'(mean_i Q(m_i));  anchor <- x

Example::

    >>> codec = Int8Codec(chunk=4)
    >>> x = torch.tensor([0.5, -1.0, 0.25, 0.0, 3.0, 3.0, -3.0, 1.5])
    >>> codec.nbytes(x.numel())       # 8 int8 values + 2 float32 scales
    16
    >>> codec.decode(codec.encode(x), x.numel())
    tensor([ 0.5039, -1.0000,  0.2520,  0.0000,  3.0000,  3.0000, -3.0000,  1.5118])
    >>> part_numels(codec, 9, parts=2)  # 3 scale chunks over 2 parts: 2 chunks, then the rest
    [8, 1]
    >>> parts = encode_parts(codec, torch.arange(9.0), parts=2)
    >>> [p.numel() for p in parts]      # 8 int8 values + 2 scales, 1 + 1; codec.nbytes(9) == 21
    [16, 5]
    >>> decode_parts(codec, parts, [8, 1])
    tensor([0.0000, 0.9921, 2.0079, 3.0000, 4.0236, 5.0157, 6.0079, 7.0000, 8.0000])
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Optional, Union

import torch
from torch import Tensor
from torch.optim import Optimizer

from lightning_desloc.schedule import SECOND_MOMENT_KEYS
from lightning_desloc.options import SyncOption, one_optimizer
from lightning_desloc.snapshot import ConsensusSnapshot

WIRE_FORMATS = ("none", "bf16", "int8")
Compression = Union[str, Mapping[str, str], None]


class Bf16Codec:
    name = "bf16"
    #: elements coded together: parts and buckets are cut at multiples of it (bfloat16: any element)
    granule = 1

    def nbytes(self, numel: int) -> int:
        return 2 * numel

    def part_numel(self, numel: int, parts: int) -> int:
        """Elements in each of ``parts`` consecutive parts of a ``numel``-element message (the last
        ones shorter): whole parts fill every rank's but the last ones'."""
        return math.ceil(numel / parts)

    def encode(self, flat: Tensor) -> Tensor:
        return flat.to(torch.bfloat16).view(torch.uint8)

    def decode(self, payload: Tensor, numel: int) -> Tensor:
        # clone: a slice of a shared buffer may start at an odd byte, and view() needs alignment
        return payload.clone().view(torch.bfloat16).float()


@dataclass
class Int8Codec:
    chunk: int = 256
    non_negative: bool = False
    name: str = "int8"

    def nbytes(self, numel: int) -> int:
        return numel + 4 * math.ceil(numel / self.chunk)

    @property
    def granule(self) -> int:
        """Elements coded together (one scale): parts and buckets are cut at multiples of it."""
        return self.chunk

    def part_numel(self, numel: int, parts: int) -> int:
        """Elements in each of ``parts`` consecutive parts of a ``numel``-element message (the last
        ones shorter): a whole number of scale chunks, so the parts' scales are the whole message's."""
        return math.ceil(math.ceil(numel / self.chunk) / parts) * self.chunk

    def _chunks(self, flat: Tensor) -> Tensor:
        pad = (-flat.numel()) % self.chunk
        return torch.nn.functional.pad(flat.float(), (0, pad)).view(-1, self.chunk)

    def encode(self, flat: Tensor) -> Tensor:
        x = self._chunks(flat.clamp(min=0).sqrt() if self.non_negative else flat)
        scale = x.abs().amax(dim=1, keepdim=True) / 127
        q = torch.where(scale > 0, x / scale.clamp(min=torch.finfo(torch.float32).tiny), 0).round().clamp(-127, 127)
        q = q.to(torch.int8).view(-1)[: flat.numel()]
        return torch.cat([q.view(torch.uint8), scale.view(-1).view(torch.uint8)])

    def decode(self, payload: Tensor, numel: int) -> Tensor:
        n_chunks = math.ceil(numel / self.chunk)
        q = payload[:numel].view(torch.int8).float()
        # clone: the scales start at byte `numel`, rarely a multiple of 4, and view() needs alignment
        scale = payload[numel : numel + 4 * n_chunks].clone().view(torch.float32)
        q = torch.nn.functional.pad(q, (0, n_chunks * self.chunk - numel)).view(n_chunks, self.chunk)
        if self.non_negative:
            q = q.clamp(min=0.5)  # never zero: a second moment of 0 would divide by eps
        x = (q * scale.view(-1, 1)).view(-1)[:numel]
        return x.square() if self.non_negative else x


def part_numels(codec: Any, numel: int, parts: int) -> list[int]:
    """The elements of each of the ``parts`` consecutive parts a ``numel``-element message is cut into:
    ``codec.part_numel(numel, parts)`` each, the last ones shorter or empty."""
    size = codec.part_numel(numel, parts)
    return [max(0, min(size, numel - j * size)) for j in range(parts)]


def bucket_numels(codec: Any, numel: int, cap_bytes: int, parts: int) -> list[int]:
    """The elements of the consecutive buckets a compressed category of ``numel`` elements travels in:
    as many elements as a float32 message of ``cap_bytes`` holds, rounded down to a multiple of
    ``codec.granule * parts`` (at least one such multiple), the last bucket the rest. Each bucket but the
    last splits into ``parts`` parts of whole scale chunks, so the buckets' scales are the whole
    category's and their encodings add up to ``codec.nbytes(numel)``.

        >>> bucket_numels(Int8Codec(chunk=4), 50, cap_bytes=64, parts=2)   # 16 elements: 2 parts of 2 chunks
        [16, 16, 16, 2]
    """
    align = codec.granule * parts
    size = max(align, cap_bytes // 4 // align * align)
    return [min(size, numel - start) for start in range(0, numel, size)]


def encode_parts(codec: Any, message: Tensor, parts: int) -> list[Tensor]:
    """``message`` cut into the parts of :func:`part_numels`, each encoded alone (uint8; an empty part
    encodes to nothing). Their lengths add up to ``codec.nbytes(message.numel())``."""
    out, offset = [], 0
    for numel in part_numels(codec, message.numel(), parts):
        part = message[offset : offset + numel]
        out.append(codec.encode(part) if numel else torch.empty(0, dtype=torch.uint8, device=message.device))
        offset += numel
    return out


def decode_parts(codec: Any, encodings: Sequence[Tensor], numels: Sequence[int]) -> Tensor:
    """The float32 concatenation of the decoded ``encodings``, one per part of ``numels`` elements."""
    return torch.cat([codec.decode(e, n) for e, n in zip(encodings, numels) if n])


def make_codec(wire: str, key: str, chunk: int = 256):
    if wire == "bf16":
        return Bf16Codec()
    if wire == "int8":
        return Int8Codec(chunk=chunk, non_negative=key in SECOND_MOMENT_KEYS)
    raise ValueError(f"unknown wire format {wire!r}; choose one of {WIRE_FORMATS}")


def parse_compression(compression: Compression) -> dict[str, str]:
    """Normalise the ``compression`` argument to ``{category_key: wire}``; ``"*"`` means every key.

    Keys are ``"params"``, ``"states"`` (every optimizer state) or a state key (``"exp_avg"``).
    """
    if compression is None:
        return {}
    if isinstance(compression, str):
        compression = {"*": compression}
    out: dict[str, str] = {}
    for key, wire in compression.items():
        if wire not in WIRE_FORMATS:
            raise ValueError(
                f"compression[{key!r}] = {wire!r} is not a wire format; choose one of {WIRE_FORMATS}, "
                f"e.g. compression={{'params': 'bf16', 'states': 'int8'}}"
            )
        if wire != "none":
            out[str(key)] = wire
    return out


def _widened(m: Tensor, other: Tensor) -> Tensor:
    """``m``, converted to ``other``'s dtype when that is wider (float64)."""
    wider = torch.promote_types(m.dtype, other.dtype)
    return m if wider == m.dtype else m.to(wider)


@dataclass
class CompressedCategory:
    """Per-rank memory of one compressed category: the residual of error feedback (delta coding only).

    A delta-coded category (int8 parameters) is sent as its change since ``anchor``, the consensus
    snapshot the core owns and refreshes after every parameter average."""

    codec: object
    delta: bool = False
    anchor: Optional[ConsensusSnapshot] = None
    residual: Optional[Tensor] = None

    def _anchor(self, like: Tensor, start: int = 0) -> Tensor:
        """The anchor's elements ``[start, start + like.numel())`` (zeros before the first snapshot)."""
        if self.anchor is None or self.anchor.flat is None:
            return torch.zeros_like(like)
        return self.anchor.flat[start : start + like.numel()]

    def message(self, flat: Tensor, start: int = 0) -> Tensor:
        """What this rank sends (before encoding): the value, or its change since the anchor, plus
        feedback; ``flat`` holds the category's elements ``[start, start + flat.numel())`` (a bucket)."""
        return self.message_(flat.to(torch.float32, copy=True), start)

    def message_(self, m: Tensor, start: int = 0) -> Tensor:
        """:meth:`message` of a float32 ``m`` this rank owns, computed in place where the dtypes allow
        (a wider anchor or residual, float64, widens it first, as ``m - anchor`` would)."""
        if not self.delta:
            return m
        if self.anchor is not None and self.anchor.flat is not None:
            anchor = self.anchor.flat[start : start + m.numel()]
            m = _widened(m, anchor).sub_(anchor)
        if self.residual is not None:
            residual = self.residual[start : start + m.numel()]
            m = _widened(m, residual).add_(residual)
        return m

    def remember(self, sent: Tensor, decoded_own: Tensor, result: Optional[Tensor] = None, start: int = 0,
                 total: Optional[int] = None) -> None:
        """Keep what encoding left out of this rank's message ``sent``: ``decoded_own`` is what the
        other ranks decoded of it (the first encoding; the second one, of the mean, is common to all
        ranks and reaches the next message through the anchor, which ``result`` becomes). ``sent`` holds
        the category's elements from ``start`` on, of ``total`` (by default ``sent``'s): that slice of
        the residual is overwritten in place (a round allocates no new residual once there is one)."""
        if not self.delta:
            return
        n = sent.numel()
        total = n if total is None else total
        r = self.residual
        if r is None or r.numel() != total or r.dtype != sent.dtype or r.device != sent.device:
            if start == 0 and n == total:
                self.residual = sent - decoded_own
                return
            self.residual = torch.zeros(total, dtype=sent.dtype, device=sent.device)
        torch.sub(sent, decoded_own, out=self.residual[start : start + n])

    def finish(self, mean: Tensor, start: int = 0) -> Tensor:
        """The new value of the category's elements ``[start, start + mean.numel())`` from their mean."""
        return self._anchor(mean, start) + mean if self.delta else mean


@dataclass
class CompressionPlan:
    """Which categories travel compressed, and the per-rank memory they need.

    ``anchor`` is the consensus snapshot delta-coded categories are sent against (the core's; a test
    may hold its own and refresh it after each round)."""

    wires: dict[str, str] = field(default_factory=dict)
    chunk: int = 256
    anchor: Optional[ConsensusSnapshot] = None
    categories: dict[str, CompressedCategory] = field(default_factory=dict)

    @property
    def needs_snapshot(self) -> bool:
        """Whether the parameters are delta coded (int8), and so need the consensus snapshot."""
        return (self.wires.get("params") or self.wires.get("*")) == "int8"

    def for_category(self, category: str) -> Optional[CompressedCategory]:
        """The memory of ``category`` (``params`` or ``state/<key>``), or None when it is sent as is.

        Only the schedule's parameter and state averages are compressed; buffers, evaluation and
        checkpoint rounds stay exact.
        """
        if category.startswith("state/"):
            key = category[len("state/") :]
            wire = self.wires.get(key) or self.wires.get("states") or self.wires.get("*")
        elif category == "params":
            key, wire = category, self.wires.get("params") or self.wires.get("*")
        else:
            return None
        if wire is None:
            return None
        if category not in self.categories:
            delta = wire == "int8" and category == "params"
            self.categories[category] = CompressedCategory(make_codec(wire, key, self.chunk), delta=delta,
                                                           anchor=self.anchor if delta else None)
        return self.categories[category]

    def forget(self) -> None:
        """Drop every residual (a resume on the consensus path: no rank's own error is kept)."""
        for cat in self.categories.values():
            cat.residual = None

    def state_dict(self) -> dict:
        """Each delta-coded category's residual (this rank's own; the anchor is the core's snapshot). The
        live tensor, not a copy (a save writes it at once; a round updates it in place: copy it to keep it)."""
        return {k: {"residual": c.residual} for k, c in self.categories.items() if c.delta}

    def load_state_dict(self, state: Mapping, device: Optional[torch.device] = None) -> None:
        for category, mem in state.items():
            cat = self.for_category(category)
            if cat is not None and mem.get("residual") is not None:
                residual = mem["residual"]
                # a copy: rounds update the residual in place, and the loaded tensor belongs to the caller
                cat.residual = residual.to(device if device is not None else residual.device, copy=True)


class CompressionOption(SyncOption):
    """``compression=...`` as an option of the core: the wire format of the outermost level's rounds
    (:attr:`plan`, handed to the round) and each rank's error-feedback residuals, saved in its shard."""

    name = "compression"
    shared = False  # the residuals are this rank's own

    def __init__(self, wires: Mapping[str, str], snapshot: ConsensusSnapshot, chunk: int = 256) -> None:
        self.plan = CompressionPlan(dict(wires), chunk=chunk, anchor=snapshot)
        self.needs_snapshot = self.plan.needs_snapshot

    def attach(self, core: Any, optimizers: Sequence[Optimizer]) -> None:
        one_optimizer(optimizers, "compression and outer_lr")

    def state_dict(self) -> dict[str, Any]:
        return self.plan.state_dict()

    def load_state_dict(self, state: Optional[dict[str, Any]], device: Optional[torch.device] = None) -> None:
        self.plan.forget()
        if state:
            self.plan.load_state_dict(state, device)
