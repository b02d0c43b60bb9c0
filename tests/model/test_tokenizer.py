"""The CodeGen tokenizer against transformers' CodeGenTokenizer, on a tiny BPE trained here.

The folders written here have the layout of the Salesforce repos (vocab.json, merges.txt,
added_tokens.json with the 38 whitespace tokens, special_tokens_map.json,
tokenizer_config.json), so transformers loads them exactly as it loads the published models.

In transformers 5 `CodeGenTokenizerFast` is an alias of `CodeGenTokenizer` (the `tokenizers`
backed class); both names are checked. The pure-Python tokenizer of transformers 4 decoded the
whitespace tokens with a space on either side (`spaces_between_special_tokens`), which breaks
`decode(encode(text)) == text`, and v4 defaulted to `clean_up_tokenization_spaces=True`
(`" ."` -> `"."`). We follow the `tokenizers` one, HF's default since v4 and the only one in v5:
its decoding is exact.
"""

from __future__ import annotations

import json
import random
import shutil
from pathlib import Path

import pytest
from tokenizers import Tokenizer, models

from codegen_repl.errors import TokenizerError
from codegen_repl.model.tokenizer import (
    EOS_TOKEN,
    WHITESPACE_TOKENS,
    CodeGenTokenizer,
    load_tokenizer,
)
from tests.conftest import train_bpe, vocab_and_merges, write_repo_files

transformers = pytest.importorskip("transformers")

GPT2_VOCAB_SIZE = 50257  # the real CodeGen/GPT-2 base vocabulary, <|endoftext|> last

TEXTS = [
    "",
    "def add(a, b):\n    return a + b\n",
    "class A:\n    def f(self):\n        if True:\n            return 1\n",
    "x = 1" + " " * 40 + "# forty spaces\n" + " " * 40 + "y",
    "\tdef tabs():\n\t\treturn\n\t\t\t\t\t\t\t\t\t\t\t\tdone\n",
    "mixed:\n \t  \t\t    \t\n  \t",
    " " * 2 + "a" + " " * 31 + "b" + " " * 32 + "c" + " " * 63,
    "print('héllo wörld, café') # accents\n",
    "s = '😀🐍🚀' + '中文字符' + 'Ελληνικά' + 'עברית'\n",
    "first<|endoftext|>second<|endoftext|><|endoftext|>",
    "    <|endoftext|>    \n",
    "<|endoftext| partial <|endof",
    "Ġ Ċ ĉ byte-level alphabet as text\r\n\x00\x7f",
    "   leading spaces and trailing   ",
    "\n\n\n",
]


def gpt2_sized_vocab(vocab: dict[str, int]) -> dict[str, int]:
    """The trained vocab padded to GPT-2's 50257 ids, with <|endoftext|> last (id 50256)."""
    tokens = [token for token in sorted(vocab, key=vocab.__getitem__) if token != EOS_TOKEN]
    tokens += [f"<filler-{index}>" for index in range(GPT2_VOCAB_SIZE - 1 - len(tokens))]
    return {token: index for index, token in enumerate([*tokens, EOS_TOKEN])}


def random_texts(count: int, seed: int = 1234) -> list[str]:
    """Seeded random strings over code, whitespace, unicode and the EOS marker."""
    rng = random.Random(seed)
    pieces = [
        *"abcxyzXYZ0189_()[]{}:;.,'\"#=+-*/\\<>|!?@$%^&~`",
        " ", "  ", " " * 4, " " * 8, " " * 33, "\t", "\t\t", "\t" * 11, "\n", "\r\n", " \t",
        "é", "ß", "中", "字", "😀", "👩‍💻", "\u200b", "\x00", "\x7f", "\ufeff", "Ġ", "Ċ",
        "def ", "return", " self", "<|endoftext|>", "<|endoftext", "|>",
    ]  # fmt: skip
    return ["".join(rng.choices(pieces, k=rng.randint(0, 40))) for _ in range(count)]


@pytest.fixture(scope="module")
def trained() -> tuple[dict[str, int], list[str]]:
    return vocab_and_merges(train_bpe())


@pytest.fixture(scope="module")
def repo(tmp_path_factory: pytest.TempPathFactory, trained: tuple[dict, list]) -> Path:
    return write_repo_files(tmp_path_factory.mktemp("codegen-repo"), *trained)


@pytest.fixture(scope="module")
def tokenizer(repo: Path) -> CodeGenTokenizer:
    return CodeGenTokenizer.from_dir(repo)


