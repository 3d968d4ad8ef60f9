"""Experiment configuration: typed dataclasses read with omegaconf.

The dataclasses are the schema and its documentation, kept in one file (hence its length)
so that the whole schema reads top to bottom. A config is built as
``OmegaConf.structured(Config)`` merged with a YAML file and ``key.sub=value`` overrides,
then turned into real dataclasses with ``OmegaConf.to_object`` so that every
``__post_init__`` check runs. Every user error raises :class:`ConfigError`, whose message
names the field or the file; the command-line entry points turn it into exit status 2.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence

from omegaconf import OmegaConf
from omegaconf.errors import OmegaConfBaseException

from .fileio import write_atomic

DEFAULT_CONFIG = Path(__file__).resolve().parent.parent / "configs" / "tiny.yaml"
CONFIG_FILE = "config.yaml"  # the resolved config a run saves beside its outputs
ENV_JOB_ID = "TORCHELASTIC_RUN_ID"  # torchrun's --rdzv-id, as its workers see it

INNER_OPTIMIZERS = ("adamw", "adam", "sgd")
OUTER_OPTIMIZERS = ("sgd",)
MODES = ("pipeline", "baseline")
DEVICES = ("cpu", "cuda", "auto")
DTYPES = ("float32", "float64")
PRECISIONS = ("fp32", "bf16", "fp16-mixed")
BALANCE_MODES = ("off", "batch", "steps")  # distqat.balance
SCHEDULES = ("gpipe", "1f1b")  # distqat.pipeline.schedule.SCHEDULES (a test keeps them in step)
# the task registry's names (distqat.data.task.TASKS, which a test keeps in step): known
# here so that a typo is reported without importing torch
TASK_NAMES = ("teacher", "digits", "image", "text", "audio")


def job_id() -> str:
    """The job's id (torchrun's --rdzv-id): checkpoints are scoped by it, so a new job
    never resumes an old one's state by accident, and every round of one job does."""
    return os.environ.get(ENV_JOB_ID, "") or "default"


class ConfigError(ValueError):
    """A user error in the configuration; the message names the field or file."""


def _check(ok: bool, name: str, expected: str, value: Any) -> None:
    if not ok:
        raise ConfigError(f"{name}: expected {expected}, got {value!r}")


@dataclass
class OptimConfig:
    """One optimizer. ``momentum``/``nesterov`` apply to sgd, ``betas`` to adam(w)."""

    name: str = "adamw"
    lr: float = 1e-3
    weight_decay: float = 0.0
    momentum: float = 0.0
    nesterov: bool = False
    betas: List[float] = field(default_factory=lambda: [0.9, 0.999])

    def validate(self, prefix: str, allowed: Sequence[str]) -> None:
        _check(self.name in allowed, f"{prefix}.name", f"one of {list(allowed)}", self.name)
        _check(self.lr > 0, f"{prefix}.lr", "a positive number", self.lr)
        _check(self.weight_decay >= 0, f"{prefix}.weight_decay", ">= 0", self.weight_decay)
        _check(0 <= self.momentum < 1, f"{prefix}.momentum", "a value in [0, 1)", self.momentum)
        _check(not self.nesterov or self.momentum > 0, f"{prefix}.nesterov",
               "false when momentum is 0 (nesterov needs momentum)", self.nesterov)
        _check(len(self.betas) == 2 and all(0 <= b < 1 for b in self.betas),
               f"{prefix}.betas", "two values in [0, 1)", self.betas)


def _outer_default() -> OptimConfig:
    return OptimConfig(name="sgd", lr=0.7, momentum=0.9, nesterov=True)


