"""The CodeGen tokenizer: GPT-2 byte-level BPE plus runs of spaces and tabs as added tokens.

CodeGen-1 was trained with GPT-2's 50257-token vocabulary and 38 extra tokens for indentation:
runs of 31 down to 2 spaces (ids 50257..50286), then runs of 9 down to 2 tabs (50287..50294).
They are *added tokens*: the text is split on them (longest match first) before byte-level BPE
runs, so `"        return"` becomes `["        ", "return"]`, never `["       ", " return"]`.

Files are read the way Hugging Face transformers' `CodeGenTokenizer` (the `tokenizers`-backed
one that `from_pretrained` returns) reads them, and give identical ids:

- `tokenizer.json` when the folder has one;
- else `vocab.json` + `merges.txt` + optional `added_tokens.json`, as the Salesforce repos ship.

Unlike transformers, missing whitespace tokens are appended after the vocabulary instead of
being silently absent, and `added_tokens.json` ids that do not continue the vocabulary are an
error instead of being renumbered: either would feed the model ids it was not trained on.
"""

from __future__ import annotations

import json
import os
from collections.abc import Sequence
from pathlib import Path

from tokenizers import AddedToken, Tokenizer, decoders, pre_tokenizers
from tokenizers.models import BPE

from codegen_repl.errors import TokenizerError

EOS_TOKEN = "<|endoftext|>"
# Longest first: the order CodeGen added them in, which fixes their ids (50257.. on GPT-2).
WHITESPACE_TOKENS: tuple[str, ...] = tuple(" " * n for n in range(31, 1, -1)) + tuple(
    "\t" * n for n in range(9, 1, -1)
)

TOKENIZER_FILE = "tokenizer.json"
VOCAB_FILE = "vocab.json"
MERGES_FILE = "merges.txt"
ADDED_TOKENS_FILE = "added_tokens.json"


class CodeGenTokenizer:
    """Text <-> token ids for CodeGen models; a thin, validated wrapper over `tokenizers`."""

    def __init__(self, tokenizer: Tokenizer) -> None:
        """Wraps a ready `tokenizers.Tokenizer`; use `from_dir` to build one from files."""
        self._tokenizer = tokenizer
        _ensure_whitespace_tokens(tokenizer)
        self.eos_token = EOS_TOKEN
        self.eos_token_id = _ensure_eos_token(tokenizer)

    @classmethod
    def from_dir(cls, path: str | os.PathLike[str]) -> CodeGenTokenizer:
        """Loads `tokenizer.json`, or else `vocab.json` + `merges.txt` (+ `added_tokens.json`)."""
        directory = Path(path)
        if not directory.is_dir():
            raise TokenizerError(
                f"Tokenizer folder {directory} does not exist or is not a folder. Pass the model "
                f"folder that holds {TOKENIZER_FILE} or {VOCAB_FILE} and {MERGES_FILE}."
            )
        if (directory / TOKENIZER_FILE).is_file():
            return cls.from_file(directory / TOKENIZER_FILE)
        return cls(_tokenizer_from_vocab_files(directory))

    @classmethod
    def from_file(cls, path: str | os.PathLike[str]) -> CodeGenTokenizer:
        """Loads a `tokenizers` serialization (`tokenizer.json`)."""
        file = Path(path)
        try:
            tokenizer = Tokenizer.from_file(str(file))
        except Exception as error:  # tokenizers raises bare Exception for I/O and parse errors
            raise TokenizerError(
                f"Cannot read {file}: {error}. The file is missing or corrupt; download it again "
                f"or delete it so that {VOCAB_FILE} and {MERGES_FILE} are used instead."
            ) from error
        if not isinstance(tokenizer.model, BPE):
            raise TokenizerError(
                f"{file} holds a {type(tokenizer.model).__name__} model, but CodeGen uses "
                "byte-level BPE. Point to a CodeGen tokenizer folder."
            )
        return cls(tokenizer)

    @property
    def vocab_size(self) -> int:
        """Number of ids the tokenizer can produce, added tokens included (50295 for CodeGen).

        The model's embedding is larger (51200); ids past this one never come out of `encode`.
        """
        return self._tokenizer.get_vocab_size(with_added_tokens=True)

    def encode(self, text: str) -> list[int]:
        """Token ids of `text`; `<|endoftext|>` in the text becomes the EOS id. No BOS is added."""
        # add_special_tokens=False: a foreign tokenizer.json may carry a post-processor that adds
        # BOS/EOS; CodeGen prompts never had them.
        return self._tokenizer.encode(text, add_special_tokens=False).ids

    def encode_batch(self, texts: Sequence[str]) -> list[list[int]]:
        """`encode` over many texts, in parallel threads inside `tokenizers`."""
        encodings = self._tokenizer.encode_batch(list(texts), add_special_tokens=False)
        return [encoding.ids for encoding in encodings]

    def decode(self, ids: Sequence[int], skip_special_tokens: bool = False) -> str:
        """Text of `ids`; `decode(encode(text)) == text` for every string.

        Ids at or past `vocab_size` (the model's spare embedding rows) decode to nothing, as in
        transformers. A cut inside a multi-byte character decodes to U+FFFD.
        """
        try:
            return self._tokenizer.decode(list(ids), skip_special_tokens=skip_special_tokens)
        except (OverflowError, TypeError) as error:
            raise TokenizerError(
                f"Cannot decode {list(ids)[:20]}: {error}. Token ids must be non-negative ints."
            ) from error

    def token_to_id(self, token: str) -> int | None:
        """Id of one token string (byte-level form, e.g. "Ġreturn"), or None if unknown."""
        return self._tokenizer.token_to_id(token)

    def id_to_token(self, token_id: int) -> str | None:
        """Token string of one id, or None if the id is out of range."""
        return self._tokenizer.id_to_token(token_id)

    def save(self, directory: str | os.PathLike[str]) -> Path:
        """Writes `tokenizer.json` into `directory` (created if needed); returns the file path."""
        folder = Path(directory)
        folder.mkdir(parents=True, exist_ok=True)
        target = folder / TOKENIZER_FILE
        # Write then rename, so an interrupted export never leaves a half-written file to load.
        temporary = folder / f".{TOKENIZER_FILE}.tmp"
        self._tokenizer.save(str(temporary))
        os.replace(temporary, target)
        return target


