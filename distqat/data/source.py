"""Where a task's examples come from: a HF hub dataset or a local copy at ``data.path``.

``data.path`` wins when set: a ``save_to_disk`` folder (what ``python -m distqat.data
prepare`` writes), a folder of parquet / arrow / csv / json / text files or images (read
by ``datasets.load_dataset``, splits inferred from the file names, e.g. the hub's
``<config>/<split>-*.parquet``), or one such file (one split). Otherwise ``data.dataset``
names a hub dataset: its cached snapshot is read with no network; without one it is
downloaded where the hub is reachable. An offline machine never waits on the network
(``datasets`` alone retries for ~30 s): a missing dataset is a :class:`DataError` at once.
(Just over 300 lines: every kind of source and its one-line errors live here together.)
"""

from __future__ import annotations

import contextlib
import functools
import logging
import os
import socket
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Dict, Iterator, List, Optional, Sequence, Tuple
from urllib.parse import urlparse

log = logging.getLogger(__name__)

DATA_SUFFIXES = (".parquet", ".arrow", ".csv", ".json", ".jsonl", ".txt", ".png", ".jpg",
                 ".jpeg", ".wav", ".flac")
BUILDERS = {".parquet": "parquet", ".arrow": "arrow", ".csv": "csv", ".json": "json",
            ".jsonl": "json", ".txt": "text"}
PREPARE = "python -m distqat.data prepare --config CONFIG --out DIR"


class DataError(ValueError):
    """The data cannot be read; the one-line message names the dataset or file and what
    to do (a ValueError, so the command-line entry points exit 2)."""


@dataclass
class SourceArgs:
    """Settings every dataset-backed task has. ``subset``: the hub dataset's config
    (e.g. ``wikitext-2-raw-v1``). ``eval_split``: null picks the first of the task's usual
    held-out splits that exists, or holds out ``data.eval_samples`` seeded training samples
    when the source has one split."""

    subset: Optional[str] = None
    train_split: str = "train"
    eval_split: Optional[str] = None
    revision: Optional[str] = None  # of the hub dataset, e.g. refs/convert/parquet

    def __post_init__(self) -> None:
        for name in ("subset", "train_split", "eval_split", "revision"):
            value = getattr(self, name)
            if value is not None and (not isinstance(value, str) or not value):
                raise ValueError(f"data.args.{name}: expected a name, got {value!r}")


def _first_line(e: BaseException) -> str:
    text = str(e).strip()
    return f"{type(e).__name__}: {text.splitlines()[0] if text else ''}"


