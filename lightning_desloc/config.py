"""One keyword-only configuration for DES-LOC, validated in one place.

:class:`DeslocConfig` holds every knob; the optional mechanisms have small sub-configs that are
``None`` when off (:class:`OuterConfig`, :class:`HierarchyConfig`, :class:`DriftConfig`) or only read
when their feature is on (:class:`AutoConfig` with ``param_sync_every="auto"``). Every config is a
frozen dataclass and checks itself at construction, so a wrong value fails before any process starts,
with a message that names the fix.

The Lightning adapters (:class:`~lightning_desloc.DeslocStrategy`,
:class:`~lightning_desloc.fabric.DeslocFabricStrategy`) keep a flat, typed signature that LightningCLI
sees, and turn it into a config with :meth:`DeslocConfig.from_arguments`; the documentation of each
argument lives once, in :data:`ARGUMENT_DOCS`, and is put into their docstrings from there.

Example::

    >>> cfg = DeslocConfig.from_arguments(param_sync_every=64, outer_lr=0.7)
    >>> cfg.param_sync_every, cfg.outer
    (64, OuterConfig(lr=0.7, momentum=0.9, nesterov=True))
    >>> cfg.schedule().state_sync_every["exp_avg_sq"]      # the paper's 6 * K_x
    384
    >>> DeslocConfig(param_sync_every=0)
    Traceback (most recent call last):
    ...
    ValueError: param_sync_every must be a positive integer number of optimizer steps, got 0. Pass e.g. param_sync_every=256.
"""

from __future__ import annotations

import textwrap
import warnings
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field, fields
from typing import Any, Literal, Optional, Union

from lightning_desloc.compression import Compression, parse_compression
from lightning_desloc.groups import GRADIENTS_EVERY_STEP, make_group_schedule
from lightning_desloc.nonfinite import NONFINITE_MODES, OnNonfinite
from lightning_desloc.schedule import FragmentedSchedule, StatePolicy, StateSyncEvery, SyncSchedule

ValidateOn = Literal["consensus", "local"]
ParamSyncEvery = Union[int, Literal["auto"]]
#: default largest flat buffer of one collective, MiB
DEFAULT_BUCKET_CAP_MB = 64.0


@dataclass(frozen=True, kw_only=True)
class OuterConfig:
    """The DiLoCo-style outer SGD step on each parameter average (:mod:`lightning_desloc.outer`)."""

    #: outer learning rate; ``1`` with ``momentum=0`` is plain averaging
    lr: float
    #: outer momentum in ``[0, 1)``
    momentum: float = 0.9
    #: Nesterov momentum (ignored when ``momentum == 0``)
    nesterov: bool = True

    def __post_init__(self) -> None:
        if not _is_number(self.lr) or not self.lr > 0:
            raise ValueError(f"outer_lr must be a positive learning rate, got {self.lr!r}")
        if not _is_number(self.momentum) or not 0 <= self.momentum < 1:
            raise ValueError(f"outer_momentum must be in [0, 1), got {self.momentum!r}")


@dataclass(frozen=True, kw_only=True)
class HierarchyConfig:
    """Groups of consecutive ranks with a fast level inside (:mod:`lightning_desloc.groups`)."""

    #: ranks per group (e.g. the devices of one node)
    group_size: int
    #: the inner level's period in optimizer steps: ``1`` all-reduces gradients every step, ``k > 1``
    #: averages parameters within the group every ``k`` steps
    param_sync_every: int = GRADIENTS_EVERY_STEP
    #: the inner level's state periods (as ``state_sync_every``); only with ``param_sync_every > 1``
    state_sync_every: StateSyncEvery = None

    def __post_init__(self) -> None:
        g = self.group_size
        if isinstance(g, bool) or not isinstance(g, int) or g < 1:
            raise ValueError(f"group_size must be a positive number of ranks per group, got {g!r}")


