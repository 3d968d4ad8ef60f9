"""``python -m distqat.data prepare --config CONFIG --out DIR [key=value ...]``

On a machine with internet: downloads the config's dataset (``data.dataset``, or reads
``data.path``) and saves all its splits with ``save_to_disk`` to DIR, and the tokenizer of
a text task (``data.args.tokenizer``, when it is not the byte-level one) to DIR/tokenizer.
Copy DIR to the offline machines and run there with ``data.path=DIR`` (a text task finds
DIR/tokenizer by itself when ``data.args.tokenizer`` is null). Exits 2 on a user error.
"""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path
from typing import Any, List, Optional

log = logging.getLogger(__name__)


def prepare(data: Any, out: Path) -> List[str]:
    """Save ``data``'s dataset (and tokenizer) under ``out``; the overrides to use it."""
    from datasets import DatasetDict

    from .source import DataError, SourceArgs, open_splits
    from .task import task_args
    args = task_args(data)
    if not isinstance(args, SourceArgs):
        raise DataError(f"data.name: task {data.name!r} reads no dataset; nothing to prepare")
    out = Path(out)
    if out.exists() and any(out.iterdir()):
        raise DataError(f"--out: {out} exists and is not empty")
    splits = open_splits(data, args)
    DatasetDict(splits).save_to_disk(str(out))
    overrides = [f"data.path={out}"]
    tokenizer = getattr(args, "tokenizer", None)
    if tokenizer not in (None, "byte"):
        from .text import load_tokenizer
        load_tokenizer(tokenizer, None).save_pretrained(str(out / "tokenizer"))
        overrides.append(f"data.args.tokenizer={out / 'tokenizer'}")
    log.info("saved %s (%s) to %s", data.dataset or data.path,
             {k: len(v) for k, v in splits.items()}, out)
    return overrides


def main(argv: Optional[List[str]] = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m distqat.data", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("prepare", help="save a config's dataset for offline use")
    p.add_argument("--config", required=True)
    p.add_argument("--out", required=True, type=Path)
    p.add_argument("overrides", nargs="*", help="key.sub=value")
    ns = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    from ..config import load_config
    try:
        cfg = load_config(ns.config, ns.overrides)
        overrides = prepare(cfg.data, ns.out)
    except ValueError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(" ".join(overrides))
    return 0


if __name__ == "__main__":
    sys.exit(main())