@pytest.fixture(scope="module", params=["CodeGenTokenizer", "CodeGenTokenizerFast"])
def reference(request: pytest.FixtureRequest, repo: Path) -> object:
    return getattr(transformers, request.param).from_pretrained(repo)


# --- parity with transformers -----------------------------------------------------------------


@pytest.mark.parametrize("text", TEXTS)
def test_ids_match_transformers(tokenizer: CodeGenTokenizer, reference, text: str) -> None:
    assert tokenizer.encode(text) == reference(text)["input_ids"]


def test_random_ids_match_transformers(tokenizer: CodeGenTokenizer, reference) -> None:
    texts = random_texts(300)
    assert tokenizer.encode_batch(texts) == reference(texts)["input_ids"]


@pytest.mark.parametrize("text", TEXTS)
def test_decode_matches_transformers(tokenizer: CodeGenTokenizer, reference, text: str) -> None:
    ids = tokenizer.encode(text)
    for skip in (False, True):
        assert tokenizer.decode(ids, skip_special_tokens=skip) == reference.decode(
            ids, skip_special_tokens=skip
        )


def test_sizes_and_eos_match_transformers(tokenizer: CodeGenTokenizer, reference) -> None:
    assert tokenizer.vocab_size == len(reference)
    assert tokenizer.eos_token == reference.eos_token == EOS_TOKEN
    assert tokenizer.eos_token_id == reference.eos_token_id
    for token in (*WHITESPACE_TOKENS, EOS_TOKEN, "Ġ", "def"):
        assert tokenizer.token_to_id(token) == reference.convert_tokens_to_ids(token)


# --- whitespace tokens ------------------------------------------------------------------------


def test_whitespace_tokens_follow_the_vocab_in_codegen_order(
    tokenizer: CodeGenTokenizer, trained: tuple[dict, list]
) -> None:
    base = len(trained[0])
    ids = [tokenizer.token_to_id(token) for token in WHITESPACE_TOKENS]
    assert ids == list(range(base, base + 38))
    assert tokenizer.id_to_token(base) == " " * 31
    assert tokenizer.id_to_token(base + 29) == "  "
    assert tokenizer.id_to_token(base + 30) == "\t" * 9
    assert tokenizer.id_to_token(base + 37) == "\t\t"
    assert tokenizer.vocab_size == base + 38


def test_indentation_is_split_off_before_bpe(tokenizer: CodeGenTokenizer) -> None:
    # The longest whitespace run wins, and the word after it loses its leading space.
    ids = tokenizer.encode("        return")
    assert ids[0] == tokenizer.token_to_id(" " * 8)
    assert tokenizer.decode(ids[1:]) == "return"
    assert tokenizer.encode(" " * 40) == [
        tokenizer.token_to_id(" " * 31),
        tokenizer.token_to_id(" " * 9),
    ]
    assert tokenizer.encode("\t" * 12) == [
        tokenizer.token_to_id("\t" * 9),
        tokenizer.token_to_id("\t" * 3),
    ]


def test_gpt2_sized_vocab_gives_codegen_ids(
    tmp_path: Path, trained: tuple[dict, list], reference
) -> None:
    vocab = gpt2_sized_vocab(trained[0])
    with_file = CodeGenTokenizer.from_dir(write_repo_files(tmp_path / "a", vocab, trained[1]))
    without_file = CodeGenTokenizer.from_dir(
        write_repo_files(tmp_path / "b", vocab, trained[1], with_added_tokens=False)
    )
    expected = {" " * 31: 50257, "  ": 50286, "\t" * 9: 50287, "\t\t": 50294}
    for tokenizer in (with_file, without_file):
        assert tokenizer.eos_token_id == 50256
        assert tokenizer.vocab_size == 50295
        assert [tokenizer.token_to_id(t) for t in WHITESPACE_TOKENS] == list(range(50257, 50295))
        assert {token: tokenizer.token_to_id(token) for token in expected} == expected
    hf = type(reference).from_pretrained(tmp_path / "a")
    assert with_file.encode(TEXTS[2] + TEXTS[9]) == hf(TEXTS[2] + TEXTS[9])["input_ids"]


def test_missing_whitespace_tokens_are_appended(
    tmp_path: Path, trained: tuple[dict, list], tokenizer: CodeGenTokenizer
) -> None:
    # transformers would give plain GPT-2 here (no indentation tokens); CodeGen needs them.
    folder = write_repo_files(tmp_path, *trained, with_added_tokens=False)
    appended = CodeGenTokenizer.from_dir(folder)
    assert appended.encode_batch(TEXTS) == tokenizer.encode_batch(TEXTS)