@dataclass(frozen=True, kw_only=True)
class AutoConfig:
    """``param_sync_every="auto"``: the periods chosen from measured times (:mod:`lightning_desloc.adaptive`)."""

    #: fraction of the step time communication may take, in ``(0, 1)``
    comm_budget: float = 0.05
    #: parameter averages the run keeps at least (caps ``K_x`` when the run length is known)
    min_param_syncs: int = 32
    #: local steps timed before the first (timed) parameter average
    warmup_steps: int = 16

    def __post_init__(self) -> None:
        if self.warmup_steps < 2:
            raise ValueError(f"auto periods need at least 2 warm-up steps to time a step, got {self.warmup_steps}")
        if not _is_number(self.comm_budget) or not 0 < self.comm_budget < 1:
            raise ValueError(f"comm_budget is a fraction of the step time in (0, 1), got {self.comm_budget!r}")
        if not (isinstance(self.min_param_syncs, int) and self.min_param_syncs >= 1):
            raise ValueError(f"min_param_syncs is a number of parameter averages per run (>= 1), got "
                             f"{self.min_param_syncs!r}; use 1 to let the time budget alone decide")


@dataclass(frozen=True, kw_only=True)
class DriftConfig:
    """An early parameter average when the ranks drift apart (:class:`~lightning_desloc.adaptive.DriftTrigger`)."""

    #: bound on ``||x_i - xbar|| / ||xbar||`` (max over ranks) above which the parameters are averaged
    max_drift: float
    #: optimizer steps between drift checks (each all-reduces one float)
    check_every: int = 16

    def __post_init__(self) -> None:
        if not _is_number(self.max_drift) or not self.max_drift > 0:
            raise ValueError(f"max_drift must be a positive relative distance, got {self.max_drift!r}")
        if isinstance(self.check_every, bool) or not isinstance(self.check_every, int) or self.check_every < 1:
            raise ValueError(f"drift_check_every must be a positive number of steps, got {self.check_every!r}")