@dataclass
class DataConfig:
    """The training task (``name``) and its data. ``teacher`` labels random inputs with a
    fixed random network: synthetic, learnable, and the same on every machine for a given
    seed (``input_shape``, ``num_classes`` and ``teacher_hidden`` apply to it). ``digits``:
    real 8x8 handwritten digits shipped with distqat, or the CSV at ``path``. ``image``
    (classification), ``text`` (causal LM) and ``audio`` (clip classification) read an HF
    dataset: ``dataset`` names it on the hub (read from the HF cache offline), ``path`` a
    local copy (``python -m distqat.data prepare`` makes one); ``args`` are the task's
    settings (see ``distqat.data``: e.g. ``seq_len``, ``tokenizer``, ``subset``).
    ``eval_samples`` are held out."""

    name: str = "teacher"
    dataset: Optional[str] = None
    path: Optional[str] = None
    args: Dict[str, Any] = field(default_factory=dict)
    seed: int = 0
    input_shape: List[int] = field(default_factory=lambda: [32])
    num_classes: int = 10
    teacher_hidden: int = 64
    eval_samples: int = 512

    def __post_init__(self) -> None:
        _check(self.name in TASK_NAMES, "data.name", f"one of {list(TASK_NAMES)}", self.name)
        _check(len(self.input_shape) >= 1 and all(d > 0 for d in self.input_shape),
               "data.input_shape", "a list of positive sizes", self.input_shape)
        _check(self.num_classes >= 2, "data.num_classes", ">= 2", self.num_classes)
        _check(self.teacher_hidden >= 1, "data.teacher_hidden", ">= 1", self.teacher_hidden)
        _check(self.eval_samples >= 1, "data.eval_samples", ">= 1", self.eval_samples)


@dataclass
class DilocoConfig:
    """DiLoCo: ``inner_steps`` local steps with ``inner_optim``, then one outer step in
    which the replicas of each stage average their pseudo-gradients and ``outer_optim``
    applies them. ``averaging_timeout`` bounds each all-reduce (seconds).

    Streaming DiLoCo (:mod:`distqat.streaming`): ``fragments`` > 1 splits each stage's
    parameters into that many contiguous fragments whose outer steps are staggered over
    the window; each fragment's average is posted ``overlap_steps`` inner steps before it
    is applied, and runs in the background meanwhile; on applying, the local fragment
    becomes ``merge_alpha * local + (1 - merge_alpha) * global``. ``fragments: 1`` is
    plain DiLoCo (one blocking outer step at the window's end; the other two unused).

    ``balance`` (:mod:`distqat.balance`): ``batch`` (or ``true``): every ``balance_every``
    outer steps the replicas' batch sizes are set in proportion to their measured speeds,
    keeping ``num_replicas * batch_size_per_step`` samples per inner step; ``steps``: their
    numbers of inner steps instead, keeping ``num_replicas * inner_steps`` per window; the
    outer step weights each replica by the samples it processed. ``off`` (or ``false``):
    every replica takes ``inner_steps`` steps of ``batch_size_per_step``. The split stays
    while the replicas' windows take within ``balance_tolerance`` (a fraction) of each
    other."""

    inner_optim: OptimConfig = field(default_factory=OptimConfig)
    outer_optim: OptimConfig = field(default_factory=_outer_default)
    inner_steps: int = 10
    outer_steps: int = 10
    batch_size_per_step: int = 64
    averaging_timeout: float = 60.0
    fragments: int = 1
    overlap_steps: int = 1
    merge_alpha: float = 0.0
    balance: str = "off"
    balance_every: int = 1
    balance_tolerance: float = 0.1

    def __post_init__(self) -> None:
        _check(self.inner_steps >= 1, "diloco.inner_steps", ">= 1", self.inner_steps)
        # YAML's true/false arrive as "True"/"False": the aliases of batch/off
        self.balance = {"true": "batch", "false": "off"}.get(str(self.balance).lower(),
                                                             str(self.balance).lower())
        _check(self.balance in BALANCE_MODES, "diloco.balance",
               " | ".join(BALANCE_MODES) + " (true: batch, false: off)", self.balance)
        _check(self.balance_every >= 1, "diloco.balance_every", ">= 1 outer steps",
               self.balance_every)
        _check(self.balance_tolerance >= 0, "diloco.balance_tolerance",
               ">= 0 (0.1: windows within 10 % of each other keep their split)",
               self.balance_tolerance)
        _check(self.outer_steps >= 1, "diloco.outer_steps", ">= 1", self.outer_steps)
        _check(self.batch_size_per_step >= 1, "diloco.batch_size_per_step", ">= 1",
               self.batch_size_per_step)
        _check(self.averaging_timeout > 0, "diloco.averaging_timeout", "> 0 seconds",
               self.averaging_timeout)
        _check(1 <= self.fragments <= self.inner_steps, "diloco.fragments",
               f"1..diloco.inner_steps ({self.inner_steps}): each fragment's outer step "
               "takes its own inner step of the window", self.fragments)
        if self.fragments > 1:
            _check(self.balance != "steps", "diloco.balance",
                   "off or batch with diloco.fragments > 1 (streaming DiLoCo posts each "
                   "fragment at a fixed inner step of the window, which balance: steps "
                   "changes per replica)", self.balance)
            room = self.inner_steps // self.fragments
            _check(0 <= self.overlap_steps < room, "diloco.overlap_steps",
                   f"0..{room - 1} (inner steps a fragment's average overlaps: fewer than "
                   f"inner_steps // fragments = {room})", self.overlap_steps)
        _check(0.0 <= self.merge_alpha < 1.0, "diloco.merge_alpha", "0 <= alpha < 1",
               self.merge_alpha)
        self.inner_optim.validate("diloco.inner_optim", INNER_OPTIMIZERS)
        self.outer_optim.validate("diloco.outer_optim", OUTER_OPTIMIZERS)