def load_tokenizer(path: str | os.PathLike[str]) -> CodeGenTokenizer:
    """A model folder or a `tokenizer.json` file -> `CodeGenTokenizer`."""
    if Path(path).is_file():
        return CodeGenTokenizer.from_file(path)
    return CodeGenTokenizer.from_dir(path)


def _tokenizer_from_vocab_files(directory: Path) -> Tokenizer:
    """GPT-2's pipeline, as transformers builds it for CodeGen, from the Salesforce repo files."""
    vocab = _read_vocab(directory / VOCAB_FILE)
    merges = _read_merges(directory / MERGES_FILE)
    try:
        # The same BPE settings transformers' CodeGenTokenizer uses: no dropout, no affixes.
        model = BPE(vocab=vocab, merges=merges, dropout=None, fuse_unk=False)
    except Exception as error:  # e.g. a merge naming a token that is not in the vocab
        raise TokenizerError(
            f"{VOCAB_FILE} and {MERGES_FILE} in {directory} do not fit together: {error}. "
            "Download both files again from the same model repository."
        ) from error
    tokenizer = Tokenizer(model)
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    added_file = directory / ADDED_TOKENS_FILE
    if added_file.is_file():
        _add_tokens_at_ids(tokenizer, _read_added_tokens(added_file), added_file)
    return tokenizer