def test_partial_added_tokens_keep_their_ids(tmp_path: Path, trained: tuple[dict, list]) -> None:
    vocab, merges = trained
    folder = write_repo_files(tmp_path, vocab, merges, with_added_tokens=False)
    spaces = [token for token in WHITESPACE_TOKENS if " " in token]
    added = {token: len(vocab) + index for index, token in enumerate(spaces)}
    (folder / "added_tokens.json").write_text(json.dumps(added), encoding="utf-8")
    loaded = CodeGenTokenizer.from_dir(folder)
    assert [loaded.token_to_id(t) for t in WHITESPACE_TOKENS] == list(
        range(len(vocab), len(vocab) + 38)
    )


# --- round trips ------------------------------------------------------------------------------


@pytest.mark.parametrize("text", TEXTS)
def test_decode_inverts_encode(tokenizer: CodeGenTokenizer, text: str) -> None:
    assert tokenizer.decode(tokenizer.encode(text)) == text


def test_decode_inverts_encode_on_random_text(tokenizer: CodeGenTokenizer) -> None:
    texts = random_texts(1000, seed=99)
    for text, ids in zip(texts, tokenizer.encode_batch(texts), strict=True):
        assert tokenizer.decode(ids) == text


def test_eos_in_text_is_one_special_token(tokenizer: CodeGenTokenizer) -> None:
    ids = tokenizer.encode("a<|endoftext|>b")
    assert ids.count(tokenizer.eos_token_id) == 1
    assert tokenizer.decode(ids) == "a<|endoftext|>b"
    assert tokenizer.decode(ids, skip_special_tokens=True) == "ab"


def test_empty_text_and_no_bos(tokenizer: CodeGenTokenizer) -> None:
    assert tokenizer.encode("") == []
    assert tokenizer.decode([]) == ""
    assert tokenizer.encode_batch([]) == []
    assert tokenizer.encode("x")[0] != tokenizer.eos_token_id


def test_out_of_vocab_ids_decode_to_nothing(tokenizer: CodeGenTokenizer) -> None:
    # The model's embedding has spare rows past vocab_size; sampling can emit them.
    assert tokenizer.decode([tokenizer.vocab_size, 51199]) == ""
    with pytest.raises(TokenizerError, match="non-negative"):
        tokenizer.decode([-1])


# --- tokenizer.json ---------------------------------------------------------------------------


def test_saved_tokenizer_json_loads_with_same_ids(
    tmp_path: Path, tokenizer: CodeGenTokenizer, reference
) -> None:
    path = tokenizer.save(tmp_path / "export")
    assert path == tmp_path / "export" / "tokenizer.json"
    assert sorted(p.name for p in path.parent.iterdir()) == ["tokenizer.json"]
    texts = [*TEXTS, *random_texts(200, seed=7)]
    for loaded in (CodeGenTokenizer.from_dir(path.parent), load_tokenizer(path)):
        assert loaded.encode_batch(texts) == tokenizer.encode_batch(texts)
        assert loaded.vocab_size == tokenizer.vocab_size
        assert loaded.eos_token_id == tokenizer.eos_token_id
    hf = type(reference).from_pretrained(path.parent)
    assert hf(texts)["input_ids"] == tokenizer.encode_batch(texts)


def test_tokenizer_json_wins_over_vocab_files(tmp_path: Path, tokenizer: CodeGenTokenizer) -> None:
    tokenizer.save(tmp_path)
    (tmp_path / "vocab.json").write_text("not json", encoding="utf-8")
    assert load_tokenizer(tmp_path).encode(TEXTS[1]) == tokenizer.encode(TEXTS[1])


def test_tokenizer_json_without_whitespace_tokens_gets_them(
    tmp_path: Path, tokenizer: CodeGenTokenizer, trained: tuple[dict, list]
) -> None:
    # A plain GPT-2 tokenizer.json: the indentation tokens are appended in CodeGen's order.
    bare = train_bpe()
    bare.save(str(tmp_path / "tokenizer.json"))
    loaded = CodeGenTokenizer.from_dir(tmp_path)
    assert loaded.encode_batch(TEXTS) == tokenizer.encode_batch(TEXTS)
    assert loaded.token_to_id("\t\t") == len(trained[0]) + 37


# --- errors -----------------------------------------------------------------------------------


def copy_repo(repo: Path, target: Path, *names: str) -> Path:
    """A folder with only the named files of `repo`."""
    target.mkdir(parents=True, exist_ok=True)
    for name in names:
        shutil.copy(repo / name, target / name)
    return target


def test_missing_folder(tmp_path: Path) -> None:
    with pytest.raises(TokenizerError, match="does not exist or is not a folder"):
        CodeGenTokenizer.from_dir(tmp_path / "nowhere")


