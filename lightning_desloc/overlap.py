"""How a round's result reaches the tensors: at once (``overlap_steps=0``) or ``tau`` steps later.

The core picks one of two executors at construction and calls the same three methods on every step,
so the step never branches on the variant:

* :class:`BlockingRounds` (``overlap_steps=0``, the default): the round due after step ``s`` is
  all-reduced and copied back before step ``s + 1`` starts, as DES-LOC is defined.
* :class:`OverlappedRounds` (``overlap_steps=tau >= 1``): the round due after step ``s`` starts
  asynchronously on flat copies of what is due (the copies are the snapshot) and training goes on; the
  result is applied right after step ``s + tau``. Every rank keeps the progress it made meanwhile::

      x   <- mean_m(x_s) + (x_{s+tau} - x_s)                              parameters, floating buffers
      k   <- d * mean_m(k_s) + (k_{s+tau} - d * k_s),   d = beta_k ** tau  each due optimizer state k

  A round that must land early (the end of training, a round ``on_nonfinite`` runs before a save, both
  applied at once) uses the steps it was really in flight, ``e < tau``, for ``tau`` (``d = beta_k ** e``):
  one that lands right after it started (``e = 0``) leaves exactly the mean, as a blocking round does.

  For an exponential moving average ``k_t = beta k_{t-1} + (1 - beta) f(g_t)`` (Adam's ``exp_avg``
  with ``beta1`` and ``exp_avg_sq`` with ``beta2``, SGD's ``momentum_buffer`` with ``momentum``,
  RMSprop's ``square_avg`` with ``alpha``), ``k_{s+tau} - d k_s`` is exactly what the rank's own
  gradients added since step ``s``, so the rule equals "average at ``s``, then ``tau`` local steps".
  It is today's rule at ``tau = 0`` (``d = 1``, ``k_{s+tau} = k_s``), and a second moment stays
  non-negative: both terms are (the sum is clamped at 0 against rounding). A state whose decay is not
  known (AMSGrad's ``max_exp_avg_sq``, Adagrad's ``sum``) takes ``d = 1``, clamped at 0 if it is a
  second moment. The rules preserve the mean over ranks, so the consensus (what a checkpoint's main
  file, consensus validation and the end of training hold) does not depend on whether a round is
  still in flight.

* ``overlap_local_weight=lam < 1`` shrinks the parameters' part of that difference between ranks. A
  rank's own progress since the snapshot is its share of the mean progress plus its own deviation;
  only the deviation drives the ranks apart, yet with ``tau`` close to ``K_x`` it stays in the tensors
  for most of the next period (the ranks never meet). The rule keeps ``lam`` of the rank's own progress
  and replaces the rest by the consensus's progress over the last period, extrapolated to the ``e``
  steps the round was in flight (``e = tau`` unless the round lands early)::

      x <- mean_m(x_s) + lam (x_{s+e} - x_s) + (1 - lam) (e / P) (mean_m(x_s) - mean_m(x_{s-P}))

  where ``s - P`` is the step of the previous round that averaged the same parameters (``P = K_x``).
  Every rank adds the same extrapolation, so the ranks differ by ``lam`` times their deviations; the
  mean moves by ``(1 - lam)`` times the extrapolation's error, which the next rounds average like any
  other progress. ``lam = 1`` (the default) is the rule above. A rank keeps the last mean of the
  parameters it averaged (1x their payload, in the round's dtype, saved with its checkpoint); the
  first round of a run, or of a consensus resume, has no previous mean and keeps ``lam = 1``. Floating
  buffers and optimizer states keep their rules.

With ``on_nonfinite`` each rank's flag ``c_m`` (whether what the round carries is finite at step ``s``)
is computed on the device when the round starts; a rank with ``c_m = 0`` sends (and keeps as its
snapshot) zeros, and the flags ride on the round's control tensor. At landing the means are first
rescaled by ``M / n`` (``n`` the finite ranks: the mean of the finite ranks, exactly the unguarded mean
when ``n = M``), then the rules above apply on a rank with ``c_m = 1``; a rank with ``c_m = 0`` (whose
progress since ``s`` is not finite) takes the mean alone: ``x <- mean_good(x_s)``,
``k <- d * mean_good(k_s)`` (clamped at 0 for a second moment), selected with ``torch.where`` on its own
0-dim device flag kept from the start (:class:`~lightning_desloc.nonfinite.NonfiniteGuard`).

While a round is in flight each rank holds two flat copies of what it carries (the sent snapshot and
the buffer the result arrives in): 2x the round's payload. On CUDA the all-reduce runs on the process
group's own stream (``async_op=True``) and ``wait()`` only orders the current stream after it: no host
synchronisation. On gloo it runs on gloo's threads.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Callable, Optional

import torch
from torch import Tensor
from torch.optim import Optimizer

from lightning_desloc.averaging import unflatten_into
from lightning_desloc.schedule import SECOND_MOMENT_KEYS, SyncPlan

#: the tensors a plan of optimizer ``index`` averages, by ledger category (the core's ``_due_tensors``)
DueTensors = Callable[[int, SyncPlan], dict[str, list[Tensor]]]

#: ``on_landed(means by category, control mean)``: a round's means have arrived, before they are applied
OnLanded = Callable[[dict[str, list[Tensor]], Tensor], None]

#: state key -> the hyper-parameter of its decay: (name in the param group, index into it or None)
_DECAY_OF: dict[str, tuple[str, Optional[int]]] = {
    "exp_avg": ("betas", 0),
    "exp_avg_sq": ("betas", 1),
    "momentum_buffer": ("momentum", None),
    "square_avg": ("alpha", None),
}


def state_decay(optimizer: Optimizer, key: str) -> Optional[float]:
    """The per-step decay ``beta`` of state ``key`` of ``optimizer`` (its first param group's), or ``None``
    when the state is not known to be an exponential moving average."""
    name, index = _DECAY_OF.get(key, ("", None))
    group = optimizer.param_groups[0]
    if name not in group:
        return None
    value = group[name] if index is None else group[name][index]
    return float(value.item() if isinstance(value, Tensor) else value)


@dataclass
class PendingRound:
    """A round in flight: started after step ``plan.step`` of optimizer ``index``, applied after ``apply_at``."""

    index: int
    plan: SyncPlan
    apply_at: int
    #: category -> per bucket: this rank's snapshot (flat) and the buffer the mean arrives in
    buckets: dict[str, list[tuple[Tensor, Tensor]]] = field(default_factory=dict)
    works: list[Any] = field(default_factory=list)
    #: ``on_nonfinite``: a 0-dim bool device tensor, True where this rank's values did not count (its
    #: snapshot holds zeros and it takes the mean alone at landing); ``None`` without the guard
    drop: Optional[Tensor] = None

    def wait(self) -> None:
        for work in self.works:
            work.wait()
        self.works = []


class BlockingRounds:
    """``overlap_steps=0``: a round is applied as soon as it is issued."""

    overlap_steps = 0

    #: whether a round's result is in the tensors when :meth:`average` returns
    applies_now = True

    def average(self, comm: Any, tensors: Mapping[str, Sequence[Tensor]], *, index: int, plan: SyncPlan,
                bucket_cap_bytes: int, on_control: Callable[[Tensor], None], compression: Any = None,
                contribution: Any = None, on_landed: Optional[OnLanded] = None) -> None:
        """Average ``tensors`` now (``contribution``: whether this rank's values count, ``on_nonfinite``);
        ``on_landed(means by category, control mean)`` once the means are in (here: in ``tensors``)."""
        if contribution is None:  # the keyword only reaches the comm when set: a comm without it still works
            comm.average_(tensors, bucket_cap_bytes=bucket_cap_bytes, compression=compression)
        else:
            comm.average_(tensors, bucket_cap_bytes=bucket_cap_bytes, compression=compression,
                          contribution=contribution)
        if tensors.get("control"):
            on_control(tensors["control"][0])
            if on_landed is not None:
                on_landed({cat: list(ts) for cat, ts in tensors.items() if cat != "control"}, tensors["control"][0])

    def apply_due(self, index: int, step: int, optimizer: Optimizer, due_tensors: DueTensors,
                  on_control: Callable[[Tensor], None], everything: bool = False,
                  on_landed: Optional[OnLanded] = None) -> bool:
        """Apply the rounds of optimizer ``index`` due after its step ``step`` (all of them with
        ``everything``); whether one was applied."""
        return False

    def finish(self) -> None:
        """Nothing is ever in flight."""

    @property
    def in_flight(self) -> int:
        return 0

    def state_dict(self) -> Optional[list[dict[str, Any]]]:
        return None

    def load_state_dict(self, state: Any, device: Optional[torch.device] = None) -> None:
        """Nothing to restore."""

    def progress_state_dict(self) -> Optional[list[dict[str, Any]]]:
        return None

    def load_progress_state_dict(self, state: Any, device: Optional[torch.device] = None) -> None:
        """Nothing to restore."""


class OverlappedRounds(BlockingRounds):
    """``overlap_steps=tau``: a round is applied ``tau`` optimizer steps after the step that made it due,
    by the rules in the module docstring."""

    def __init__(self, overlap_steps: int, local_weight: float = 1.0) -> None:
        self.overlap_steps = overlap_steps
        self.local_weight = local_weight
        self.pending: list[PendingRound] = []
        #: ``local_weight < 1``: (optimizer, fragments, bucket) -> (step of the round, its parameter mean)
        self.previous_means: dict[tuple[int, tuple[int, ...], int], tuple[int, Tensor]] = {}

    applies_now = False

    def average(self, comm: Any, tensors: Mapping[str, Sequence[Tensor]], *, index: int, plan: SyncPlan,
                bucket_cap_bytes: int, on_control: Callable[[Tensor], None], compression: Any = None,
                contribution: Any = None, on_landed: Optional[OnLanded] = None) -> None:
        tensors = {cat: list(ts) for cat, ts in tensors.items() if ts}
        if not tensors:
            return
        if not comm.distributed:  # one process: every mean is this rank's own value, nothing changes
            if tensors.get("control"):
                on_control(tensors["control"][0])
                if on_landed is not None:  # the guard's correction (M / n = 1 / c_0) and its bookkeeping
                    on_landed({cat: ts for cat, ts in tensors.items() if cat != "control"}, tensors["control"][0])
            return
        pending = PendingRound(index, plan, plan.step + self.overlap_steps)
        if contribution is None:  # the keyword only reaches the comm when set: a comm without it still works
            pending.buckets, pending.works = comm.start_average(tensors, bucket_cap_bytes=bucket_cap_bytes)
        else:
            pending.buckets, pending.works = comm.start_average(tensors, bucket_cap_bytes=bucket_cap_bytes,
                                                                contribution=contribution)
            pending.drop = contribution.drop
        self.pending.append(pending)

    def apply_due(self, index: int, step: int, optimizer: Optimizer, due_tensors: DueTensors,
                  on_control: Callable[[Tensor], None], everything: bool = False,
                  on_landed: Optional[OnLanded] = None) -> bool:
        due = [p for p in self.pending if p.index == index and (everything or p.apply_at <= step)]
        for pending in due:
            pending.wait()
            elapsed = step - pending.plan.step  # tau, unless the round lands early (everything=True)
            mix = self._consensus_progress(pending, elapsed) if self.local_weight < 1 else None
            _apply(pending, optimizer, due_tensors(index, pending.plan), elapsed, on_control, on_landed, mix=mix)
            self.pending.remove(pending)
        return bool(due)

    def _consensus_progress(self, pending: PendingRound, elapsed: int) -> Callable[[int, Tensor, Tensor], Tensor]:
        """``overlap_local_weight``: ``mix(bucket, x, mean)`` turns ``x = mean + own`` (a parameter bucket
        after the delayed rule) into ``mean + lam own + (1 - lam) (e / P) (mean - previous mean)`` (module
        docstring) and keeps ``mean`` as the bucket's previous mean."""
        fragments = tuple(f for f, has_params, _ in pending.plan.parts if has_params)
        lam = self.local_weight

        def mix(bucket: int, x: Tensor, mean: Tensor) -> Tensor:
            key = (pending.index, fragments, bucket)
            previous = self.previous_means.get(key)
            self.previous_means[key] = (pending.plan.step, mean.clone())
            if previous is None or elapsed <= 0:  # the first round of a run (or of a consensus resume)
                return x
            prev_step, prev_mean = previous
            mean_ = mean.to(x.dtype)
            rate = (1 - lam) * elapsed / (pending.plan.step - prev_step)
            return x.sub_(mean_).mul_(lam).add_(mean_).add_(mean_ - prev_mean.to(x.dtype), alpha=rate)

        return mix

    def finish(self) -> None:
        """Wait until every round in flight has arrived (they are still applied at their step)."""
        for pending in self.pending:
            pending.wait()

    def progress_state_dict(self) -> Optional[list[dict[str, Any]]]:
        """``overlap_local_weight < 1``: the last parameter means (``None`` without)."""
        if self.local_weight >= 1:
            return None
        return [{"index": index, "fragments": list(fragments), "bucket": bucket, "step": step, "mean": mean}
                for (index, fragments, bucket), (step, mean) in self.previous_means.items()]

    def load_progress_state_dict(self, state: Any, device: Optional[torch.device] = None) -> None:
        """Restore :meth:`progress_state_dict` (``None``: start without, e.g. a consensus resume)."""
        self.previous_means = {
            (int(e["index"]), tuple(int(f) for f in e["fragments"]), int(e["bucket"])):
                (int(e["step"]), e["mean"].to(device) if device is not None else e["mean"])
            for e in state or []}

    @property
    def in_flight(self) -> int:
        return len(self.pending)

    def state_dict(self) -> Optional[list[dict[str, Any]]]:
        """The rounds in flight (arrived: :meth:`finish` first): this rank's snapshots and the means."""
        self.finish()
        return [{"index": p.index, "plan": [p.plan.step, p.plan.params, list(p.plan.states), p.plan.reset_states],
                 "parts": [[f, params, list(states)] for f, params, states in p.plan.parts],
                 "apply_at": p.apply_at,
                 "buckets": {cat: [[mine, mean] for mine, mean in b] for cat, b in p.buckets.items()},
                 **({"drop": p.drop} if p.drop is not None else {})}
                for p in self.pending]

    def load_state_dict(self, state: Any, device: Optional[torch.device] = None) -> None:
        """Restore the rounds in flight of a same-size resume (``None``: none, e.g. the consensus path)."""
        self.pending = []
        for entry in state or []:
            step, params, states, reset = entry["plan"]
            parts = tuple((int(f), bool(p), tuple(ks)) for f, p, ks in entry.get("parts", []))
            plan = SyncPlan(int(step), bool(params), tuple(states), bool(reset), parts=parts)
            buckets = {cat: [(mine.to(device) if device is not None else mine,
                              mean.to(device) if device is not None else mean) for mine, mean in b]
                       for cat, b in entry["buckets"].items()}
            drop = entry.get("drop")
            if drop is not None and device is not None:
                drop = drop.to(device)
            self.pending.append(PendingRound(int(entry["index"]), plan, int(entry["apply_at"]), buckets, drop=drop))


def _apply(pending: PendingRound, optimizer: Optimizer, tensors: Mapping[str, Sequence[Tensor]], elapsed: int,
           on_control: Callable[[Tensor], None], on_landed: Optional[OnLanded] = None,
           mix: Optional[Callable[[int, Tensor, Tensor], Tensor]] = None) -> None:
    """The rules of the module docstring, bucket by bucket, on the live ``tensors`` of the round's plan,
    ``elapsed`` steps after its snapshot (``tau``, or fewer when it lands early; ``d = beta ** elapsed``):
    first the control values arrive and ``on_landed`` sees the means (``on_nonfinite`` rescales them to
    the finite ranks' mean, in place), then each bucket is applied; a rank whose ``drop`` flag is set
    takes ``decay * mean`` alone (``torch.where`` on the device flag: no host read). ``mix(bucket, x, mean)``
    (``overlap_local_weight``) reshapes each parameter bucket first."""
    with torch.no_grad():
        control = pending.buckets.get("control")
        if control:
            on_control(control[0][1])
            if on_landed is not None:
                on_landed({cat: [mean for _, mean in b] for cat, b in pending.buckets.items() if cat != "control"},
                          control[0][1])
        for cat, buckets in pending.buckets.items():
            if cat == "control":
                continue
            key = cat[len("state/"):] if cat.startswith("state/") else None
            beta = state_decay(optimizer, key) if key is not None else None
            decay = 1.0 if beta is None else beta ** elapsed
            for i, (live, (mine, mean)) in enumerate(zip(_match(tensors[cat], buckets), buckets)):
                now = torch.cat([t.detach().reshape(-1) for t in live])
                # own progress first, then the mean: a round landing at once (now == mine, d = 1) leaves
                # exactly the mean, bit for bit the same on every rank
                new = now.sub_(mine.to(now.dtype), alpha=decay).add_(mean.to(now.dtype), alpha=decay)
                if mix is not None and cat == "params":
                    new = mix(i, new, mean)
                if pending.drop is not None:  # a rank left out: its progress since the snapshot is not finite
                    drop = pending.drop if pending.drop.device == new.device else pending.drop.to(new.device)
                    new = torch.where(drop, mean.to(new.dtype) * decay, new)
                if key in SECOND_MOMENT_KEYS:
                    new.clamp_(min=0)
                unflatten_into(new, live)


def _match(tensors: Sequence[Tensor], buckets: Sequence[tuple[Tensor, Tensor]]) -> list[list[Tensor]]:
    """Split ``tensors`` (grouped by dtype and device, in order) into the buckets of the flats' sizes."""
    by_kind: dict[tuple[torch.dtype, torch.device], list[Tensor]] = defaultdict(list)
    for t in tensors:
        by_kind[(t.dtype, t.device)].append(t)
    ordered = [t for same in by_kind.values() for t in same]
    out, i = [], 0
    for mine, _ in buckets:
        bucket, n = [], 0
        while n < mine.numel():
            bucket.append(ordered[i])
            n += ordered[i].numel()
            i += 1
        out.append(bucket)
    return out


__all__ = ["BlockingRounds", "OverlappedRounds", "PendingRound", "state_decay"]