def _read_json(file: Path) -> object:
    """Parsed JSON of `file`, or a TokenizerError that names the file."""
    if not file.is_file():
        raise TokenizerError(
            f"Tokenizer file {file} is missing. A CodeGen tokenizer folder needs {TOKENIZER_FILE}, "
            f"or {VOCAB_FILE} and {MERGES_FILE}; download them from the model repository."
        )
    try:
        return json.loads(file.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as error:
        raise TokenizerError(
            f"Cannot read {file}: {error}. The file is unreadable or not valid JSON; "
            "download it again from the model repository."
        ) from error


def _read_vocab(file: Path) -> dict[str, int]:
    """`vocab.json` as {token: id}, checked to number its tokens 0..n-1 without gaps."""
    vocab = _read_json(file)
    if not isinstance(vocab, dict) or not all(
        isinstance(token_id, int) and not isinstance(token_id, bool) for token_id in vocab.values()
    ):
        raise TokenizerError(
            f"{file} is not a JSON object of token -> integer id. Download it again from the "
            "model repository."
        )
    # Added tokens are numbered after len(vocab); gaps or repeats would give two tokens one id.
    if sorted(vocab.values()) != list(range(len(vocab))):
        raise TokenizerError(
            f"{file} is inconsistent: its {len(vocab)} ids are not exactly 0..{len(vocab) - 1} "
            "(an id repeats or is missing). Download it again from the model repository."
        )
    return vocab


def _read_merges(file: Path) -> list[tuple[str, str]]:
    """`merges.txt` as (left, right) pairs in rank order."""
    if not file.is_file():
        raise TokenizerError(
            f"Tokenizer file {file} is missing. It comes with {VOCAB_FILE}; download both "
            "from the model repository."
        )
    try:
        lines = file.read_text(encoding="utf-8").splitlines()
    except (OSError, UnicodeDecodeError) as error:
        raise TokenizerError(
            f"Cannot read {file}: {error}. Download it again from the model repository."
        ) from error
    merges: list[tuple[str, str]] = []
    for number, line in enumerate(lines, start=1):
        # Only the "#version" header is a comment: "#" on its own is a real GPT-2 token.
        if not line or line.startswith("#version"):
            continue
        parts = line.split(" ")
        if len(parts) != 2:
            raise TokenizerError(
                f"{file} line {number} is not a merge of two tokens: {line!r}. The file is "
                "corrupt; download it again from the model repository."
            )
        merges.append((parts[0], parts[1]))
    return merges


def _read_added_tokens(file: Path) -> dict[str, int]:
    """`added_tokens.json` as {token: id}."""
    added = _read_json(file)
    if not isinstance(added, dict) or not all(isinstance(i, int) for i in added.values()):
        raise TokenizerError(
            f"{file} is not a JSON object of token -> integer id. Download it again from the "
            "model repository, or delete it to use the standard CodeGen whitespace tokens."
        )
    return added


def _add_tokens_at_ids(tokenizer: Tokenizer, added: dict[str, int], file: Path) -> None:
    """Adds the tokens of `added_tokens.json` in id order and checks each lands on its id."""
    for token, token_id in sorted(added.items(), key=lambda item: item[1]):
        if token == EOS_TOKEN:
            tokenizer.add_special_tokens([_added_token(token)])
        else:
            tokenizer.add_tokens([_added_token(token)])
        actual = tokenizer.token_to_id(token)
        if actual != token_id:
            raise TokenizerError(
                f"{file} gives {token!r} id {token_id}, but its place after the "
                f"{tokenizer.get_vocab_size(with_added_tokens=False)}-token {VOCAB_FILE} is id "
                f"{actual}. Added ids must continue the vocabulary without gaps; download the "
                "file again, or delete it to use the standard CodeGen whitespace tokens."
            )


def _added_token(content: str) -> AddedToken:
    """An added token matched on the raw text, whole, before byte-level BPE sees it."""
    # normalized=False is what CodeGen means; transformers marks the whitespace tokens of
    # added_tokens.json normalized=True, which is the same here because there is no normalizer.
    return AddedToken(
        content,
        single_word=False,
        lstrip=False,
        rstrip=False,
        normalized=False,
        special=content == EOS_TOKEN,
    )


def _ensure_whitespace_tokens(tokenizer: Tokenizer) -> None:
    """Appends the CodeGen whitespace tokens the files lack, in CodeGen's order."""
    present = {token.content for token in tokenizer.get_added_tokens_decoder().values()}
    missing = [token for token in WHITESPACE_TOKENS if token not in present]
    tokenizer.add_tokens([_added_token(token) for token in missing])


def _ensure_eos_token(tokenizer: Tokenizer) -> int:
    """Id of `<|endoftext|>`, registered as special so it is never split or BPE-merged."""
    token_id = tokenizer.token_to_id(EOS_TOKEN)
    if token_id is None:
        # Appending it would hand the model an id it never saw as end-of-text.
        raise TokenizerError(
            f"The tokenizer has no {EOS_TOKEN} token, so it is not a CodeGen (GPT-2) vocabulary. "
            "Use the tokenizer files of a CodeGen model."
        )
    tokenizer.add_special_tokens([_added_token(EOS_TOKEN)])
    return token_id
