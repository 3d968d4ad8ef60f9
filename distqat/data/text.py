"""Causal language modelling (wikitext's schema: one ``text`` column of rows).

The rows of a split are tokenised once, concatenated and packed into blocks of
``seq_len`` tokens (the remainder is dropped); a block is one sample, its ids are both
input and target (the objective shifts them). The token stream is cached on disk, keyed
by the split's fingerprint and the tokenizer, so the workers of a host and later runs do
not tokenise again. Tokenizer: ``data.args.tokenizer`` (a local folder, or a hub name in
the HF cache); ``<data.path>/tokenizer``, when ``prepare`` wrote one, wins; else a built-in
byte-level one (256 byte values and an end-of-text id) that needs nothing.
"""

from __future__ import annotations

import hashlib
import logging
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Dict, List, Optional

import torch

from ..fileio import torch_save
from .base import IndexedTask
from .source import (DataError, SourceArgs, describe, hub_reachable, open_splits,
                     pick_splits, require_columns)
from .task import Batch, CausalLM

log = logging.getLogger(__name__)
BYTE = "byte"


@dataclass
class TextArgs(SourceArgs):
    text_column: str = "text"
    seq_len: int = 128
    tokenizer: Optional[str] = None
    append_eos: bool = False  # an end-of-text id after every row (for document rows)

    def columns(self) -> dict:
        return {self.text_column: "data.args.text_column"}

    def __post_init__(self) -> None:
        super().__post_init__()
        if not isinstance(self.seq_len, int) or self.seq_len < 2:
            raise ValueError(f"data.args.seq_len: expected an integer >= 2, got "
                             f"{self.seq_len!r}")


class ByteTokenizer:
    """UTF-8 bytes as ids 0..255 and ``eos_token_id`` 256: no vocabulary file needed."""

    eos_token_id = 256
    name_or_path = BYTE

    def __len__(self) -> int:
        return 257

    def encode_rows(self, rows: List[str]) -> List[List[int]]:
        return [list(r.encode("utf-8")) for r in rows]

    def identity(self) -> str:
        return BYTE

    def save_pretrained(self, path: str) -> None:
        raise ValueError("the byte-level tokenizer has nothing to save")


class HFTokenizer:
    """A transformers tokenizer, encoding rows without special tokens."""

    def __init__(self, tok: Any):
        self.tok = tok
        self.eos_token_id = tok.eos_token_id
        self.name_or_path = tok.name_or_path

    def __len__(self) -> int:
        return len(self.tok)

    def encode_rows(self, rows: List[str]) -> List[List[int]]:
        return self.tok(rows, add_special_tokens=False)["input_ids"]

    def identity(self) -> str:
        backend = getattr(self.tok, "backend_tokenizer", None)
        text = backend.to_str() if backend is not None else repr(sorted(self.tok.get_vocab()))
        return hashlib.sha256(text.encode()).hexdigest()

    def save_pretrained(self, path: str) -> None:
        self.tok.save_pretrained(path)


def load_tokenizer(name: Optional[str], data_path: Optional[str] = None):
    """The tokenizer ``name`` (see the module docstring for the choice when it is null)."""
    if data_path and (Path(data_path) / "tokenizer").is_dir():
        # a prepared copy carries the tokenizer it was made with: it wins over a hub name
        name = str(Path(data_path) / "tokenizer")
    if name is None or name == BYTE:
        return ByteTokenizer()
    from ..compat import import_torchvision
    import_torchvision()  # transformers imports torchvision when it is installed
    from transformers import AutoTokenizer
    local = Path(name).is_dir()
    try:
        return HFTokenizer(AutoTokenizer.from_pretrained(name, local_files_only=True))
    except Exception as e:
        if local or not hub_reachable():
            where = f"the folder {name}" if local else "the HF cache (hub not reachable)"
            raise DataError(f"data.args.tokenizer: {name!r} could not be loaded from {where} "
                            f"({type(e).__name__}); use a folder written by "
                            f"`python -m distqat.data prepare` or tokenizer: byte") from None
    return HFTokenizer(AutoTokenizer.from_pretrained(name))


def cache_dir() -> Path:
    return Path(os.environ.get("DISTQAT_CACHE", Path.home() / ".cache" / "distqat")) / "tokens"


_MEMO: Dict[str, torch.Tensor] = {}


def token_stream(ds: Any, column: str, tokenizer: Any, append_eos: bool) -> torch.Tensor:
    """All tokens of split ``ds`` in row order (int64), cached on disk and in memory."""
    key = hashlib.sha256(f"{ds._fingerprint}|{column}|{tokenizer.identity()}|{append_eos}"
                         .encode()).hexdigest()[:32]
    if key in _MEMO:
        return _MEMO[key]
    path = cache_dir() / f"{key}.pt"
    if path.is_file():
        try:
            _MEMO[key] = torch.load(path, weights_only=True).long()
            return _MEMO[key]
        except Exception as e:  # a torn or foreign file: tokenise again and replace it
            log.warning("token cache %s unreadable (%s); tokenising again", path, e)
    rows = [r for r in ds[column] if r]
    ids: List[int] = []
    eos = [tokenizer.eos_token_id] if append_eos and tokenizer.eos_token_id is not None else []
    for start in range(0, len(rows), 1000):
        for row in tokenizer.encode_rows(rows[start:start + 1000]):
            ids.extend(row)
            ids.extend(eos)
    stream = torch.tensor(ids, dtype=torch.int32)
    try:
        torch_save(path, stream)
    except OSError as e:
        log.warning("could not cache tokens at %s (%s)", path, e)
    _MEMO[key] = stream.long()
    return _MEMO[key]


def pack(stream: torch.Tensor, seq_len: int, where: str) -> torch.Tensor:
    blocks = len(stream) // seq_len
    if blocks == 0:
        raise DataError(f"{where}: {len(stream)} tokens make no block of data.args.seq_len="
                        f"{seq_len}")
    return stream[: blocks * seq_len].view(blocks, seq_len)


class TextTask(IndexedTask):
    def __init__(self, cfg: Any):
        from .task import task_args
        self.args: TextArgs = task_args(cfg)
        self.seed, self.eval_samples = cfg.seed, cfg.eval_samples
        self.objective = CausalLM()
        where = describe(cfg)
        train, held = pick_splits(open_splits(cfg, self.args), self.args,
                                  ("validation", "valid", "test"), cfg.seed,
                                  cfg.eval_samples, where)
        column = {self.args.text_column: "data.args.text_column"}
        require_columns(train, column, f"{where} (train split)")
        require_columns(held, column, f"{where} (eval split)")
        self.tokenizer = load_tokenizer(self.args.tokenizer, cfg.path)
        encode = lambda ds: token_stream(ds, self.args.text_column,  # noqa: E731
                                         self.tokenizer, self.args.append_eos)
        self.train_blocks = pack(encode(train), self.args.seq_len, f"{where} (train split)")
        self.eval_blocks = pack(encode(held), self.args.seq_len, f"{where} (eval split)")

    def num_train(self) -> int:
        return len(self.train_blocks)

    def num_eval(self) -> int:
        return len(self.eval_blocks)

    def model_io(self) -> dict:
        return {"vocab_size": len(self.tokenizer), "seq_len": self.args.seq_len}

    def train_examples(self, indices: List[int],
                       generators: Optional[List[torch.Generator]]) -> Batch:
        x = self.train_blocks[torch.tensor(indices, dtype=torch.long)]
        return x, x.clone()

    def eval_examples(self, indices: List[int]) -> Batch:
        x = self.eval_blocks[torch.tensor(indices, dtype=torch.long)]
        return x, x.clone()