@dataclass
class ModelPipelineConfig:
    """The model (a name in ``distqat.models``) and how it is cut into stages.
    ``model_args`` go to the model's builder (its config dataclass)."""

    model: str = "mlp"
    num_stages: int = 2
    num_microbatches: int = 2
    schedule: str = "gpipe"
    """When each micro-batch's forward and backward run (:mod:`distqat.pipeline.schedule`):
    ``gpipe`` (every forward, then one backward) or ``1f1b`` (each backward as soon as its
    forward is back, at most ``num_stages`` micro-batches' activations alive). The default
    is the faster one in ``bench/pipeline.py`` (BENCHMARKS.md); 1f1b is for activations
    that would not fit ``num_microbatches`` times."""
    max_replicas: Optional[int] = None
    model_args: Dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        _check(1 <= self.num_stages, "model_pipeline.num_stages", ">= 1", self.num_stages)
        _check(self.num_microbatches >= 1, "model_pipeline.num_microbatches", ">= 1",
               self.num_microbatches)
        _check(self.schedule in SCHEDULES, "model_pipeline.schedule", f"one of {list(SCHEDULES)}",
               self.schedule)
        _check(self.max_replicas is None or self.max_replicas >= 1,
               "model_pipeline.max_replicas", "null or >= 1", self.max_replicas)


@dataclass
class ParamMirrorConfig:
    """Checkpoints of every stage's DiLoCo state, written at every outer step to
    ``<local_dir>/<experiment_prefix>/<job id>/`` on each host and, if set, the same path
    under ``shared_dir``; the last ``keep`` are kept. A new round resumes from them; once
    training has begun it refuses to start over from random init unless
    ``allow_fresh_start`` is true."""

    enable: bool = True
    local_dir: str = "checkpoints"
    shared_dir: Optional[str] = None
    keep: int = 3
    allow_fresh_start: bool = False

    def __post_init__(self) -> None:
        _check(self.keep >= 1, "param_mirror.keep", ">= 1", self.keep)


@dataclass
class CommConfig:
    """Timeouts (seconds), RPC sizing, and where workers listen. Timeouts: short enough to
    notice a dead peer quickly, long enough for one step of the real model."""

    rpc_timeout: float = 60.0
    init_timeout: float = 120.0
    lost_after: float = 10.0
    """A member whose heartbeat (one a second) has been still this long is lost: the
    round ends without it (a dead spare, a hung host; see ``elastic.liveness``). Lower
    notices sooner; too low mistakes a worker stalled by a loaded machine for a dead one."""
    rpc_threads: int = 8
    threads_per_worker: int = 1
    rpc_transport: str = "uv"
    """TensorPipe's transport between workers: ``uv`` (TCP sockets, also on one host) or
    ``auto`` (TensorPipe's choice: shared memory between workers of one host, InfiniBand
    where present). ``uv`` is the default because the shared-memory transport busy-polls
    a reactor thread per worker: with more workers than cores those threads take CPU from
    training, and the tiny run trained half as fast (see BENCHMARKS.md)."""
    rpc_channels: str = "single"
    """How TensorPipe carries a tensor to a worker of another host: ``single`` (its
    ``basic`` channel: the one TCP connection each pair of workers has) or ``multiplexed``
    (TensorPipe's own choice, ``mpt_uv``: every tensor cut into 16 parts, each on a TCP
    connection of its own). ``single`` by default: over 10 and 100 Mbit/s links with
    short queues the 16 connections start at once, overflow the queue and resend; 2- and
    3-host pipelines ran 1.21-1.84x faster with one (BENCHMARKS.md). ``multiplexed``
    may help where one connection's window, not the link, is the limit (fast links with a
    long round trip; not measured here). Workers of one host use shared-memory copies (CMA) either way."""
    interface: str = ""
    """The network interface every worker listens on (e.g. ``eth1``, ``wg0``); empty:
    torch's defaults (the hosts' names' addresses, and every address for the round's
    store). RPC unpickles what it receives, so whoever reaches these ports can run code
    in the workers: name a private network or a VPN here. Sets ``GLOO_SOCKET_IFNAME``,
    ``TP_SOCKET_IFNAME`` and ``NCCL_SOCKET_IFNAME``; checked on each host before its
    workers start (a name this host lacks exits 2). See README, "Who can reach the
    workers"."""

    def __post_init__(self) -> None:
        for name in ("rpc_timeout", "init_timeout", "lost_after"):
            _check(getattr(self, name) > 0, f"comm.{name}", "> 0 seconds", getattr(self, name))
        _check(self.rpc_transport in RPC_TRANSPORTS, "comm.rpc_transport",
               " or ".join(RPC_TRANSPORTS), self.rpc_transport)
        _check(self.rpc_channels in RPC_CHANNELS, "comm.rpc_channels",
               " or ".join(RPC_CHANNELS), self.rpc_channels)
        _check(self.rpc_threads >= 2, "comm.rpc_threads", ">= 2", self.rpc_threads)
        _check(self.threads_per_worker >= 0, "comm.threads_per_worker",
               ">= 0 (0 keeps torch's default)", self.threads_per_worker)


