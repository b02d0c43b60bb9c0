"""Finding a checkpoint's files: a local folder or a hub snapshot, its weight files and shard
indexes. No JAX here: front ends check a --model before the model loads (in the background),
and that check must not wait for JAX's import."""

from __future__ import annotations

import json
import os
from pathlib import Path

from codegen_repl.errors import CheckpointError

SAFETENSORS = "model.safetensors"
SAFETENSORS_INDEX = "model.safetensors.index.json"
TORCH_BIN = "pytorch_model.bin"
TORCH_BIN_INDEX = "pytorch_model.bin.index.json"
TOKENIZER_FILES = (
    "tokenizer.json",
    "vocab.json",
    "merges.txt",
    "added_tokens.json",
    "special_tokens_map.json",
    "tokenizer_config.json",
)


def resolve_checkpoint(
    model: str | Path, revision: str | None = None, cache_dir: Path | None = None
) -> Path:
    """A local folder holding the checkpoint: `model` itself, or its hub snapshot."""
    local = Path(model).expanduser()
    if local.is_dir():
        return local
    if local.exists():
        raise CheckpointError(f"{local} is a file; pass the folder that holds config.json")
    if str(model).startswith((".", "/", "~")) or str(model).count("/") != 1:
        raise CheckpointError(
            f"{model} is neither a folder nor a hub id like 'Salesforce/codegen-350M-mono'"
        )
    return download_snapshot(str(model), revision, cache_dir)


def hub_offline() -> bool:
    """HF_HUB_OFFLINE, read at call time so a caller can set it after import."""
    return os.environ.get("HF_HUB_OFFLINE", "").strip().lower() in {"1", "true", "yes", "on"}


def download_snapshot(repo_id: str, revision: str | None, cache_dir: Path | None) -> Path:
    """Download config, tokenizer and weights of `repo_id` (once) into the HF cache."""
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import (
        GatedRepoError,
        LocalEntryNotFoundError,
        RepositoryNotFoundError,
        RevisionNotFoundError,
    )

    common = ["config.json", *TOKENIZER_FILES]
    # Prefer safetensors; fall back to pytorch_model*.bin only when a repo has no safetensors.
    attempts = (["*.safetensors", SAFETENSORS_INDEX], ["pytorch_model*.bin", TORCH_BIN_INDEX])
    try:
        for weights in attempts:
            folder = Path(
                snapshot_download(
                    repo_id,
                    revision=revision,
                    cache_dir=cache_dir,
                    allow_patterns=common + weights,
                    local_files_only=hub_offline(),
                )
            )
            if find_weights(folder, required=False):
                return folder
    except (RepositoryNotFoundError, GatedRepoError):
        raise CheckpointError(
            f"the hub has no accessible repository {repo_id!r}; check the name "
            "(e.g. Salesforce/codegen-350M-mono) or log in with `hf auth login`"
        ) from None
    except RevisionNotFoundError:
        raise CheckpointError(f"{repo_id} has no revision {revision!r}") from None
    except LocalEntryNotFoundError:
        raise CheckpointError(
            f"{repo_id} is not in the local HF cache and the hub cannot be reached"
            f"{' (HF_HUB_OFFLINE is set)' if hub_offline() else ''}. Either connect to the "
            "internet once so it can be downloaded, or pass a local checkpoint folder "
            "with --model PATH"
        ) from None
    raise CheckpointError(f"{repo_id} has no model weights (.safetensors or pytorch_model.bin)")


def find_weights(path: Path, required: bool = True) -> list[Path]:
    """The weight files of a checkpoint folder, safetensors first."""
    for single, index in ((SAFETENSORS, SAFETENSORS_INDEX), (TORCH_BIN, TORCH_BIN_INDEX)):
        if (path / index).exists():
            return [path / name for name in read_index(path / index)]
        if (path / single).exists():
            return [path / single]
    if required:
        raise CheckpointError(
            f"{path} holds no weights: expected {SAFETENSORS}, {SAFETENSORS_INDEX}, {TORCH_BIN} "
            f"or {TORCH_BIN_INDEX} beside config.json"
        )
    return []


def read_index(index: Path) -> list[str]:
    """The shard files an HF index (`*.index.json`: {"weight_map": {tensor: file}}) names.

    Raises:
        CheckpointError: the index is not that shape, names a file outside its own folder (a
            shard is always a plain file name beside the index), or a shard is missing.
    """
    try:
        weight_map = json.loads(index.read_text(encoding="utf-8"))["weight_map"]
        names = list(weight_map.values())
    except (json.JSONDecodeError, KeyError, TypeError, AttributeError, UnicodeDecodeError):
        raise CheckpointError(
            f"{index} is not a valid index (a JSON object with a 'weight_map'); "
            "download the checkpoint again"
        ) from None
    for name in names:
        if not isinstance(name, str) or Path(name).name != name or name in (".", ".."):
            raise CheckpointError(
                f"{index} names the shard {name!r}, which is not a file name beside it; "
                "download the checkpoint again"
            )
    shards = sorted(set(names))
    missing = [name for name in shards if not (index.parent / name).exists()]
    if missing:
        raise CheckpointError(f"{index.name} lists shards that are missing: {', '.join(missing)}")
    return shards
