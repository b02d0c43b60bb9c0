"""Shared fixtures: tiny random CodeGen checkpoints written by transformers itself."""

from __future__ import annotations

import json
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

from codegen_repl.model.tokenizer import EOS_TOKEN, WHITESPACE_TOKENS


def shared_mtpb() -> Path | None:
    """The MTPB file the workspace shares beside the project (`../shared/data/mtpb`, see
    SOURCE.md there), also from a clean clone of a local checkout (beside that checkout)."""
    root = Path(__file__).resolve().parents[1]
    folders = [root.parent]
    origin = subprocess.run(
        ["git", "-C", str(root), "config", "--get", "remote.origin.url"],
        capture_output=True, text=True, check=False,
    ).stdout.strip()  # fmt: skip
    if origin and Path(origin).is_dir():
        folders.append(Path(origin).resolve().parent)
    for folder in folders:
        if (folder / "shared" / "data" / "mtpb" / "mtpb.jsonl").is_file():
            return folder / "shared" / "data" / "mtpb" / "mtpb.jsonl"
    return None


_FOUND = shared_mtpb()
MTPB_DATA = _FOUND or Path("../shared/data/mtpb/mtpb.jsonl")
needs_mtpb = pytest.mark.skipif(
    _FOUND is None, reason="the workspace's ../shared/data/mtpb/mtpb.jsonl is not here"
)

torch = pytest.importorskip("torch", reason="the test extra (torch, transformers) is needed")
transformers = pytest.importorskip("transformers", reason="the test extra is needed")


def hf_codegen(seed: int = 0, **shape: int) -> transformers.CodeGenForCausalLM:
    """A CodeGenForCausalLM with random weights of a visible scale (not the near-zero init,
    so logits are spread and greedy choices are not near ties)."""
    options = dict(vocab_size=1003, n_positions=128, n_embd=64, n_layer=3, n_head=4, rotary_dim=8)
    options |= shape
    config = transformers.CodeGenConfig(bos_token_id=0, eos_token_id=1, **options)
    torch.manual_seed(seed)
    model = transformers.CodeGenForCausalLM(config).eval()
    with torch.no_grad():
        for name, param in model.named_parameters():
            if name.endswith(("ln_1.weight", "ln_f.weight")):
                param.uniform_(0.5, 1.5)
            else:
                param.normal_(0.0, 0.3 if param.dim() > 1 else 0.2)
    return model


def save_bin(model: transformers.CodeGenForCausalLM, folder: Path, shards: int = 1) -> Path:
    """Write a pytorch_model.bin checkpoint as transformers 4.x wrote the published ones (fp16,
    with the old attention buffers); transformers 5 only writes safetensors."""
    folder.mkdir(parents=True, exist_ok=True)
    model.config.to_json_file(folder / "config.json")
    state = {name: t.detach().clone().half() for name, t in model.state_dict().items()}
    for i in range(model.config.n_layer):  # buffers the 2022 checkpoints carry
        state[f"transformer.h.{i}.attn.causal_mask"] = torch.ones(1, 1, 8, 8, dtype=torch.bool)
        state[f"transformer.h.{i}.attn.masked_bias"] = torch.tensor(-1e9)
    if shards == 1:
        torch.save(state, folder / "pytorch_model.bin")
        return folder
    names = sorted(state)
    weight_map = {}
    for shard in range(shards):
        file = f"pytorch_model-{shard + 1:05d}-of-{shards:05d}.bin"
        part = {name: state[name] for name in names[shard::shards]}
        torch.save(part, folder / file)
        weight_map |= dict.fromkeys(part, file)
    index = {"metadata": {"total_size": 0}, "weight_map": weight_map}
    (folder / "pytorch_model.bin.index.json").write_text(json.dumps(index))
    return folder


@pytest.fixture(scope="session")
def tiny_hf() -> transformers.CodeGenForCausalLM:
    return hf_codegen()


@pytest.fixture(scope="session")
def tiny_checkpoint(tmp_path_factory: pytest.TempPathFactory, tiny_hf) -> Path:
    folder = tmp_path_factory.mktemp("tiny_checkpoint")
    tiny_hf.save_pretrained(folder)
    return folder


def torch_logits(model: transformers.CodeGenForCausalLM, ids: np.ndarray) -> np.ndarray:
    with torch.no_grad():
        return model(torch.as_tensor(ids, dtype=torch.long)).logits.float().numpy()