RPC_TRANSPORTS = ("uv", "auto")
RPC_CHANNELS = ("multiplexed", "single")
WIRE_FORMATS = ("fp32", "bf16", "int8")
QUANT_METHODS = ("minmax", "lsq")


def _check_bits(value: Optional[int], name: str, allow_none: bool) -> None:
    _check((value is None and allow_none) or (value is not None and 2 <= value <= 8), name,
           "2..8" + (" or null" if allow_none else ""), value)


@dataclass
class StageQuantConfig:
    """Per-stage overrides of the ``quant`` section (null keeps the section's value)."""

    enable: Optional[bool] = None
    weight_bits: Optional[int] = None
    activation_bits: Optional[int] = None


@dataclass
class WireConfig:
    """What crosses the wire. ``activations``: stage outputs and, on the way back, their
    gradients. ``pseudo_grads``: DiLoCo's outer-step deltas. int8 uses one scale per row
    (activations) or per ``chunk_size`` elements (pseudo-gradients)."""

    activations: str = "fp32"
    pseudo_grads: str = "fp32"
    chunk_size: int = 4096

    def __post_init__(self) -> None:
        for name in ("activations", "pseudo_grads"):
            _check(getattr(self, name) in WIRE_FORMATS, f"quant.wire.{name}",
                   f"one of {list(WIRE_FORMATS)}", getattr(self, name))
        _check(self.chunk_size >= 1, "quant.wire.chunk_size", ">= 1", self.chunk_size)


@dataclass
class QuantConfig:
    """Quantization-aware training (``distqat.quant``): per-channel weight fake-quant and
    per-tensor input-activation fake-quant of the Linear/Conv layers. ``freeze_after``
    counts inner steps (observers and LSQ steps stop learning after it); ``skip`` names
    layers of the full model to keep in float, or ``first`` / ``last``; ``stages`` holds
    per-stage overrides, e.g. ``quant.stages.1.weight_bits=4``. ``scale_lr``: the learning
    rate of LSQ steps (null: the inner optimizer's). ``activation_averaging``: the weight of
    each new batch in the running activation range (min/max method). Higher than torch's
    0.01 because an outer step moves the weights at once, and a range that lags clips the
    new activations (and zeroes their straight-through gradients) for many steps."""

    enable: bool = False
    weight_bits: int = 8
    activation_bits: Optional[int] = 8
    per_channel: bool = True
    method: str = "minmax"
    freeze_after: Optional[int] = None
    activation_averaging: float = 0.1
    skip: List[str] = field(default_factory=list)
    scale_lr: Optional[float] = 1e-4
    stages: Dict[str, StageQuantConfig] = field(default_factory=dict)
    wire: WireConfig = field(default_factory=WireConfig)

    def __post_init__(self) -> None:
        _check_bits(self.weight_bits, "quant.weight_bits", allow_none=False)
        _check_bits(self.activation_bits, "quant.activation_bits", allow_none=True)
        _check(self.method in QUANT_METHODS, "quant.method", f"one of {list(QUANT_METHODS)}",
               self.method)
        _check(self.freeze_after is None or self.freeze_after >= 0, "quant.freeze_after",
               "null or >= 0 inner steps", self.freeze_after)
        _check(0 < self.activation_averaging <= 1, "quant.activation_averaging", "in (0, 1]",
               self.activation_averaging)
        _check(self.scale_lr is None or self.scale_lr > 0, "quant.scale_lr", "null or > 0",
               self.scale_lr)
        for key, override in self.stages.items():
            _check(key.isdigit(), f"quant.stages.{key}", "a stage number", key)
            stage = int(key)
            if override.weight_bits is not None:
                _check_bits(override.weight_bits, f"quant.stages.{stage}.weight_bits", False)
            if override.activation_bits is not None:
                _check_bits(override.activation_bits, f"quant.stages.{stage}.activation_bits",
                            False)


