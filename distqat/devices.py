"""Is the configured ``device`` there? Checked before any worker starts. And the CPU
settings every training process applies (:func:`configure_cpu`, :func:`cpu_modes`).

Without this check a missing GPU is found by every worker at once, after the launcher has
spawned them all: one traceback per worker and exit 1, for what is a one-line user error.
``resolve_device`` (distqat.pipeline.build) still picks the device in each worker; this
only says, up front and in one line, whether it can succeed on this host.
"""

from __future__ import annotations

import ctypes

from .config import Config, ConfigError

# glibc's mallopt parameters (malloc.h) and the largest mmap threshold it accepts (64-bit)
M_TRIM_THRESHOLD, M_MMAP_THRESHOLD = -1, -3
MMAP_THRESHOLD_MAX = 32 << 20
NEVER_TRIM = 2 ** 31 - 1  # mallopt takes a C int


def configure_cpu(cfg: Config) -> None:
    """This process's CPU threads (``comm.threads_per_worker``) and :func:`cpu_modes`.
    Call before RPC and process groups start their threads: a new thread inherits its
    creator's floating-point mode, and the stages' optimizer steps run on RPC threads."""
    import torch

    if cfg.comm.threads_per_worker > 0:
        torch.set_num_threads(cfg.comm.threads_per_worker)
    cpu_modes(cfg)


def cpu_modes(cfg: Config) -> None:
    """Subnormal flushing (``flush_denormal``) and freed memory kept for reuse
    (``malloc_reuse``): what every process that trains applies, the peers of ``bench/``
    included, so that comparisons stay fair."""
    import torch

    torch.set_flush_denormal(cfg.flush_denormal)
    if cfg.malloc_reuse:
        keep_freed_memory()


def keep_freed_memory() -> bool:
    """Tell glibc's malloc to keep freed memory for the next allocation: no trimming of
    the heap's top, and blocks up to 32 MB from the heap rather than from a fresh mapping
    each time. Otherwise a training step's new tensors (gradients, optimizer scratch,
    collective buffers) fault their pages in again and again (``malloc_reuse`` in
    :class:`distqat.config.Config`). False where there is no glibc (macOS, musl): nothing
    to tune there."""
    try:
        mallopt = ctypes.CDLL(None).mallopt
    except (OSError, AttributeError):
        return False
    mallopt.argtypes = [ctypes.c_int, ctypes.c_int]
    return bool(mallopt(M_MMAP_THRESHOLD, MMAP_THRESHOLD_MAX)
                and mallopt(M_TRIM_THRESHOLD, NEVER_TRIM))


def check_device(name: str) -> None:
    """Raise ConfigError naming ``device`` unless this host has it. ``auto`` and ``cpu``
    are always there; ``cuda`` needs a CUDA device torch can see; ``cuda:N`` (and ``mps``)
    are checked too, should the schema ever allow them."""
    import torch

    hint = "; use device=cpu or auto"
    kind, _, index = name.partition(":")
    if kind in ("auto", "cpu") and not index:
        return
    if kind == "cuda":
        count = torch.cuda.device_count() if torch.cuda.is_available() else 0
        if count == 0:
            built = ", built without CUDA" if torch.version.cuda is None else ""
            raise ConfigError(f"device: {name!r} asked for, but torch sees no CUDA device "
                              f"on this host (torch {torch.__version__}{built}){hint}")
        if index and (not index.isdigit() or int(index) >= count):
            raise ConfigError(f"device: {name!r} asked for, but this host has {count} CUDA "
                              f"device(s) (cuda:0..cuda:{count - 1}){hint}")
        return
    if kind == "mps" and not index:
        if not torch.backends.mps.is_available():
            raise ConfigError(f"device: 'mps' asked for, but torch sees no MPS device on "
                              f"this host (torch {torch.__version__}){hint}")
        return
    raise ConfigError(f"device: expected cpu, cuda or auto, got {name!r}")
