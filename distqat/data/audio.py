"""Speech classification of fixed-length clips (google/speech_commands' schema: an
``audio`` column and a ``label``).

``datasets`` 5 decodes its Audio feature with torchcodec (FFmpeg); this task reads the
column with ``Audio(decode=False)`` instead and decodes the bytes (or the file at the
stored path) with soundfile, whose wheel carries libsndfile. Clips are mixed down to mono,
resampled linearly to ``sample_rate`` when they differ, and cut or zero-padded to
``num_samples``: training takes a random window of a longer clip (drawn from the sample's
own generator, so batches stay pure), eval and calibration the centre one.
"""

from __future__ import annotations

import io
from dataclasses import dataclass
from typing import Any, List, Optional

import torch
import torch.nn.functional as F

from .base import IndexedTask, count_classes, stack_labels
from .source import DataError, SourceArgs, describe, open_splits, pick_splits, require_columns
from .task import Batch, Classification


@dataclass
class AudioArgs(SourceArgs):
    audio_column: str = "audio"
    label_column: str = "label"
    num_classes: Optional[int] = None
    sample_rate: int = 16000
    num_samples: int = 16000

    def columns(self) -> dict:
        return {self.audio_column: "data.args.audio_column", self.label_column: "data.args.label_column"}

    def __post_init__(self) -> None:
        super().__post_init__()
        for name in ("sample_rate", "num_samples"):
            value = getattr(self, name)
            if not isinstance(value, int) or value < 1:
                raise ValueError(f"data.args.{name}: expected a positive integer, got {value!r}")
        if self.num_classes is not None and self.num_classes < 2:
            raise ValueError(f"data.args.num_classes: expected >= 2, got {self.num_classes}")


def decode_clip(value: Any, rate: int, where: str) -> torch.Tensor:
    """A mono float32 waveform at ``rate`` from ``{bytes, path}``."""
    import soundfile as sf
    try:
        data = value.get("bytes") if isinstance(value, dict) else None
        source = io.BytesIO(data) if data else value["path"]
        samples, file_rate = sf.read(source, dtype="float32", always_2d=True)
    except Exception as e:
        raise DataError(f"{where}: not a readable audio clip ({type(e).__name__}: "
                        f"{str(e).splitlines()[0] if str(e) else ''})") from None
    wave = torch.from_numpy(samples).mean(dim=1)
    if file_rate != rate and len(wave) > 1:
        length = max(1, round(len(wave) * rate / file_rate))
        wave = F.interpolate(wave[None, None], size=length, mode="linear",
                             align_corners=False)[0, 0]
    return wave


def fit(wave: torch.Tensor, length: int, gen: Optional[torch.Generator]) -> torch.Tensor:
    """Cut to ``length`` (a random window with ``gen``, else the centre) or zero-pad."""
    if len(wave) >= length:
        spare = len(wave) - length
        start = int(torch.randint(0, spare + 1, (), generator=gen)) if gen else spare // 2
        return wave[start:start + length]
    return F.pad(wave, (0, length - len(wave)))


class AudioTask(IndexedTask):
    def __init__(self, cfg: Any):
        from .task import task_args
        self.args: AudioArgs = task_args(cfg)
        self.seed, self.eval_samples = cfg.seed, cfg.eval_samples
        self.objective = Classification()
        self.where = describe(cfg)
        train, held = pick_splits(open_splits(cfg, self.args), self.args,
                                  ("validation", "test", "valid"), cfg.seed,
                                  cfg.eval_samples, self.where)
        from datasets import Audio
        columns = {self.args.audio_column: "data.args.audio_column",
                   self.args.label_column: "data.args.label_column"}
        splits = []
        for name, ds in (("train", train), ("eval", held)):
            require_columns(ds, columns, f"{self.where} ({name} split)")
            if isinstance(ds.features[self.args.audio_column], Audio):
                ds = ds.cast_column(self.args.audio_column, Audio(decode=False))
            splits.append(ds)
        self.train, self.held = splits
        self.num_classes = count_classes(self.train, self.args.label_column,
                                         self.args.num_classes, "data.args.num_classes")

    def num_train(self) -> int:
        return len(self.train)

    def num_eval(self) -> int:
        return len(self.held)

    def model_io(self) -> dict:
        return {"input_shape": [self.args.num_samples], "num_classes": self.num_classes}

    def _examples(self, ds, indices: List[int], gens: Optional[List[torch.Generator]],
                  split: str) -> Batch:
        rows = ds[indices]
        clips = []
        for k, (i, value) in enumerate(zip(indices, rows[self.args.audio_column])):
            wave = decode_clip(value, self.args.sample_rate, f"{self.where} row {i}")
            clips.append(fit(wave, self.args.num_samples, gens[k] if gens else None))
        return torch.stack(clips), stack_labels(rows[self.args.label_column],
                                                f"{self.where} ({split} split)",
                                                self.num_classes)

    def train_examples(self, indices: List[int],
                       generators: Optional[List[torch.Generator]]) -> Batch:
        return self._examples(self.train, indices, generators, "train")

    def eval_examples(self, indices: List[int]) -> Batch:
        return self._examples(self.held, indices, None, "eval")
