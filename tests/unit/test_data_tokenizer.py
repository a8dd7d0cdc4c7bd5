"""Tokenizers (bytes and byte-level BPE), the tokenizer a checkpoint carries, and sampling that
decodes with it."""

from __future__ import annotations

import pytest
import torch

from node import checkpoint
from node.data import Batches, ByteTokenizer, Corpus, bundled_corpus_path
from node.model.config import OptimSettings
from node.model.resbm import ResBM
from node.runtime import StageRuntime
from node.sample import generate, generate_from_checkpoint
from node.tokenizer import from_definition, load_tokenizer, train_bpe
from tests.helpers import tiny_model

pytestmark = pytest.mark.unit

TEXT = bundled_corpus_path().read_text()[:10_000]


def test_byte_tokenizer_is_still_the_default_and_has_a_stable_definition():
    tok = ByteTokenizer()
    assert (tok.spec, tok.vocab_size, tok.separator, tok.name) == ("bytes", 256, [], "bytes-v1")
    assert from_definition(tok.definition()).hash == tok.hash
    assert load_tokenizer("bytes").hash == tok.hash
    assert isinstance(Corpus.load().tokenizer, ByteTokenizer)


def test_bpe_round_trips_any_text_and_its_definition_is_stable():
    tok = train_bpe(iter(TEXT.splitlines(keepends=True)), 300)
    assert tok.vocab_size == 300 and tok.spec == "bpe:300" and len(tok.separator) == 1
    for text in (TEXT, "", "ünïcode ✓ 世界 🎭 \x00\r\n", "<|endoftext|> inside"):
        assert tok.decode(tok.encode(text)) == text
    again = from_definition(tok.definition())
    assert again.hash == tok.hash and again.encode(TEXT) == tok.encode(TEXT)
    assert tok.encode_batch(["ab", "cd"]) == [tok.encode("ab"), tok.encode("cd")]
    with pytest.raises(ValueError, match="vocab_size > 257"):
        train_bpe([TEXT], 200)


def test_load_tokenizer_errors_name_what_to_do(tmp_path):
    with pytest.raises(FileNotFoundError, match="resbm data prepare"):
        load_tokenizer("bpe:300", tmp_path)
    with pytest.raises(ValueError, match="bpe:VOCAB"):
        load_tokenizer("bpe:big", tmp_path)
    (tmp_path / "bad.json").write_text("{not json")
    with pytest.raises(ValueError, match=r"bad\.json"):
        load_tokenizer("bad.json", tmp_path)


def _save_model(directory, model):
    batches = Batches(Corpus.without_tokens("0" * 16), model.cfg.seq_len, 1, 0)
    for stage in model.stages():
        checkpoint.save_stage(directory, StageRuntime(stage, OptimSettings(), batches, 1), 0)


def test_a_checkpoint_carries_its_tokenizer_and_sample_decodes_with_it(tmp_path):
    bpe = train_bpe([TEXT], 300)
    torch.manual_seed(0)
    model = ResBM(tiny_model(vocab_size=300))
    _save_model(tmp_path, model)
    assert isinstance(checkpoint.load_tokenizer(tmp_path), ByteTokenizer)  # older checkpoints
    checkpoint.save_tokenizer(tmp_path, bpe)
    assert checkpoint.load_tokenizer(tmp_path).hash == bpe.hash
    text, step = generate_from_checkpoint(tmp_path, "ROMEO: ✓", 12, temperature=0)
    assert step == 0 and text.startswith("ROMEO: ✓")
    assert text == generate(model, "ROMEO: ✓", 12, temperature=0, tokenizer=bpe)
    small = ResBM(tiny_model())  # vocab 256: not a model of this tokenizer
    with pytest.raises(ValueError, match="300 tokens but the model only 256"):
        generate(small, "x", 1, tokenizer=bpe)
    checkpoint.save_tokenizer(tmp_path, ByteTokenizer())
    assert checkpoint.load_tokenizer(tmp_path).spec == "bytes"
