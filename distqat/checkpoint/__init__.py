"""Durable per-stage DiLoCo state, written at every outer step: the file format
(:mod:`.format`), files in folders with retention (:mod:`.store`), and the background
writer (:mod:`.writer`)."""

from .format import (HEADER_SIZE, MAGIC, CheckpointError, encode, load_verified, state_digest,
                     verify)
from .store import (STALE_TMP_S, checkpoint_path, cleanup, latest, list_checkpoints,
                    load_latest, save, save_atomic, write_atomic)
from .writer import CheckpointWriter, snapshot

__all__ = ["CheckpointError", "CheckpointWriter", "HEADER_SIZE", "MAGIC", "STALE_TMP_S",
           "checkpoint_path", "cleanup", "encode", "latest", "list_checkpoints",
           "load_latest", "load_verified", "save", "save_atomic", "snapshot", "state_digest", "verify",
           "write_atomic"]