def test_empty_folder_names_the_files_needed(tmp_path: Path) -> None:
    with pytest.raises(TokenizerError, match=r"vocab\.json is missing") as caught:
        load_tokenizer(tmp_path)
    assert "tokenizer.json" in str(caught.value)
    assert "merges.txt" in str(caught.value)


def test_missing_merges(tmp_path: Path, repo: Path) -> None:
    folder = copy_repo(repo, tmp_path, "vocab.json")
    with pytest.raises(TokenizerError, match=r"merges\.txt is missing"):
        CodeGenTokenizer.from_dir(folder)


def test_corrupt_vocab_json(tmp_path: Path, repo: Path) -> None:
    folder = copy_repo(repo, tmp_path, "merges.txt")
    (folder / "vocab.json").write_text('{"a": 0, "b": ', encoding="utf-8")
    with pytest.raises(TokenizerError, match=r"vocab\.json.*not valid JSON.*download it again"):
        CodeGenTokenizer.from_dir(folder)


def test_vocab_json_of_wrong_shape(tmp_path: Path, repo: Path) -> None:
    folder = copy_repo(repo, tmp_path, "merges.txt")
    (folder / "vocab.json").write_text('["a", "b"]', encoding="utf-8")
    with pytest.raises(TokenizerError, match="not a JSON object of token -> integer id"):
        CodeGenTokenizer.from_dir(folder)


def test_vocab_with_gap_is_inconsistent(
    tmp_path: Path, repo: Path, trained: tuple[dict, list]
) -> None:
    folder = copy_repo(repo, tmp_path, "merges.txt")
    vocab = dict(trained[0])
    vocab[next(iter(vocab))] = len(vocab) + 5
    (folder / "vocab.json").write_text(json.dumps(vocab), encoding="utf-8")
    with pytest.raises(TokenizerError, match=r"inconsistent: its \d+ ids are not exactly 0\.\."):
        CodeGenTokenizer.from_dir(folder)


def test_corrupt_merges_line(tmp_path: Path, repo: Path) -> None:
    folder = copy_repo(repo, tmp_path, "vocab.json")
    (folder / "merges.txt").write_text("#version: 0.2\nĠ t\nthree parts here\n", "utf-8")
    with pytest.raises(TokenizerError, match=r"line 3 is not a merge of two tokens"):
        CodeGenTokenizer.from_dir(folder)


def test_merges_that_do_not_fit_the_vocab(tmp_path: Path, repo: Path) -> None:
    folder = copy_repo(repo, tmp_path, "vocab.json")
    (folder / "merges.txt").write_text("#version: 0.2\nnot-in-vocab zzz\n", "utf-8")
    with pytest.raises(TokenizerError, match=r"do not fit together.*same model repository"):
        CodeGenTokenizer.from_dir(folder)


def test_added_tokens_with_a_gap(tmp_path: Path, repo: Path, trained: tuple[dict, list]) -> None:
    folder = copy_repo(repo, tmp_path, "vocab.json", "merges.txt")
    added = {"    ": len(trained[0]) + 3}
    (folder / "added_tokens.json").write_text(json.dumps(added), encoding="utf-8")
    with pytest.raises(TokenizerError, match="must continue the vocabulary without gaps"):
        CodeGenTokenizer.from_dir(folder)


def test_vocab_without_eos(tmp_path: Path, trained: tuple[dict, list]) -> None:
    vocab = {token: index for index, token in enumerate(t for t in trained[0] if t != EOS_TOKEN)}
    merges = [m for m in trained[1] if EOS_TOKEN not in m]
    folder = write_repo_files(tmp_path, vocab, merges)
    with pytest.raises(TokenizerError, match=r"no <\|endoftext\|> token"):
        CodeGenTokenizer.from_dir(folder)


def test_corrupt_tokenizer_json(tmp_path: Path) -> None:
    (tmp_path / "tokenizer.json").write_text('{"model": ', encoding="utf-8")
    with pytest.raises(TokenizerError, match=r"tokenizer\.json.*missing or corrupt"):
        CodeGenTokenizer.from_dir(tmp_path)


def test_tokenizer_json_of_another_model_type(tmp_path: Path) -> None:
    Tokenizer(models.WordLevel({EOS_TOKEN: 0}, unk_token=EOS_TOKEN)).save(
        str(tmp_path / "tokenizer.json")
    )
    with pytest.raises(TokenizerError, match="WordLevel model, but CodeGen uses byte-level BPE"):
        load_tokenizer(tmp_path / "tokenizer.json")