@dataclass
class Config:
    """One experiment. ``world_size`` is the number of processes ``distqat.local``
    starts; under torchrun the real world size comes from the rendezvous. ``mode:
    baseline`` trains ``{model}.full`` in one process with the inner optimizer on
    replica 0's data: the reference the pipeline is compared against. ``eval_every``
    counts outer steps; ``log_every`` inner steps. ``precision: bf16`` runs every stage's
    forward under bfloat16 autocast (parameters, optimizers, DiLoCo's global copy and
    the fake-quant arithmetic stay float32; activations cross the wire in bfloat16)."""

    experiment_prefix: str = "tiny"
    mode: str = "pipeline"
    world_size: int = 4
    seed: int = 0
    device: str = "cpu"
    dtype: str = "float32"
    precision: str = "fp32"
    flush_denormal: bool = True
    """CPU: subnormal floats (below 1.2e-38) computed as zero. Adam's second moments
    decay into that range late in a run, and x86 CPUs handle subnormals in
    microcode: a 1,500-step run's optimizer step went from 4 to 12 ms by its end
    (BENCHMARKS.md, ``bench/cpu_modes.py``). No effect on a GPU's kernels."""
    malloc_reuse: bool = True
    """CPU memory (glibc): freed memory stays with the process for the next step instead
    of going back to the kernel (``distqat.devices.keep_freed_memory``). Otherwise each
    step's new tensors fault their pages in again: for the testbed's MLP with int8
    pseudo-gradients every 5 inner steps, 12x the page faults and 1.15x the training
    time (BENCHMARKS.md, ``bench/cpu_modes.py``). The cost: a process keeps its peak
    memory. Tensors over 32 MB are mapped afresh either way. No effect without glibc."""
    run_dir: str = "runs"
    log_every: int = 10
    eval_every: int = 5
    data: DataConfig = field(default_factory=DataConfig)
    diloco: DilocoConfig = field(default_factory=DilocoConfig)
    model_pipeline: ModelPipelineConfig = field(default_factory=ModelPipelineConfig)
    param_mirror: ParamMirrorConfig = field(default_factory=ParamMirrorConfig)
    comm: CommConfig = field(default_factory=CommConfig)
    quant: QuantConfig = field(default_factory=QuantConfig)

    def __post_init__(self) -> None:
        _check(bool(self.experiment_prefix) and "/" not in self.experiment_prefix,
               "experiment_prefix", "a non-empty name without '/'", self.experiment_prefix)
        _check(self.mode in MODES, "mode", f"one of {list(MODES)}", self.mode)
        _check(self.device in DEVICES, "device", f"one of {list(DEVICES)}", self.device)
        _check(self.world_size >= 1, "world_size", ">= 1", self.world_size)
        _check(self.dtype in DTYPES, "dtype", f"one of {list(DTYPES)}", self.dtype)
        _check(self.precision in PRECISIONS, "precision", f"one of {list(PRECISIONS)}",
               self.precision)
        if self.precision == "fp16-mixed":
            raise ConfigError(
                "precision: fp16-mixed is refused: float16 needs a loss scale, and a step "
                "skipped for an overflow on one stage must be skipped on every stage of "
                "the replica, which distqat does not do yet; use precision: bf16 (float32's "
                "range, no loss scale needed)")
        _check(self.precision == "fp32" or self.dtype == "float32", "precision",
               f"fp32 with dtype {self.dtype} (mixed precision runs float32 parameters)",
               self.precision)
        _check(self.log_every >= 1, "log_every", ">= 1", self.log_every)
        _check(self.eval_every >= 0, "eval_every", ">= 0 outer steps (0: never)",
               self.eval_every)
        self.check_world(self.world_size)
        for stage in map(int, self.quant.stages):
            _check(stage < self.model_pipeline.num_stages, f"quant.stages.{stage}",
                   f"a stage below model_pipeline.num_stages={self.model_pipeline.num_stages}",
                   stage)

    def stage_quant(self, stage: int) -> "StageQuantConfig":
        """The quant settings of ``stage``: the section's, with its overrides applied."""
        q = self.quant
        o = q.stages.get(str(stage), StageQuantConfig())
        pick = lambda mine, default: default if mine is None else mine  # noqa: E731
        return StageQuantConfig(enable=pick(o.enable, q.enable),
                                weight_bits=pick(o.weight_bits, q.weight_bits),
                                activation_bits=pick(o.activation_bits, q.activation_bits))

    def check_world(self, world_size: int) -> None:
        """Fail unless ``world_size`` workers can hold at least one full pipeline."""
        if self.mode == "pipeline" and self.model_pipeline.num_stages > world_size:
            raise ConfigError(
                f"model_pipeline.num_stages: {self.model_pipeline.num_stages} stages need at "
                f"least that many workers, but the world has {world_size}")

    @property
    def run_path(self) -> Path:
        return Path(self.run_dir) / self.experiment_prefix