@dataclass(frozen=True, kw_only=True)
class DeslocConfig:
    """Everything DES-LOC is told; built once, validated at construction. See :data:`ARGUMENT_DOCS`."""

    #: ``K_x``: optimizer steps between parameter averages, or ``"auto"``
    param_sync_every: ParamSyncEvery = 256
    #: periods of the optimizer states (``None``: ``3 K_x`` first moments, ``6 K_x`` second moments)
    state_sync_every: StateSyncEvery = None
    #: ``"average"`` (DES-LOC), or the baselines ``"keep_local"`` and ``"reset"``
    state_policy: StatePolicy = "average"
    #: wire format per category, normalised to ``{key: "bf16" | "int8"}`` (empty: exact)
    compression: Mapping[str, str] = field(default_factory=dict)
    #: the outer optimizer, ``None``: off
    outer: Optional[OuterConfig] = None
    #: hierarchical groups, ``None``: off
    hierarchy: Optional[HierarchyConfig] = None
    #: the policy of ``param_sync_every="auto"`` (read only then)
    auto: AutoConfig = field(default_factory=AutoConfig)
    #: the drift trigger, ``None``: off
    drift: Optional[DriftConfig] = None
    #: largest flat buffer of one collective, MiB (``2**20`` bytes)
    bucket_cap_mb: float = DEFAULT_BUCKET_CAP_MB
    #: what validation during fit evaluates: the ranks' mean (``"consensus"``) or each rank's own
    validate_on: ValidateOn = "consensus"
    #: send the ledger (``comm/...``) to the loggers after every round
    log_comm: bool = True
    #: on resume, start from the consensus instead of raising when a shard is bad
    allow_consensus_fallback: bool = False
    #: ``tau``: optimizer steps a round stays in flight before its result is applied (0: at once)
    overlap_steps: int = 0
    #: ``lam``: share of a rank's own parameter progress kept when an overlapped round lands (1: all of it)
    overlap_local_weight: float = 1.0
    #: ``N``: the first optimizer steps, trained as DDP (gradients all-reduced) before DES-LOC starts
    ddp_warmup_steps: int = 0
    #: ``F``: parameter fragments averaged at staggered offsets (1: the whole model in each round)
    fragments: int = 1
    #: seconds without a peer's heartbeat after which a rank exits (``None``: no liveness watchdog)
    peer_timeout_s: Optional[float] = 30.0
    #: a rank whose round is not finite: ``"raise"`` (every rank stops), ``"heal"``, or ``None`` (averaged in, as DDP)
    on_nonfinite: OnNonfinite = "raise"
    #: FSDP2 inside each hierarchical group, DES-LOC across groups on the local shards (:mod:`lightning_desloc.sharding`)
    shard_within_group: bool = False

    def __post_init__(self) -> None:
        object.__setattr__(self, "compression", parse_compression(self.compression))
        if self.param_sync_every == "auto":
            if self.state_sync_every is not None:
                raise ValueError("param_sync_every='auto' chooses the state periods too; leave state_sync_every=None")
        self.schedule()  # validates the periods and the state policy with the schedule's own messages
        self._check_sharding()
        if self.hierarchy is not None:
            self.group_schedule()  # validates the inner level against the rest
        if not _is_number(self.bucket_cap_mb) or not self.bucket_cap_mb > 0:
            raise ValueError(f"bucket_cap_mb must be a positive size in MiB, got {self.bucket_cap_mb!r}")
        if self.validate_on not in ("consensus", "local"):
            raise ValueError(f"validate_on must be 'consensus' or 'local', got {self.validate_on!r}")
        self._check_overlap()
        self._check_fragments()
        self._check_nonfinite()
        n = self.ddp_warmup_steps
        if isinstance(n, bool) or not isinstance(n, int) or n < 0:
            raise ValueError(f"ddp_warmup_steps must be a number of optimizer steps >= 0, got {n!r}; 0 starts "
                             "DES-LOC at the first step, e.g. ddp_warmup_steps=500 trains the first 500 as DDP")
        t = self.peer_timeout_s
        if t is not None and not (_is_number(t) and 0 < t < float("inf")):
            raise ValueError(f"peer_timeout_s must be a positive, finite number of seconds or None, got {t!r}; e.g. "
                             "peer_timeout_s=30 exits a rank whose peer sent no heartbeat for 30 s, None turns the "
                             "liveness watchdog off")

    def _check_sharding(self) -> None:
        """``shard_within_group=True``: groups needed, FSDP2 keeps each group in sync (``k_in = 1``), and the
        options that act on whole tensors or on the gradients are not supported on shards yet."""
        if not isinstance(self.shard_within_group, bool):
            raise ValueError(f"shard_within_group must be True or False, got {self.shard_within_group!r}")
        if not self.shard_within_group:
            return
        h = self.hierarchy
        if h is None:
            raise ValueError(
                "shard_within_group=True shards the model with FSDP2 inside each hierarchical group, but group_size "
                "is None. Set group_size (the ranks per group, e.g. the devices per node; it must divide the world "
                "size), or shard_within_group=False.")
        if h.param_sync_every != GRADIENTS_EVERY_STEP or h.state_sync_every is not None:
            raise ValueError(
                f"shard_within_group=True: FSDP2 reduce-scatters the gradients inside each group every step, so "
                f"group_param_sync_every={h.param_sync_every!r} / group_state_sync_every={h.state_sync_every!r} "
                "cannot apply. Leave group_param_sync_every=1 and group_state_sync_every=None, or "
                "shard_within_group=False for DES-LOC inside the groups.")
        # bf16 codes element by element (no residual, no snapshot): the same on a local shard as on the whole
        # tensor; int8's scale chunks and error feedback would follow the shard layout (untested)
        int8 = sorted(k for k, wire in self.compression.items() if wire != "bf16")
        unsupported = {f"compression={dict(self.compression)!r} (int8 for {int8}; bf16 works)": bool(int8),
                       "overlap_steps": self.overlap_steps != 0,
                       "fragments": self.fragments != 1, "outer_lr": self.outer is not None,
                       "max_drift": self.drift is not None, "param_sync_every='auto'": self.is_auto,
                       "ddp_warmup_steps": self.ddp_warmup_steps != 0,
                       "state_policy='reset'": self.state_policy == "reset"}
        clash = [name for name, on in unsupported.items() if on]
        if clash:
            raise ValueError(
                f"shard_within_group=True does not support {', '.join(clash)} yet (on shards only plain averaging "
                "of parameters and optimizer states works so far). Remove them, or use shard_within_group=False.")

    def _check_overlap(self) -> None:
        tau = self.overlap_steps
        if isinstance(tau, bool) or not isinstance(tau, int) or tau < 0:
            raise ValueError(f"overlap_steps must be a number of optimizer steps >= 0, got {tau!r}; 0 applies "
                             "every round at once, e.g. overlap_steps=2 applies it two steps later")
        lam = self.overlap_local_weight
        if isinstance(lam, bool) or not isinstance(lam, (int, float)) or not 0 <= lam <= 1:
            raise ValueError(f"overlap_local_weight must be a number in [0, 1], got {lam!r}; 1 (the default) keeps "
                             "each rank's whole progress since the round's snapshot, e.g. 0.25 keeps a quarter")
        if lam != 1 and tau == 0:
            raise ValueError(f"overlap_local_weight={lam} only applies to overlapped rounds; set overlap_steps >= 1 "
                             "(e.g. overlap_steps=7 with param_sync_every=8), or leave overlap_local_weight=1.0")
        if tau == 0:
            return
        others = {"param_sync_every='auto'": self.is_auto, "compression": bool(self.compression),
                  "outer_lr": self.outer is not None, "group_size": self.hierarchy is not None,
                  "max_drift": self.drift is not None, "state_policy='reset'": self.state_policy == "reset"}
        clash = [name for name, on in others.items() if on]
        if clash:
            raise ValueError(f"overlap_steps={tau} cannot be combined with {', '.join(clash)} yet; use "
                             "overlap_steps=0 with them, or drop them to overlap the rounds")
        schedule = self.schedule()
        periods = {"param_sync_every": schedule.param_sync_every,
                   **{f"state_sync_every[{k!r}]": v for k, v in schedule.state_sync_every.items()}}
        if schedule.uniform_state_period is not None:
            periods["state_sync_every"] = schedule.uniform_state_period
        short = {name: p for name, p in periods.items() if p <= tau}
        if short:
            raise ValueError(f"overlap_steps={tau} must be shorter than every period, so that a category has "
                             f"one round in flight at most; {short} are not. Use overlap_steps < "
                             f"{min(periods.values())} or longer periods.")

    def _check_nonfinite(self) -> None:
        """``on_nonfinite``: one of its values (it works with every other mechanism)."""
        mode = self.on_nonfinite
        if mode is not None and mode not in NONFINITE_MODES:
            raise ValueError(f"on_nonfinite must be None, 'heal' or 'raise', got {mode!r}; e.g. on_nonfinite='heal' "
                             "averages over the finite ranks and goes on, 'raise' (the default) stops every rank with "
                             "an error, None averages a NaN into every rank as DDP does")

    def _check_fragments(self) -> None:
        f = self.fragments
        if isinstance(f, bool) or not isinstance(f, int) or f < 1:
            raise ValueError(f"fragments must be a positive number of parameter fragments, got {f!r}")
        if f == 1:
            return
        others = {"param_sync_every='auto'": self.is_auto, "compression": bool(self.compression),
                  "outer_lr": self.outer is not None, "group_size": self.hierarchy is not None,
                  "max_drift": self.drift is not None}
        clash = [name for name, on in others.items() if on]
        if clash:
            raise ValueError(f"fragments={f} cannot be combined with {', '.join(clash)} yet (they act on the "
                             "whole model at each average); use fragments=1 with them")

    def check_state_keys(self, keys: Iterable[str]) -> None:
        """Raise a ``ValueError`` when ``state_sync_every``, ``group_state_sync_every`` or ``compression``
        name a state key none of the optimizers keeps (a typo would otherwise leave the default in force).
        ``keys``: the averaged state keys of every optimizer, known after each has stepped once."""
        have = sorted(set(keys))
        named = {"state_sync_every": self.state_sync_every,
                 "group_state_sync_every": None if self.hierarchy is None else self.hierarchy.state_sync_every,
                 "compression": {k: v for k, v in self.compression.items() if k not in ("params", "states", "*")}}
        for argument, value in named.items():
            unknown = sorted(set(value) - set(have)) if isinstance(value, Mapping) else []
            if unknown:
                raise ValueError(
                    f"{argument} names state key(s) {unknown} that no optimizer keeps; the optimizers' averaged "
                    f"state keys are {have or 'none'}" + ("" if argument != "compression" else
                                                           " (and 'params', 'states' for compression)")
                    + ". Fix the spelling or remove the entry."
                )

    @property
    def is_auto(self) -> bool:
        return self.param_sync_every == "auto"

    @property
    def bucket_cap_bytes(self) -> int:
        return int(self.bucket_cap_mb * 2**20)

    def schedule(self) -> SyncSchedule:
        """The schedule in force at the start. With ``"auto"``: the warm-up's, a single timed parameter
        average after ``auto.warmup_steps`` steps (the policy then chooses the rest)."""
        if self.is_auto:
            return SyncSchedule(self.auto.warmup_steps, None, self.state_policy)
        if self.fragments != 1:
            return FragmentedSchedule(self.param_sync_every, self.state_sync_every, self.state_policy,  # type: ignore[arg-type]
                                      fragments=self.fragments)
        return SyncSchedule(self.param_sync_every, self.state_sync_every, self.state_policy)  # type: ignore[arg-type]

    def group_schedule(self) -> Optional[SyncSchedule]:
        """The inner level's schedule: ``None`` without groups or with gradients all-reduced every step."""
        h = self.hierarchy
        if h is None:
            return None
        return make_group_schedule(h.group_size, h.param_sync_every, h.state_sync_every, self.state_policy,
                                   self.is_auto, None if self.drift is None else self.drift.max_drift)

    @classmethod
    def from_arguments(cls, **arguments: Any) -> "DeslocConfig":
        """The config from the adapters' flat arguments (names of :data:`ARGUMENT_DOCS`; the defaults are
        the config's own, so the adapters' explicit signatures are the only other place they are written)."""
        unknown = sorted(set(arguments) - set(ARGUMENT_DOCS) - {"validate_on"})
        if unknown:
            raise TypeError(f"unknown DES-LOC argument(s) {unknown}; see lightning_desloc.config.ARGUMENT_DOCS")
        args = {k: v for k, v in arguments.items() if k != "total_steps"}

        def take(**names: str) -> dict[str, Any]:  # sub-config field <- flat argument, when given
            return {field_: args.pop(arg) for field_, arg in names.items() if arg in args}

        outer = take(lr="outer_lr", momentum="outer_momentum", nesterov="outer_nesterov")
        hierarchy = take(group_size="group_size", param_sync_every="group_param_sync_every",
                         state_sync_every="group_state_sync_every")
        auto = take(comm_budget="comm_budget", min_param_syncs="min_param_syncs")
        drift = take(max_drift="max_drift", check_every="drift_check_every")
        if hierarchy.get("group_size") is None and (
                hierarchy.get("param_sync_every", GRADIENTS_EVERY_STEP) != GRADIENTS_EVERY_STEP
                or hierarchy.get("state_sync_every") is not None):
            raise ValueError(
                "group_param_sync_every and group_state_sync_every set the periods inside hierarchical groups, "
                "but group_size is None (no groups). Set group_size (e.g. the devices per node), or leave "
                "group_param_sync_every=1 and group_state_sync_every=None."
            )
        _warn_unused(outer, "outer_lr", OuterConfig, dict(momentum="outer_momentum", nesterov="outer_nesterov"), on="lr")
        _warn_unused(drift, "max_drift", DriftConfig, dict(check_every="drift_check_every"), on="max_drift")
        if args.get("param_sync_every") != "auto":
            _warn_unused(auto, "param_sync_every='auto'", AutoConfig,
                         dict(comm_budget="comm_budget", min_param_syncs="min_param_syncs"), on=None)
        return cls(
            **args,
            outer=OuterConfig(**outer) if outer.get("lr") is not None else None,
            hierarchy=HierarchyConfig(**hierarchy) if hierarchy.get("group_size") is not None else None,
            auto=AutoConfig(**auto),
            drift=DriftConfig(**drift) if drift.get("max_drift") is not None else None,
        )