# --------------------------------------------------------------------------------- tokenizer files

CORPUS = [
    "def fibonacci(n):\n    if n < 2:\n        return n\n"
    "    return fibonacci(n - 1) + fibonacci(n - 2)\n",
    "class Stack:\n    def __init__(self):\n        self.items = []\n\n"
    "    def push(self, item):\n        self.items.append(item)\n",
    "import os\nimport sys\n\nfor i in range(10):\n    print(i, os.getcwd(), sys.argv)\n",
    "# compute the sum of a list\nnumbers = [1, 2, 3]\ntotal = sum(numbers)\nprint(total)\n",
    "with open('data.txt') as handle:\n\tfor line in handle:\n\t\tif line.strip():\n"
    "\t\t\tprint(line)\n",
    'def greet(name: str) -> str:\n    """Say hello."""\n    return f"Hello, {name}!"\n',
    "try:\n    value = int(text)\nexcept ValueError:\n    value = None\n",
]


def train_bpe(vocab_size: int = 600) -> Tokenizer:
    """A GPT-2-style byte-level BPE, trained on CORPUS in milliseconds."""
    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=[EOS_TOKEN],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tokenizer.train_from_iterator(CORPUS * 20, trainer)
    return tokenizer


def write_repo_files(
    folder: Path, vocab: dict[str, int], merges: list[str], with_added_tokens: bool = True
) -> Path:
    """Writes the files a Salesforce CodeGen repo ships, for this vocab."""
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "vocab.json").write_text(json.dumps(vocab, ensure_ascii=False), encoding="utf-8")
    (folder / "merges.txt").write_text("#version: 0.2\n" + "\n".join(merges) + "\n", "utf-8")
    if with_added_tokens:
        added = {token: len(vocab) + index for index, token in enumerate(WHITESPACE_TOKENS)}
        (folder / "added_tokens.json").write_text(json.dumps(added), encoding="utf-8")
    special = {"bos_token": EOS_TOKEN, "eos_token": EOS_TOKEN, "unk_token": EOS_TOKEN}
    (folder / "special_tokens_map.json").write_text(json.dumps(special), encoding="utf-8")
    config = {
        "add_prefix_space": False,
        "model_max_length": 2048,
        "tokenizer_class": "CodeGenTokenizer",
        **{key: _added_token_json(EOS_TOKEN) for key in ("bos_token", "eos_token", "unk_token")},
    }
    (folder / "tokenizer_config.json").write_text(json.dumps(config), encoding="utf-8")
    return folder


def _added_token_json(content: str) -> dict[str, object]:
    """The special-token form the published tokenizer_config.json files use."""
    return {
        "__type": "AddedToken",
        "content": content,
        "lstrip": False,
        "normalized": True,
        "rstrip": False,
        "single_word": False,
    }


def vocab_and_merges(tokenizer: Tokenizer) -> tuple[dict[str, int], list[str]]:
    """The trained model's vocab.json and merges.txt contents."""
    model = json.loads(tokenizer.to_str())["model"]
    merges = [" ".join(pair) if isinstance(pair, list) else pair for pair in model["merges"]]
    return model["vocab"], merges


