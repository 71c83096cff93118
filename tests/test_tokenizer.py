"""The tokenizer: Llama 2's ids reproduced from its tokenizer.model, a trained tokenizer that
behaves like Llama 2's, HF == SentencePiece everywhere, and the `tinyllama tokenizer` stage."""

from __future__ import annotations

import hashlib
import io
import json
import pickle
import random
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import sentencepiece as spm
import yaml
from data_fixtures import document, program
from transformers import AutoTokenizer

from model.tokenizer import (
    MIN_VOCAB,
    Tokenizer,
    hf_backend,
    parse_model,
    save_tokenizer_dir,
    sentences,
    train_sentencepiece,
)
from tasks import cli

ROOT = Path(__file__).resolve().parents[1]
ASSETS = ROOT.parent / "shared" / "assets"
LLAMA2_MODEL = ASSETS / "tokenizer" / "llama2c_tokenizer.model"
GGML_VECTORS = ASSETS / "tokenizer" / "ggml-vocab-llama-spm.gguf"
needs_assets = pytest.mark.skipif(not LLAMA2_MODEL.is_file(), reason="../shared/assets absent")

# MANIFEST.md "Key verified facts": Llama 2's ids, no BOS.
LLAMA2_IDS = {
    "Hello world": [15043, 3186],
    "Hello, world!": [15043, 29892, 3186, 29991],
    " Hello world": [29871, 15043, 3186],
    "hello world\n": [22172, 3186, 13],
    "The capital of France is Paris.": [450, 7483, 310, 3444, 338, 3681, 29889],
    "12345": [29871, 29896, 29906, 29941, 29946, 29945],
    "<s>": [529, 29879, 29958],
    "\t\ttabs": [29871, 12, 12, 21175],
    "The quick brown fox jumps over the lazy dog.": [450, 4996, 17354, 1701, 29916, 432, 17204, 975, 278, 17366,
                                                     11203, 29889],
    # MANIFEST lists the emoji's byte-fallback ids; sentencepiece itself puts the dummy prefix
    # "▁" (29871) first, as for "12345".
    "🦙": [29871, 243, 162, 169, 156],
}

# Text SentencePiece treats specially: empty, whitespace runs, control characters, scripts the
# trainer never saw, emoji (byte fallback), digits, a literal "<s>".
EDGE_CASES = ["", " ", "   ", "\t", "\n\n", " \n \t x", "  leading and trailing  ", "Äpfel über Straße",
              "нещо на Български", "我想在apple工作1314151天～", "Cửa Việt", "🦙🚀 emoji 😶\u200d🌫️",
              "3.14159 and 1,000,000", "<s>not a bos</s>", "def f(x):\n\treturn x ** 2  # ok"]


def _ggml_vectors() -> list[tuple[str, list[int]]]:
    """llama.cpp's tokenizer test: inputs split on its separator (the file ends with one), ids per line."""
    inputs = GGML_VECTORS.with_suffix(".gguf.inp").read_text(encoding="utf-8").split("\n__ggml_vocab_test__\n")
    assert inputs[-1] == ""
    outputs = GGML_VECTORS.with_suffix(".gguf.out").read_text(encoding="utf-8").split("\n")
    return [(text, [int(i) for i in line.split()]) for text, line in zip(inputs[:-1], outputs)]