def _warn_unused(given: Mapping[str, Any], feature: str, config: type, names: Mapping[str, str],
                 on: Optional[str]) -> None:
    """Warn about sub-config arguments (``names``: field -> argument) set away from their defaults while
    their feature is off. ``on``: the field whose value turns the feature on (``None``: it is off)."""
    if on is not None and given.get(on) is not None:
        return
    defaults = {f.name: f.default for f in fields(config)}
    changed = [arg for name, arg in names.items() if name in given and given[name] != defaults[name]]
    if changed:
        warnings.warn(f"{', '.join(changed)} only take(s) effect with {feature}, which is off; "
                      f"set {feature} or remove {', '.join(changed)}.", UserWarning, stacklevel=3)


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


#: The one description of every argument of the adapters, in their signature order.
ARGUMENT_DOCS: dict[str, str] = {
    "param_sync_every": """``K_x``, optimizer steps between parameter averages, or ``"auto"``: the first 16
        local steps and the parameter average after them are timed, then ``K_x`` and the state periods are
        chosen (policy in :mod:`lightning_desloc.adaptive`) and logged.""",
    "state_sync_every": """periods of the optimizer states, in optimizer steps. ``None``: first moments
        (``exp_avg``, ``momentum_buffer``, ...) every ``3 * K_x``, second moments (``exp_avg_sq``,
        ``max_exp_avg_sq``, ...) every ``6 * K_x``. An ``int``: one period for all states
        (``param_sync_every`` gives Local Adam). A dict ``{key: period}`` overrides single keys.""",
    "validate_on": """which model validation during ``fit`` evaluates. ``"consensus"`` (default): the
        ranks' parameter mean, i.e. the model a checkpoint or the end of training gives you; it costs one
        parameter all-reduce per validation run unless the parameters were just averaged (ledger category
        ``eval``), and local parameters are restored afterwards. ``"local"``: each rank's own parameters,
        no bytes.""",
    "state_policy": """``"average"`` for DES-LOC (and Local Adam). The baselines: ``"keep_local"`` never
        averages optimizer states; ``"reset"`` zeroes tensor states (not ``step``) right after every
        parameter average. Both take ``state_sync_every=None``.""",
    "compression": """wire format of the schedule's averages, ``"none"``, ``"bf16"`` or ``"int8"`` (1 byte
        per element plus a float32 scale per 256), as one string for everything or per category:
        ``{"params": "bf16", "states": "int8"}``, or per state key (``{"exp_avg_sq": "bf16"}``). int8
        parameters are sent as the change since the last average, with error feedback. The ledger counts
        the encoded bytes. Off (``None``) by default; one optimizer only.""",
    "outer_lr": """turn on the DiLoCo-style outer optimizer (off when ``None``): at each parameter average,
        ``last global params - average`` is a pseudo-gradient for an SGD step with this learning rate,
        ``outer_momentum`` and Nesterov (``outer_nesterov``), and every rank takes the result.
        ``outer_lr=1, outer_momentum=0`` equals plain averaging. One optimizer only.""",
    "outer_momentum": """momentum of the outer SGD step, in ``[0, 1)``; only with ``outer_lr``.""",
    "outer_nesterov": """Nesterov momentum for the outer step; only with ``outer_lr``.""",
    "group_size": """hierarchical synchronisation (off when ``None``): consecutive ranks in groups of this
        size (e.g. the devices of one node) all-reduce gradients every step like DDP, and DES-LOC's
        schedule runs across groups. The inner level has its own ledger, ``group_ledger``.""",
    "group_param_sync_every": """the level inside the groups, in optimizer steps. ``1`` (default): the
        gradients are all-reduced inside each group every step. ``k_in > 1``: no gradient all-reduce; the
        ranks of a group average their parameters within the group every ``k_in`` steps (bytes in
        ``group_ledger``). Whatever the outer level has due is averaged within the group first and then
        across groups, so it becomes the mean over all ranks. Needs ``group_size`` and
        ``state_policy="average"``; not with ``"auto"`` or ``max_drift``. See :mod:`lightning_desloc.groups`.""",
    "group_state_sync_every": """periods of the optimizer states inside the groups, in optimizer steps, as
        ``state_sync_every`` (``None``: first moments every ``3 * k_in``, second moments every ``6 * k_in``;
        an ``int``; a dict per key). Only with ``group_param_sync_every > 1``.""",
    "shard_within_group": """with ``group_size=g``: shard the model with FSDP2 inside each group instead of
        keeping a full copy per rank (DDP inside the group). The ranks form a 2-D device mesh ``(world // g,
        g)``, dims ``("replicate", "shard")``, exposed as ``strategy.device_mesh`` and the LightningModule's
        ``device_mesh``: shard in ``configure_model`` with ``fully_shard(layer, mesh=self.device_mesh["shard"])``,
        or leave the model unsharded there and the strategy calls ``fully_shard(child, mesh=mesh["shard"])`` on
        each child module with parameters. FSDP2 reduce-scatters the gradients inside the group every step;
        across groups DES-LOC averages each rank's local shard of the parameters and optimizer states on the
        usual schedule (``1/g`` of the model per rank per parameter round). Every group starts from group 0's
        weights, so group 0's ranks must initialise alike (``seed_everything``). Checkpoints are directories:
        a DCP consensus plus each rank's own shards (:mod:`lightning_desloc.sharded_checkpoint`). Works with
        ``compression="bf16"``; not yet with int8 compression, ``overlap_steps``, ``fragments``, ``outer_lr``,
        ``max_drift``, ``"auto"``, ``ddp_warmup_steps`` or ``state_policy="reset"``. See
        ``docs/sharded.md``.""",
    "comm_budget": """with ``param_sync_every="auto"``: the fraction of step time communication may take.""",
    "total_steps": """the run's length in optimizer steps, when known: with ``"auto"`` it caps ``K_x`` (see
        ``min_param_syncs``). The Trainer strategy reads ``trainer.estimated_stepping_batches`` instead.""",
    "min_param_syncs": """with ``param_sync_every="auto"``: ``K_x`` is capped so that the run (its length in
        optimizer steps) has at least this many parameter averages; ``1`` leaves the choice to the time
        budget alone.""",
    "max_drift": """when set, every ``drift_check_every`` steps the ranks compare (one float) how far they
        moved from the last consensus, ``||x_i - xbar|| / ||xbar||``; above this bound the parameters are
        averaged at once, outside the schedule (``early_syncs`` counts them). One optimizer only.""",
    "drift_check_every": """optimizer steps between drift checks; only with ``max_drift``.""",
    "bucket_cap_mb": """largest flat buffer of one all-reduce, in MiB.""",
    "log_comm": """log the communication ledger (``comm/...``) to the trainer's loggers at each sync.""",
    "overlap_steps": """``tau``, optimizer steps a round stays in flight: the round due after step ``s``
        starts asynchronously on a copy of what is due and its result is applied right after step
        ``s + tau``, each rank keeping its own progress since ``s`` (rules in
        :mod:`lightning_desloc.overlap`), so communication hides behind ``tau`` steps of computation.
        ``0`` (default): applied at once. Shorter than every period; not yet with ``"auto"``,
        compression, ``outer_lr``, ``group_size``, ``max_drift`` or ``state_policy="reset"``.""",
    "overlap_local_weight": """``lam`` in ``[0, 1]``, with ``overlap_steps``: when a round lands, each rank keeps ``lam`` of
        its own parameter progress since the snapshot and takes the rest from the consensus's progress
        over the last period, extrapolated to the steps in flight (rule in :mod:`lightning_desloc.overlap`).
        Below 1 the ranks stay closer, which makes an ``overlap_steps`` close to ``param_sync_every``
        cheaper in loss (``0.5`` at ``K_x - 1``; for a small ``overlap_steps`` it costs loss instead:
        docs/slow-link.md); each rank then keeps the last parameter mean (1x the
        parameters). ``1.0`` (default): the whole own progress.""",
    "ddp_warmup_steps": """``N``, a synchronous warm-up: the first ``N`` optimizer steps all-reduce the
        gradients (mean over ranks, ledger category ``grads``) before the step, as DDP does, so every rank
        keeps identical parameters and optimizer states (floating buffers are averaged with the gradients).
        DES-LOC's schedule then counts from the end of the warm-up: with ``s' = s - N``, the parameters
        are averaged when ``s' % K_x == 0`` (at ``s = N + K_x, N + 2 K_x, ...``) and state ``k`` when
        ``s' % K_k == 0``. A checkpoint saved inside the warm-up resumes inside it. ``0`` (default): no
        warm-up.""",
    "fragments": """``F``, streaming averages: the parameters (in module order, balanced by size) form ``F``
        fragments; fragment ``f`` is averaged after the steps ``s`` with ``(s - f K_x / F) % K_x == 0`` and
        each of its states ``k`` when ``(s - f K_x / F) % K_k == 0``, so each round carries about ``1/F`` of
        the model (peak bandwidth and round memory ``/ F``; the ledger's ``comm/largest_round_bytes``) while
        the bytes per ``K_x`` steps stay those of the whole model. ``F`` must divide ``K_x``; works with
        ``overlap_steps``; not yet with ``"auto"``, compression, ``outer_lr``, ``group_size``, ``max_drift``
        or ``state_policy="reset"``. ``1`` (default): whole-model rounds.""",
    "peer_timeout_s": """seconds without a heartbeat from a peer rank after which this rank logs which
        rank(s) went silent and exits with code 75, so that ``torchrun --max-restarts`` (or the scheduler) restarts
        the group from the last checkpoint instead of waiting for the process group's timeout in a collective
        that will never complete. Heartbeats are store requests from a thread of each rank, every
        ``peer_timeout_s / 6`` seconds, independent of training: a long round, a slow rank or a long save is
        not a silence; a dead, frozen or unreachable process is (:mod:`lightning_desloc.liveness`). ``None``:
        off, no thread. With one rank nothing runs.""",
    "on_nonfinite": """what a round does with a rank whose values are not finite (NaN or inf in its
        parameters or in a due state). ``"raise"`` (default): the rank is left out of the round (every rank
        takes the mean of the finite ranks), and at the next optimizer step every rank raises
        ``FloatingPointError`` naming the rank(s), the step and what the round carried; no rank is left
        waiting in a collective and no healthy rank holds a NaN. ``"heal"``: the same round, then rank 0 logs
        a warning and at the next optimizer step one more round averages the parameters and every state over
        the finite ranks, so that the bad rank's states are replaced too (``comm/healed_ranks`` counts the
        ranks left out); with ``state_policy="keep_local"`` the bad rank zeroes its own states instead.
        ``None``: no guard, the NaN is averaged into every rank, as DDP does. Each rank's flag rides on the
        round (4 bytes per rank of the outermost level, category ``control``): no extra collective, no host
        synchronisation in the step. Works with compression (the coded mean is rescaled before it is encoded
        again), ``fragments``, ``overlap_steps`` (flags taken when the round starts, read once it landed),
        ``outer_lr``, ``group_size`` (one flag per group: inside a group the ranks are kept equal, so a NaN
        reaches the whole group and the group is left out) and the rest. Before a checkpoint save and consensus validation every rank's
        parameters and states are checked in one more 4-bytes-per-rank round, so that nothing non-finite is
        saved or evaluated: ``"raise"`` raises first, ``"heal"`` heals first. Not guarded: the DDP warm-up steps
        (``ddp_warmup_steps``) and rounds inside groups only (a NaN reaches its group there, as in DDP). See
        ``docs/checkpointing.md``, "A rank that goes non-finite".""",

    "allow_consensus_fallback": """on resume, a truncated, corrupt or foreign per-rank shard raises
        :class:`~lightning_desloc.checkpoint.CheckpointShardError` (default). ``True`` starts every rank
        from the consensus in the main checkpoint file instead, with a warning. See ``docs/checkpointing.md``.""",
}


def args_section(names: Iterable[str], indent: str = "    ") -> str:
    """A Google-style ``Args:`` section for ``names``, from :data:`ARGUMENT_DOCS` (for the adapters' docstrings).

    >>> print(args_section(["bucket_cap_mb"], indent=""))
    Args:
        bucket_cap_mb: largest flat buffer of one all-reduce, in MiB.
    """
    lines = [f"{indent}Args:"]
    for name in names:
        text = " ".join(textwrap.dedent(ARGUMENT_DOCS[name]).split())
        wrapped = textwrap.wrap(f"{name}: {text}", width=100 - len(indent) - 4,
                                subsequent_indent="    ")
        lines.extend(f"{indent}    {line}" for line in wrapped)
    return "\n".join(lines)
