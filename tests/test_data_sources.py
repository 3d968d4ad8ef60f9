"""The dataset-backed tasks on tiny datasets written in the hub's schemas (both the hub's
parquet layout and save_to_disk): pure batches, shards, epochs, model_io, eval sets."""

import pytest
import torch
from hub_datasets import cifar_like, data_config, speech_like, wikitext_like

from distqat.data import make_task

ARGS = {"image": {}, "text": {"seq_len": 16}, "audio": {"num_samples": 4000}}
WRITERS = {"image": cifar_like, "text": wikitext_like, "audio": speech_like}


@pytest.fixture(scope="module")
def sources(tmp_path_factory):
    root = tmp_path_factory.mktemp("hub")
    return {(name, layout): WRITERS[name](root / f"{name}-{layout}", layout=layout)
            for name in WRITERS for layout in ("parquet", "disk")}


@pytest.fixture(autouse=True)
def token_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("DISTQAT_CACHE", str(tmp_path / "cache"))


def _task(sources, name, layout, **kw):
    return make_task(data_config(name, path=sources[(name, layout)], args=ARGS[name], **kw))


def _same(a, b):
    return torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])


@pytest.mark.parametrize("layout", ["parquet", "disk"])
@pytest.mark.parametrize("name", ["image", "text", "audio"])
def test_batches_are_pure_sharded_and_continue_across_epochs(sources, name, layout):
    task = _task(sources, name, layout)
    n = task.num_train()
    a = task.batch(0, 8, 8)
    assert _same(a, task.batch(0, 8, 8))
    assert _same(a, _task(sources, name, layout).batch(0, 8, 8))  # after a "restart"
    assert not torch.equal(a[0], task.batch(1, 8, 8)[0])
    assert not torch.equal(a[0], task.batch(0, 16, 8)[0])
    across = task.batch(2, n - 3, 6)  # three samples of epoch 0, three of epoch 1
    assert _same(across, tuple(torch.cat(p) for p in zip(task.batch(2, n - 3, 3),
                                                          task.batch(2, n, 3))))
    ids = task.sample_ids(2, 0, n)
    assert sorted(ids) == list(range(n))  # an epoch is a permutation of the split
    assert task.sample_ids(2, n, n) != ids  # the next epoch has its own order


def test_layouts_read_the_same_examples(sources):
    for name in WRITERS:
        p, d = _task(sources, name, "parquet"), _task(sources, name, "disk")
        assert _same(p.batch(1, 5, 7), d.batch(1, 5, 7))
        assert _same(p.eval_set(), d.eval_set())


def test_image_task(sources):
    task = _task(sources, "image", "parquet", eval_samples=20)
    assert task.model_io() == {"input_shape": [3, 32, 32], "num_classes": 10}
    x, y = task.batch(0, 0, 16)
    assert x.shape == (16, 3, 32, 32) and x.dtype == torch.float32 and y.dtype == torch.int64
    ex, ey = task.eval_set()
    assert ex.shape == (20, 3, 32, 32) and _same((ex, ey), task.eval_set())
    assert task.num_eval() == 50  # the test split, capped by eval_samples
    # training samples are cropped and flipped; the calibration batch is not augmented
    plain = make_task(data_config("image", path=sources[("image", "parquet")],
                                  args={"crop_padding": 0, "flip": False}))
    ids = task.sample_ids(0, 0, 16)
    raw = torch.stack([plain.train_examples([i], None)[0][0] for i in ids])
    assert torch.equal(plain.batch(0, 0, 16)[0], raw)
    assert not torch.equal(x, raw)
    assert torch.equal(task.calibration_batch(8)[0], task.calibration_batch(8)[0])
    # normalised with the CIFAR statistics: decoded pixels / 255, minus mean, over std
    assert x.abs().max() < 3.0


def test_text_task_packs_blocks(sources):
    task = _task(sources, "text", "parquet")
    assert task.model_io() == {"vocab_size": 257, "seq_len": 16}
    x, y = task.batch(0, 0, 4)
    assert x.dtype == torch.int64 and x.shape == (4, 16) and torch.equal(x, y)
    assert int(x.max()) < 256
    stream = torch.cat([task.train_blocks[i] for i in range(task.num_train())])
    from datasets import load_from_disk
    text = "".join(r for r in load_from_disk(str(sources[("text", "disk")]))["train"]["text"])
    assert bytes(stream.tolist()) == text.encode()[: len(stream)]


def test_text_task_with_a_tokenizer_folder(sources, tmp_path):
    from hub_datasets import wikitext_lines
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.train_from_iterator(wikitext_lines(200), trainers.BpeTrainer(
        vocab_size=300, special_tokens=["<|endoftext|>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|endoftext|>")
    fast.save_pretrained(str(tmp_path / "tok"))
    task = make_task(data_config("text", path=sources[("text", "parquet")],
                                 args={"seq_len": 8, "tokenizer": str(tmp_path / "tok")}))
    assert task.model_io() == {"vocab_size": len(fast), "seq_len": 8}
    x, _ = task.batch(0, 0, 3)
    train_text = "".join(wikitext_lines(300, seed=0))  # what wikitext_like wrote to train
    assert all(fast.decode(row.tolist()) in train_text for row in x)
    assert int(x.max()) < len(fast)
    # the cache gives the same blocks without tokenising again
    again = make_task(data_config("text", path=sources[("text", "parquet")],
                                  args={"seq_len": 8, "tokenizer": str(tmp_path / "tok")}))
    assert torch.equal(again.train_blocks, task.train_blocks)


def test_audio_task(sources):
    task = _task(sources, "audio", "disk")
    assert task.model_io() == {"input_shape": [4000], "num_classes": 4}
    x, y = task.batch(0, 0, 8)
    assert x.shape == (8, 4000) and x.dtype == torch.float32
    ex, _ = task.eval_set()
    assert ex.shape == (30, 4000)
    # clips of 0.5 to 1 s are cut to 4000 samples (random window in training)
    long = make_task(data_config("audio", path=sources[("audio", "disk")],
                                 args={"num_samples": 20000}))
    lx, _ = long.eval_set()
    assert lx.shape == (30, 20000) and (lx[:, 16000:] == 0).all()  # zero padded
    # the class tone is there: the spectrum peaks at 300 * (label + 1) Hz
    spectrum = torch.fft.rfft(ex).abs()
    peak_hz = spectrum.argmax(dim=1).float() * 16000 / 4000
    assert torch.allclose(peak_hz, 300.0 * (task.eval_set()[1] + 1), atol=8)


def test_single_split_source_holds_out_samples(tmp_path):
    from datasets import load_from_disk
    src = cifar_like(tmp_path / "c", layout="disk")
    load_from_disk(str(src))["train"].save_to_disk(str(tmp_path / "only_train"))
    task = make_task(data_config("image", path=tmp_path / "only_train", eval_samples=30))
    assert task.num_train() + task.num_eval() == 200 and task.num_eval() == 30