def _varied_text(seed: int, documents: int = 300) -> list[str]:
    """Pseudo-English prose, code in three languages, numbers and a few non-Latin lines."""
    rng = random.Random(seed)
    texts = [document(rng) for _ in range(documents)]
    texts += [program(rng, language, i) for i in range(documents // 3) for language in ("python", "rust", "js")]
    texts += [f"Order {rng.randint(0, 10**9)} shipped on "
              f"{rng.randint(1, 28)}.{rng.randint(1, 12)}.20{rng.randint(10, 30)}"
              for _ in range(documents // 3)]
    texts += ["Äpfel und Birnen über der Straße", "нещо на Български език", "我想在苹果工作", "Cửa Việt ở đâu"] * 5
    return texts


def _spm(model_bytes: bytes) -> spm.SentencePieceProcessor:
    return spm.SentencePieceProcessor(model_proto=model_bytes)


# ---------------------------------------------------------------- Llama 2's tokenizer.model, converted


@pytest.fixture(scope="module")
def llama2_dir(tmp_path_factory):
    return save_tokenizer_dir(LLAMA2_MODEL.read_bytes(), tmp_path_factory.mktemp("llama2") / "tokenizer")


@needs_assets
def test_converted_llama2_gives_llama2_ids_through_auto_tokenizer(llama2_dir):
    hf = AutoTokenizer.from_pretrained(llama2_dir)
    for text, ids in LLAMA2_IDS.items():
        # HF convention (chat templates rely on it): "<s>" in text is BOS unless special tokens are split.
        assert hf.encode(text, add_special_tokens=False, split_special_tokens=True) == ids, text
    assert hf("Hello world").input_ids == [1, 15043, 3186]
    assert hf.encode("<s>", add_special_tokens=False) == [1]
    assert hf.decode([1, 15043, 3186, 2], skip_special_tokens=True) == "Hello world"
    assert (hf.bos_token_id, hf.eos_token_id, hf.unk_token_id) == (1, 2, 0)
    assert sorted(p.name for p in llama2_dir.iterdir()) == ["special_tokens_map.json", "tokenizer.json",
                                                            "tokenizer.model", "tokenizer_config.json"]


@needs_assets
def test_converted_llama2_gives_llama2_ids_through_our_wrapper(llama2_dir):
    tokenizer = Tokenizer.load(llama2_dir)
    assert (tokenizer.vocab_size, tokenizer.bos_id, tokenizer.eos_id, tokenizer.unk_id) == (32000, 1, 2, 0)
    assert tokenizer.sha256 == hashlib.sha256(LLAMA2_MODEL.read_bytes()).hexdigest()
    for text, ids in LLAMA2_IDS.items():
        assert tokenizer.encode(text) == ids, text
    assert tokenizer.encode("Hello world", bos=True, eos=True) == [1, 15043, 3186, 2]
    assert tokenizer.encode_batch(list(LLAMA2_IDS), bos=True) == [[1, *ids] for ids in LLAMA2_IDS.values()]
    assert tokenizer.decode([1, 15043, 3186, 2]) == "Hello world"


@needs_assets
def test_all_llama_cpp_vectors(llama2_dir):
    vectors = _ggml_vectors()
    assert len(vectors) == 46
    texts = [text for text, _ in vectors]
    expected = [ids for _, ids in vectors]
    hf = AutoTokenizer.from_pretrained(llama2_dir)
    tokenizer = Tokenizer.load(llama2_dir)
    assert [hf.encode(t, add_special_tokens=False) for t in texts] == expected
    assert tokenizer.encode_batch(texts) == expected
    assert [tokenizer.encode(t) for t in texts] == expected
    assert [tokenizer.decode(ids) for ids in expected] == texts
    assert [hf.decode(ids) for ids in expected] == texts


@needs_assets
def test_checkpoint_dir_with_a_llama_config_still_encodes_exactly(llama2_dir, tmp_path):
    """Checkpoints carry these files next to a Llama config.json; transformers must not swap in its
    own LlamaTokenizer (whose Metaspace drops the dummy prefix of ' Hello')."""
    from transformers import LlamaConfig

    checkpoint = tmp_path / "checkpoint"
    shutil.copytree(llama2_dir, checkpoint)
    LlamaConfig(vocab_size=32000, hidden_size=64, intermediate_size=128, num_hidden_layers=1,
                num_attention_heads=4).save_pretrained(checkpoint)
    hf = AutoTokenizer.from_pretrained(checkpoint)
    vectors = _ggml_vectors()
    assert [hf.encode(t, add_special_tokens=False) for t, _ in vectors] == [ids for _, ids in vectors]


@needs_assets
def test_llama2_hf_equals_sentencepiece_on_real_text(llama2_dir):
    c4 = [json.loads(line)["text"] for line in (ASSETS / "pretrain/text/c4_demo.jsonl").open()][:100]
    wiki = (ASSETS / "pretrain/text/wiki_demo.txt").read_text().split("\n")[:5]
    shakespeare = (ASSETS / "pretrain/text/tinyshakespeare_input.txt").read_text()[:100_000].split("\n\n")
    texts = c4 + wiki + shakespeare + EDGE_CASES
    expected = _spm(LLAMA2_MODEL.read_bytes()).encode(texts)
    assert Tokenizer.load(llama2_dir).encode_batch(texts) == expected
    assert sum(map(len, expected)) > 50_000


# ---------------------------------------------------------------- training


VOCAB = 700


@pytest.fixture(scope="module")
def trained_model():
    return train_sentencepiece(_varied_text(seed=1), VOCAB, seed=7)


@pytest.fixture(scope="module")
def trained_dir(trained_model, tmp_path_factory):
    return save_tokenizer_dir(trained_model, tmp_path_factory.mktemp("trained") / "tokenizer")


def test_trained_tokenizer_has_llama2_layout_and_settings(trained_model, trained_dir):
    proto = parse_model(trained_model)
    pieces = [p.piece for p in proto.pieces]
    assert len(pieces) == VOCAB == Tokenizer.load(trained_dir).vocab_size
    assert pieces[:3] == ["<unk>", "<s>", "</s>"]
    assert pieces[3:MIN_VOCAB] == [f"<0x{b:02X}>" for b in range(256)]
    spec = proto.trainer_spec
    assert (spec.model_type, spec.byte_fallback, spec.split_digits, spec.allow_whitespace_only_pieces,
            spec.max_sentencepiece_length, spec.pad_id) == (spec.BPE, True, True, True, 16, -1)
    assert (proto.normalizer_spec.name, proto.normalizer_spec.add_dummy_prefix,
            proto.normalizer_spec.remove_extra_whitespaces) == ("identity", True, False)


@needs_assets
def test_trained_tokenizer_uses_every_llama2_trainer_setting(trained_model):
    """Field by field against Llama 2's own tokenizer.model, except what depends on the corpus."""
    ours, llama = parse_model(trained_model), parse_model(LLAMA2_MODEL.read_bytes())
    corpus_knobs = {"input", "input_format", "model_prefix", "vocab_size", "input_sentence_size", "num_threads",
                    "max_sentence_length", "shuffle_input_sentence"}
    for spec in ("trainer_spec", "normalizer_spec"):
        for field in getattr(llama, spec).DESCRIPTOR.fields:
            if field.name not in corpus_knobs:
                assert getattr(getattr(ours, spec), field.name) == getattr(getattr(llama, spec), field.name), field.name


def test_trained_tokenizer_byte_fallback_digits_and_round_trip(trained_model, trained_dir):
    tokenizer = Tokenizer.load(trained_dir)
    pieces = {i: p.piece for i, p in enumerate(parse_model(trained_model).pieces)}
    llama = "🦙"
    assert [pieces[i] for i in tokenizer.encode(llama)][-4:] == [f"<0x{b:02X}>" for b in llama.encode()]
    assert tokenizer.decode(tokenizer.encode(llama)) == llama
    digits = [pieces[i] for i in tokenizer.encode("1234567890") if pieces[i] != "▁"]
    assert digits == list("1234567890")
    learned = [pieces[i] for i in range(MIN_VOCAB, len(pieces))]
    assert any(p.isdigit() for p in learned)  # the training text is full of numbers...
    assert not [p for p in learned if sum(c.isdigit() for c in p) > 1]  # ...yet no piece joins two digits
    held_out = _varied_text(seed=2, documents=60) + EDGE_CASES
    assert [tokenizer.decode(ids) for ids in tokenizer.encode_batch(held_out)] == held_out


def test_trained_tokenizer_hf_equals_sentencepiece(trained_model, trained_dir):
    held_out = _varied_text(seed=3, documents=150) + EDGE_CASES
    expected = _spm(trained_model).encode(held_out)
    assert Tokenizer.load(trained_dir).encode_batch(held_out) == expected
    hf = AutoTokenizer.from_pretrained(trained_dir)
    assert [hf.encode(t, add_special_tokens=False, split_special_tokens=True) for t in held_out] == expected


@needs_assets
def test_trained_on_real_text_hf_equals_sentencepiece():
    wiki = (ASSETS / "pretrain/text/wiki_demo.txt").read_text().split("\n")
    c4 = [json.loads(line)["text"] for line in (ASSETS / "pretrain/text/c4_demo.jsonl").open()]
    model = train_sentencepiece(wiki + c4[:200], 2048, max_sentences=20_000)
    held_out = c4[200:] + EDGE_CASES
    assert Tokenizer(hf_backend(model), model).encode_batch(held_out) == _spm(model).encode(held_out)


def test_text_stays_text_even_after_pickling(trained_dir):
    """A document containing "<s>" must not inject a BOS, also in a worker the tokenizer was sent to."""
    tokenizer = Tokenizer.load(trained_dir)
    for copy in (tokenizer, pickle.loads(pickle.dumps(tokenizer))):
        ids = copy.encode("<s>x</s>")
        assert tokenizer.bos_id not in ids and tokenizer.eos_id not in ids and copy.decode(ids) == "<s>x</s>"


def test_training_is_deterministic(trained_model):
    assert train_sentencepiece(_varied_text(seed=1), VOCAB, seed=7) == trained_model


def test_sentences_are_lines_capped_and_cut_at_spaces():
    long_line = " ".join(["word"] * 20_000)  # 100K characters: above what the trainer accepts
    lines = sentences(["a\nb\n\n  \nc", long_line, "d"])
    assert lines[:3] == ["a", "b", "c"] and lines[-1] == "d"
    assert "".join(lines[3:-1]) == long_line and all(len(line.encode()) <= 1 << 16 for line in lines)
    assert sentences(["a\nb\nc", "d"], max_sentences=2) == ["a", "b"]


def test_training_errors_name_the_problem():
    with pytest.raises(ValueError, match="too small"):
        train_sentencepiece(_varied_text(seed=1, documents=30), MIN_VOCAB)
    with pytest.raises(ValueError, match="more than the training text supports"):
        train_sentencepiece(["tiny text"], 5000)
    with pytest.raises(ValueError, match="no training text"):
        train_sentencepiece(["", "\n\n"], 1000)


def test_load_rejects_a_missing_or_mismatched_dir(trained_dir, tmp_path):
    with pytest.raises(FileNotFoundError, match="tokenizer.model"):
        Tokenizer.load(tmp_path)
    broken = shutil.copytree(trained_dir, tmp_path / "broken")
    (broken / "tokenizer.model").write_bytes(train_sentencepiece(_varied_text(seed=1), VOCAB + 50))
    with pytest.raises(ValueError, match="pieces"):
        Tokenizer.load(broken)


# ---------------------------------------------------------------- the stage, through the CLI


def _params(tmp_path: Path, tokenizer: dict, model: dict | None = None, corpus: list[str] | None = None) -> Path:
    """The repo's params.yaml with a plain-text source (written here) and the given sections."""
    raw = yaml.safe_load((ROOT / "params.yaml").read_text())
    corpus_file = tmp_path / "corpus.txt"
    corpus_file.write_text("\n\n".join(_varied_text(seed=4) if corpus is None else corpus))
    raw["paths"] = {name: str(tmp_path / name) for name in ("data", "models", "metrics")}
    raw["data"]["sources"] = [{"name": "prose", "format": "text", "uri": str(corpus_file), "weight": 1.0}]
    raw["tokenizer"] = {"train_sources": ["prose"], **tokenizer}
    raw["model"] = model or {"preset": "tiny"}
    path = tmp_path / "params.yaml"
    path.write_text(yaml.safe_dump(raw))
    return path


def test_cli_trains_a_tokenizer(tmp_path):
    """The real entry point, as dvc.yaml calls it, in a fresh process."""
    params = _params(tmp_path, {"kind": "train", "vocab_size": 600, "max_sentences": 5000})
    result = subprocess.run([sys.executable, "-m", "tasks.cli", "tokenizer", "--params", str(params)],
                            capture_output=True, text=True, cwd=ROOT)
    assert result.returncode == 0, result.stderr
    out = tmp_path / "models" / "tokenizer"
    tokenizer = Tokenizer.load(out)
    assert tokenizer.vocab_size == 600 and out.name in result.stdout and tokenizer.sha256[:16] in result.stdout
    assert sorted(p.name for p in out.parent.iterdir()) == ["tokenizer"]  # no temp dirs left behind
    text = "The river town keeps a small library 42."
    assert AutoTokenizer.from_pretrained(out).encode(text, add_special_tokens=False) == tokenizer.encode(text)
    first = (out / "tokenizer.model").read_bytes()
    assert cli.main(["tokenizer", "--params", str(params)]) == 0
    assert (out / "tokenizer.model").read_bytes() == first  # rerun: same bytes, dir replaced in place


@needs_assets
def test_cli_converts_llama2(tmp_path):
    params = _params(tmp_path, {"kind": "pretrained", "vocab_size": 32000, "model_file": str(LLAMA2_MODEL)},
                     model={"preset": "tiny", "overrides": {"vocab_size": 32000}})
    assert cli.main(["tokenizer", "--params", str(params)]) == 0
    out = tmp_path / "models" / "tokenizer"
    assert (out / "tokenizer.model").read_bytes() == LLAMA2_MODEL.read_bytes()
    assert AutoTokenizer.from_pretrained(out).encode("Hello world", add_special_tokens=False) == [15043, 3186]


@pytest.fixture(scope="module")
def model_file(trained_model, tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("pretrained") / "tokenizer.model"
    path.write_bytes(trained_model)
    return path


def _bad_inputs(tmp_path: Path, model_file: Path):
    not_a_model = tmp_path / "notes.model"
    not_a_model.write_text("just text")
    unigram = tmp_path / "unigram.model"
    unigram_writer = io.BytesIO()
    spm.SentencePieceTrainer.train(sentence_iterator=iter(_varied_text(seed=1)), model_writer=unigram_writer,
                                   vocab_size=300, model_type="unigram", minloglevel=2)
    unigram.write_bytes(unigram_writer.getvalue())
    pretrained = {"kind": "pretrained", "vocab_size": VOCAB}
    fixed_model = {"preset": "tiny", "overrides": {"vocab_size": VOCAB}}
    return [
        ({**pretrained, "model_file": str(tmp_path / "missing.model")}, fixed_model, None,
         "tokenizer.model_file: file not found"),
        ({**pretrained, "model_file": str(not_a_model)}, fixed_model, None, "tokenizer.model_file: "),
        ({**pretrained, "model_file": str(unigram), "vocab_size": 300},
         {"preset": "tiny", "overrides": {"vocab_size": 300}},
         None, f"tokenizer.model_file: {unigram}: not a Llama-2-style SentencePiece BPE: model_type is UNIGRAM"),
        ({**pretrained, "model_file": str(model_file), "vocab_size": 2048}, fixed_model, None,
         f"tokenizer.vocab_size: 2048 does not match tokenizer.model_file {model_file} ({VOCAB} pieces)"),
        ({**pretrained, "model_file": str(model_file)}, {"preset": "tiny"}, None,
         "model.preset: the model's vocab_size is 2048 (preset 'tiny') but tokenizer.model_file"),
        ({"kind": "train", "vocab_size": 100}, None, None,
         "tokenizer.vocab_size: Input should be greater than or equal to 259"),
        ({"kind": "train", "vocab_size": MIN_VOCAB}, None, None,
         f"tokenizer.vocab_size: vocab size {MIN_VOCAB} is too small"),
        ({"kind": "train", "vocab_size": 30000}, None, None, "tokenizer.vocab_size: vocab size 30000 is more than"),
        ({"kind": "train", "vocab_size": 600}, {"preset": "tiny", "overrides": {"vocab_size": 512}}, None,
         "model.overrides.vocab_size: 512 differs from tokenizer.vocab_size 600"),
        ({"kind": "train", "vocab_size": 600}, None, ["", ""], "tokenizer.train_sources: ['prose'] contain no text"),
    ]


def test_bad_inputs_exit_2_name_the_field_and_write_nothing(tmp_path, model_file, capsys):
    for i, (tokenizer, model, corpus, needle) in enumerate(_bad_inputs(tmp_path, model_file)):
        case = tmp_path / f"case{i}"
        case.mkdir()
        assert cli.main(["tokenizer", "--params", str(_params(case, tokenizer, model, corpus))]) == 2, needle
        err = capsys.readouterr().err
        assert needle in err and len(err.strip().splitlines()) == 1, (needle, err)
        assert not (case / "models").exists(), needle


def test_a_failed_run_leaves_the_previous_tokenizer_untouched(tmp_path, trained_dir, capsys):
    out = tmp_path / "models" / "tokenizer"
    shutil.copytree(trained_dir, out)
    before = {p.name: p.read_bytes() for p in out.iterdir()}
    params = _params(tmp_path, {"kind": "train", "vocab_size": 30000})
    assert cli.main(["tokenizer", "--params", str(params)]) == 2
    assert "tokenizer.vocab_size" in capsys.readouterr().err
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before
    assert sorted(p.name for p in out.parent.iterdir()) == ["tokenizer"]