@pytest.fixture(scope="session")
def tokenizer_files(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A folder with the tokenizer files of a Salesforce repo, for a 600-token BPE."""
    return write_repo_files(tmp_path_factory.mktemp("tokenizer"), *vocab_and_merges(train_bpe()))


@pytest.fixture(scope="session")
def chat_checkpoint(tmp_path_factory: pytest.TempPathFactory, tokenizer_files: Path) -> Path:
    """A complete tiny checkpoint folder: random weights sized to the tiny tokenizer."""
    from codegen_repl.model.tokenizer import CodeGenTokenizer

    vocab_size = CodeGenTokenizer.from_dir(tokenizer_files).vocab_size
    folder = tmp_path_factory.mktemp("chat_checkpoint")
    model = hf_codegen(seed=5, vocab_size=vocab_size)
    model.config.eos_token_id = model.config.bos_token_id = vocab_size - 1 - len(WHITESPACE_TOKENS)
    model.save_pretrained(folder)
    for file in tokenizer_files.iterdir():
        shutil.copy(file, folder / file.name)
    return folder


def local_decoder(checkpoint: Path, tokenizer_folder: Path, **options: object):
    """A LocalDecoder over a checkpoint folder (the tokenizer may come from elsewhere)."""
    from codegen_repl.decoders.local import LocalDecoder
    from codegen_repl.model.checkpoint import load_model
    from codegen_repl.model.tokenizer import CodeGenTokenizer

    loaded = load_model(checkpoint, dtype=str(options.pop("dtype", "float32")))
    tokenizer = CodeGenTokenizer.from_dir(tokenizer_folder)
    return LocalDecoder.create(loaded.config, loaded.params, tokenizer, **options)  # type: ignore[arg-type]


def decoded_ids(decoder, prompt: list[int], sample) -> list[list[int]]:
    """All new token ids per row, exactly max_new_tokens each."""
    return np.concatenate(list(decoder.stream_tokens(prompt, sample)), axis=1).tolist()


TRAINED_WAIT_S = 900  # the build takes ~40-50 s alone on the 2-core CPU, longer beside tests


@pytest.fixture(scope="session")
def trained_checkpoint(tmp_path_factory: pytest.TempPathFactory, worker_id: str) -> Path:
    """A tiny CodeGen trained here to write `tests.trained.PAIRS[step]` for each step. Under
    pytest-xdist it is trained once for all workers, from their first test on
    (`trained_in_background`), so no worker sits idle while another trains it."""
    from tests.trained import build_trained_checkpoint

    if worker_id == "master":  # no xdist workers
        return build_trained_checkpoint(tmp_path_factory.mktemp("trained"))
    shared = tmp_path_factory.getbasetemp().parent / "trained"
    deadline = time.monotonic() + TRAINED_WAIT_S
    while not (shared / "done").exists():
        if (shared / "failed").exists():
            pytest.fail(f"training the tiny model failed:\n{(shared / 'failed').read_text()}")
        if time.monotonic() > deadline:
            pytest.fail(f"the tiny model was not trained within {TRAINED_WAIT_S} s")
        time.sleep(0.2)
    return shared / "checkpoint"


@pytest.fixture(scope="session", autouse=True)
def trained_in_background(
    request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory, worker_id: str
) -> Iterator[None]:
    """Under pytest-xdist, when a collected test needs `trained_checkpoint`: the first worker
    to start a test (mkdir is the claim) trains the tiny model in a subprocess, into the run's
    common temporary folder; `trained_checkpoint` waits for its "done" (or "failed")."""
    needed = any("trained_checkpoint" in item.fixturenames for item in request.session.items)
    shared = tmp_path_factory.getbasetemp().parent / "trained"
    if worker_id == "master" or not needed:
        yield
        return
    try:
        shared.mkdir()
    except FileExistsError:  # another worker trains it
        yield
        return
    script = (
        "import sys, traceback\n"
        "from pathlib import Path\n"
        "from tests.trained import build_trained_checkpoint\n"
        "shared = Path(sys.argv[1])\n"
        "try:\n"
        "    build_trained_checkpoint(shared)\n"
        "except BaseException:\n"
        "    (shared / 'failed').write_text(traceback.format_exc())\n"
        "    raise\n"
        "(shared / 'done').touch()\n"
    )
    root = Path(__file__).resolve().parents[1]
    build = subprocess.Popen([sys.executable, "-c", script, str(shared)], cwd=root)
    yield
    build.wait()  # other workers may still need it; a Ctrl-C reaches it too (same group)


@pytest.fixture(autouse=True)
def no_user_config(tmp_path_factory: pytest.TempPathFactory, monkeypatch: pytest.MonkeyPatch):
    """Tests (and the commands they start) never read the developer's own config.toml."""
    folder = tmp_path_factory.getbasetemp() / "no-user-config"
    monkeypatch.setenv("CODEGEN_REPL_CONFIG", str(folder / "config.toml"))


@pytest.fixture(autouse=True)
def sigint_handler_restored():
    """A test leaves Python's SIGINT handler as it found it: a leaked handler (a held or
    redirected Ctrl-C) makes a later test's Ctrl-C vanish, far from the cause."""
    before = signal.getsignal(signal.SIGINT)
    yield
    after = signal.getsignal(signal.SIGINT)
    if after is not before:
        signal.signal(signal.SIGINT, before)
        pytest.fail(f"the test left SIGINT handled by {after!r} (was {before!r})")