def _read_yaml(path: Path) -> Any:
    if path.is_dir():
        raise ConfigError(f"config file {path}: is a folder; expected a YAML file "
                          f"(e.g. configs/tiny.yaml)")
    if not path.is_file():
        raise ConfigError(f"config file {path}: does not exist")
    try:
        data = OmegaConf.load(path)
    except Exception as e:  # yaml's parse errors, omegaconf's wrapping of them
        first = str(e).splitlines()[0] if str(e) else type(e).__name__
        raise ConfigError(f"config file {path}: not valid YAML ({first})") from None
    if not OmegaConf.is_dict(data):
        raise ConfigError(f"config file {path}: expected a YAML mapping at the top level")
    return data


def _omegaconf_message(e: OmegaConfBaseException) -> str:
    key = getattr(e, "full_key", None)
    first = str(e).splitlines()[0] if str(e) else type(e).__name__
    return f"{key}: {first}" if key else first


def _merge(data: Any, source: str, overrides: Sequence[str]) -> Config:
    for item in overrides:
        if "=" not in item or item.startswith("="):
            raise ConfigError(f"override {item!r}: expected key.sub=value")
    try:
        merged = OmegaConf.merge(OmegaConf.structured(Config), data)
    except OmegaConfBaseException as e:
        raise ConfigError(f"{source}: {_omegaconf_message(e)}") from None
    try:
        merged = OmegaConf.merge(merged, OmegaConf.from_dotlist(list(overrides)))
        cfg = OmegaConf.to_object(merged)
    except ConfigError:
        raise
    except OmegaConfBaseException as e:
        raise ConfigError(_omegaconf_message(e)) from None
    except ValueError as e:  # a __post_init__ check raised by to_object
        raise ConfigError(str(e)) from None
    assert isinstance(cfg, Config)
    return cfg


def load_config(path: Optional[str | Path] = None, overrides: Sequence[str] = ()) -> Config:
    """Schema ← YAML file ← ``key.sub=value`` overrides, checked; raises ConfigError."""
    path = Path(path) if path is not None else DEFAULT_CONFIG
    return _merge(_read_yaml(path), f"config file {path}", overrides)


def config_from_yaml(text: str, source: str) -> Config:
    """A config from YAML text (e.g. one saved with a run or an export)."""
    try:
        data = OmegaConf.create(text)
    except Exception as e:
        raise ConfigError(f"{source}: not a valid config ({e})") from None
    return _merge(data, source, ())


def save_config(cfg: Config, path: Path) -> None:
    """The resolved config beside a run's outputs (what ``distqat.export`` rebuilds from)."""
    write_atomic(path, to_yaml(cfg))


def to_yaml(cfg: Config) -> str:
    return OmegaConf.to_yaml(OmegaConf.structured(cfg))
