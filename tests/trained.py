"""A real tiny CodeGen, trained in the test session, that writes known code for known steps.

End-to-end tests whose generated code must make sense (the REPL, the kernel, the magics) use it:
under greedy decoding, the MTPB-style context `...# {step}\\n` is completed with `PAIRS[step]`,
whatever other turns came before (training sequences are random orders of the pairs, with and
without the default prefix). The weights are trained with optax on our Flax model, exported to HF
format, then loaded and re-saved by transformers' own `save_pretrained`, so the fixture is an
ordinary published-style checkpoint folder.
"""

from __future__ import annotations

import dataclasses
import shutil
import tempfile
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import optax
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

from codegen_repl.core.context import MTPB_PREFIX, TurnText, build_context
from codegen_repl.model.checkpoint import save_hf
from codegen_repl.model.config import CodeGenConfig
from codegen_repl.model.modeling import CodeGen
from codegen_repl.model.tokenizer import EOS_TOKEN, CodeGenTokenizer

# step -> the code the trained model writes for it. Steps are told apart by their first word.
PAIRS: dict[str, str] = {
    "say hello": 'print("hello")',
    "define add": "def add(a, b):\n    return a + b",
    "use add": "print(add(2, 3))",
    "make squares": "squares = [i * i for i in range(5)]\nprint(squares)",
    "plot a line": "import matplotlib.pyplot as plt\nplt.plot([1, 2, 3])\nplt.show()",
    "divide by zero": "1 / 0",
    "loop forever": 'print("looping")\nwhile True:\n    pass',  # the print says it runs
    "count to three": "for i in range(3):\n    print(i)",
}
PREFIXES = (MTPB_PREFIX, "")
SEQ_LEN = 192
STEPS = 200
SEED = 0


def examples(rng: np.random.Generator, count: int) -> list[str]:
    """Sessions of 1..4 random turns in the context format, each ending with EOS."""
    steps = list(PAIRS)
    texts = []
    for _ in range(count):
        chosen = rng.choice(len(steps), size=rng.integers(1, 5), replace=False)
        turns = [TurnText(steps[i], PAIRS[steps[i]]) for i in chosen]
        prefix = PREFIXES[rng.integers(len(PREFIXES))]
        texts.append(prefix + "".join(turn.render() for turn in turns) + EOS_TOKEN)
    return texts


def train_tokenizer(folder: Path) -> CodeGenTokenizer:
    """A byte-level BPE over the pairs, in the Salesforce repo's file layout."""
    from tests.conftest import vocab_and_merges, write_repo_files

    bpe = Tokenizer(models.BPE())
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=400, special_tokens=[EOS_TOKEN], show_progress=False,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
    )  # fmt: skip
    bpe.train_from_iterator(examples(np.random.default_rng(1), 200), trainer)
    write_repo_files(folder, *vocab_and_merges(bpe))
    return CodeGenTokenizer.from_dir(folder)


def batches(tokenizer: CodeGenTokenizer, rng: np.random.Generator, size: int) -> np.ndarray:
    """[size, SEQ_LEN + 1] token rows, sessions packed back to back."""
    rows = np.zeros((size, SEQ_LEN + 1), np.int32)
    for row in rows:
        ids: list[int] = []
        while len(ids) < SEQ_LEN + 1:
            ids += tokenizer.encode(examples(rng, 1)[0])
        row[:] = ids[: SEQ_LEN + 1]
    return rows


def train_params(config: CodeGenConfig, tokenizer: CodeGenTokenizer) -> dict:
    model = CodeGen(config)
    params = model.init(jax.random.key(SEED), jnp.zeros((1, 8), jnp.int32))["params"]
    optimizer = optax.adamw(optax.warmup_cosine_decay_schedule(0.0, 3e-3, 20, STEPS, 3e-4))
    state = optimizer.init(params)

    @jax.jit
    def step(params: dict, state: optax.OptState, rows: jax.Array) -> tuple:
        def loss_fn(params: dict) -> jax.Array:
            logits, _ = model.apply({"params": params}, rows[:, :-1])
            return optax.softmax_cross_entropy_with_integer_labels(logits, rows[:, 1:]).mean()

        loss, grads = jax.value_and_grad(loss_fn)(params)
        updates, state = optimizer.update(grads, state, params)
        return optax.apply_updates(params, updates), state, loss

    rng = np.random.default_rng(SEED)
    for _ in range(STEPS):
        params, state, _ = step(params, state, jnp.asarray(batches(tokenizer, rng, 16)))
    return params


def build_trained_checkpoint(folder: Path) -> Path:
    """Train, export through transformers' save_pretrained, and return the folder."""
    import transformers

    tokenizer = train_tokenizer(folder / "tokenizer")
    config = dataclasses.replace(
        CodeGenConfig.tiny(), vocab_size=tokenizer.vocab_size, max_positions=512,
        hidden_size=128, num_layers=2, num_heads=4, intermediate_size=512,
        bos_token_id=tokenizer.eos_token_id, eos_token_id=tokenizer.eos_token_id,
    )  # fmt: skip
    params = train_params(config, tokenizer)
    with tempfile.TemporaryDirectory() as ours:
        save_hf(params, config, Path(ours))
        model = transformers.CodeGenForCausalLM.from_pretrained(ours)
    model.save_pretrained(folder / "checkpoint")
    for file in (folder / "tokenizer").iterdir():
        shutil.copy(file, folder / "checkpoint" / file.name)
    return folder / "checkpoint"


def expected_prompt(step: str, history: list[str], prefix: str = MTPB_PREFIX) -> str:
    """The context a session builds for `step` after the steps in `history` (as the model
    wrote them)."""
    return build_context(prefix, [TurnText(s, PAIRS[s]) for s in history], step)