def offline_requested() -> bool:
    return any(os.environ.get(k, "").lower() in ("1", "true", "yes", "on")
               for k in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE"))


@functools.lru_cache(maxsize=1)
def hub_reachable(timeout: float = 3.0) -> bool:
    """One TCP connect to the hub endpoint (seconds at most, once per process)."""
    if offline_requested():
        return False
    from huggingface_hub import constants
    url = urlparse(constants.ENDPOINT)
    try:
        socket.create_connection((url.hostname, url.port or 443), timeout=timeout).close()
        return True
    except OSError:
        return False


@contextlib.contextmanager
def hub_offline() -> Iterator[None]:
    """``datasets`` and ``huggingface_hub`` read their offline switches at import time;
    flip them for the duration of one call (no network, errors at once)."""
    import datasets.config
    from huggingface_hub import constants
    saved = datasets.config.HF_HUB_OFFLINE, constants.HF_HUB_OFFLINE
    datasets.config.HF_HUB_OFFLINE = constants.HF_HUB_OFFLINE = True
    try:
        yield
    finally:
        datasets.config.HF_HUB_OFFLINE, constants.HF_HUB_OFFLINE = saved


@contextlib.contextmanager
def _quiet() -> Iterator[None]:
    import datasets
    was = datasets.is_progress_bar_enabled()
    datasets.disable_progress_bars()
    try:
        yield
    finally:
        if was:
            datasets.enable_progress_bars()


def missing_dataset(name: str, looked: str) -> DataError:
    return DataError(
        f"dataset {name!r} is not available here: looked for {looked}; on a machine with "
        f"internet run `{PREPARE}`, copy DIR here and set data.path=DIR (or fill the HF "
        f"cache there and copy it)")


def data_files(path: Path) -> List[Path]:
    if path.is_file():
        return [path]
    return sorted(p for p in path.rglob("*") if p.is_file() and p.suffix.lower() in
                  DATA_SUFFIXES and not any(part.startswith(".") for part in p.parts))


def _check_file(path: Path) -> None:
    """Read a data file's header (parquet footer, arrow schema): a corrupt file is named."""
    try:
        if path.suffix == ".parquet":
            import pyarrow.parquet as pq
            pq.read_metadata(path)
        elif path.suffix == ".arrow":
            import pyarrow as pa
            with pa.memory_map(str(path)) as f:
                pa.ipc.open_stream(f).schema
    except Exception as e:
        raise DataError(f"data file {path} is not readable ({_first_line(e)})") from None


def _is_saved(path: Path) -> bool:
    return (path / "dataset_dict.json").is_file() or (path / "state.json").is_file()


def local_layout(path: Path, subset: Optional[str]) -> Tuple[str, Path]:
    """("saved" | "files", folder or file) of a local source, checked without decoding."""
    if not path.exists():
        raise DataError(f"data.path: {path} does not exist")
    if path.is_dir() and subset and (path / subset).is_dir():
        path = path / subset
    if path.is_dir() and _is_saved(path):
        files = data_files(path)
        for f in files:
            _check_file(f)
        return "saved", path
    if path.is_file() and path.suffix.lower() not in BUILDERS:
        raise DataError(f"data.path: {path}: expected a folder or a "
                        f"{'/'.join(sorted(BUILDERS))} file")
    files = data_files(path)
    if not files:
        raise DataError(f"data.path: {path} holds no data files ({', '.join(DATA_SUFFIXES)}) "
                        f"and is not a save_to_disk folder")
    for f in files:
        _check_file(f)
    return "files", path


def _load_local(path: Path, subset: Optional[str]) -> Dict[str, Any]:
    import datasets
    kind, where = local_layout(path, subset)
    try:
        with _quiet():
            if kind == "saved":
                loaded = datasets.load_from_disk(str(where))
            elif where.is_file():
                builder = BUILDERS[where.suffix.lower()]
                loaded = datasets.load_dataset(builder, data_files={"train": str(where)})
            else:
                loaded = datasets.load_dataset(str(where))
    except DataError:
        raise
    except Exception as e:
        raise DataError(f"data.path: {where} could not be read ({_first_line(e)})") from None
    if isinstance(loaded, datasets.Dataset):
        return {"train": loaded}
    return dict(loaded)


def hub_snapshot(name: str, revision: Optional[str] = None) -> Optional[Path]:
    """The cached snapshot folder of hub dataset ``name``, or None (no network)."""
    from huggingface_hub import snapshot_download
    try:
        return Path(snapshot_download(name, repo_type="dataset", revision=revision,
                                      local_files_only=True))
    except Exception:
        return None


def _load_hub(name: str, subset: Optional[str], revision: Optional[str]) -> Dict[str, Any]:
    import datasets
    from huggingface_hub import constants
    snapshot = hub_snapshot(name, revision)
    with _quiet():
        if snapshot is not None:
            with hub_offline():
                return dict(datasets.load_dataset(str(snapshot), subset))
        if not hub_reachable():
            try:
                with hub_offline():  # datasets' own cache of an earlier download
                    return dict(datasets.load_dataset(name, subset, revision=revision))
            except Exception:
                raise missing_dataset(name, f"the HF hub cache {constants.HF_HUB_CACHE} and "
                                      f"the datasets cache (the hub is not reachable"
                                      f"{', offline mode' if offline_requested() else ''}) "
                                      f"and data.path is not set") from None
        try:
            return dict(datasets.load_dataset(name, subset, revision=revision))
        except Exception as e:
            raise DataError(f"data.dataset: {name!r} (subset {subset!r}) could not be "
                            f"loaded from the hub ({_first_line(e)})") from None


def _check_path_exists(cfg: Any) -> None:
    if not Path(cfg.path).exists():
        raise missing_dataset(getattr(cfg, "dataset", None) or cfg.path,
                              f"data.path={cfg.path} (it does not exist)")


def open_splits(cfg: Any, args: SourceArgs) -> Dict[str, Any]:
    """All splits of the task's source, as ``datasets.Dataset`` objects by split name."""
    if cfg.path:
        _check_path_exists(cfg)
        return _load_local(Path(cfg.path), args.subset)
    name = getattr(cfg, "dataset", None)
    if not name:
        raise DataError(f"data.dataset / data.path: task {cfg.name!r} needs a hub dataset "
                        f"name or a local path")
    return _load_hub(name, args.subset, args.revision)


def check_source(cfg: Any, args: SourceArgs) -> None:
    """Cheap checks before workers start: the path exists and holds readable data files,
    or the hub dataset is cached or reachable. Columns are checked when splits load."""
    if cfg.path:
        _check_path_exists(cfg)
        local_layout(Path(cfg.path), args.subset)
        return
    name = getattr(cfg, "dataset", None)
    if not name:
        raise DataError(f"data.dataset / data.path: task {cfg.name!r} needs a hub dataset "
                        f"name or a local path")
    if hub_snapshot(name, args.revision) is None and not hub_reachable():
        from huggingface_hub import constants
        raise missing_dataset(name, f"the HF hub cache {constants.HF_HUB_CACHE} (the hub is "
                              f"not reachable) and data.path is not set")


def local_columns(path: Path, subset: Optional[str]) -> Dict[str, List[str]]:
    """Column names per data file or saved split, read from headers only ({} when the
    format has no cheap header: csv, json, text, images)."""
    import json
    kind, where = local_layout(path, subset)
    found: Dict[str, List[str]] = {}
    if kind == "saved":
        for info in sorted(where.rglob("dataset_info.json")):
            try:
                found[str(info.parent)] = list(json.loads(info.read_text())["features"])
            except (OSError, ValueError, KeyError, TypeError) as e:
                raise DataError(f"data file {info} is not readable ({_first_line(e)})") from None
        return found
    import pyarrow.parquet as pq
    for f in data_files(where):
        if f.suffix == ".parquet":
            found[str(f)] = list(pq.read_schema(f).names)
    return found


def check_columns(cfg: Any, args: SourceArgs, columns: Dict[str, str]) -> None:
    """``columns`` ({column: data.args key}) in every data file with a header."""
    if not cfg.path:
        return
    for where, names in local_columns(Path(cfg.path), args.subset).items():
        for column, key in columns.items():
            if column not in names:
                raise DataError(f"{where}: no column {column!r} ({key}); it has {names}")


def pick_splits(splits: Dict[str, Any], args: SourceArgs, usual_eval: Sequence[str],
                seed: int, eval_samples: int, where: str) -> Tuple[Any, Any]:
    """(training split, held-out split): named ones, the first usual held-out split that
    exists, or a seeded hold-out of the training split."""
    from .shards import held_out_split
    if args.train_split not in splits:
        raise DataError(f"data.args.train_split: {where} has no split {args.train_split!r}; "
                        f"it has {sorted(splits)}")
    train = splits[args.train_split]
    if args.eval_split is not None:
        if args.eval_split not in splits:
            raise DataError(f"data.args.eval_split: {where} has no split "
                            f"{args.eval_split!r}; it has {sorted(splits)}")
        return train, splits[args.eval_split]
    for name in usual_eval:
        if name in splits and name != args.train_split:
            return train, splits[name]
    held, kept = held_out_split(seed, len(train), min(eval_samples, len(train) // 5 or 1))
    return train.select(kept.tolist()), train.select(held.tolist())


def require_columns(ds: Any, columns: Dict[str, str], where: str) -> None:
    """``columns``: {column: the data.args key that names it}."""
    for column, key in columns.items():
        if column not in ds.column_names:
            raise DataError(f"{where}: no column {column!r} ({key}); it has "
                            f"{ds.column_names}")


def describe(cfg: Any) -> str:
    return f"data.path {cfg.path}" if cfg.path else f"dataset {getattr(cfg, 'dataset', None)!r}"
