"""Loading and exporting HF checkpoints: layouts, the hub cache, and every error case."""

from __future__ import annotations

import copy
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import save_file

from codegen_repl.errors import CheckpointError
from codegen_repl.model.checkpoint import (
    load_model,
    qkv_from_hf,
    qkv_to_hf,
    resolve_checkpoint,
    save_hf,
)
from codegen_repl.model.config import CodeGenConfig
from tests.conftest import hf_codegen, save_bin, torch_logits
from tests.model.test_modeling import LOGIT_TOLERANCE, jax_logits, relative_error

IDS = np.random.default_rng(7).integers(0, 1003, (1, 24))


def state_dict(model) -> dict[str, torch.Tensor]:
    return {name: t.detach().clone().contiguous() for name, t in model.state_dict().items()}


def test_qkv_permutation_round_trips() -> None:
    config = CodeGenConfig(hidden_size=96, num_heads=8, rotary_dim=4, vocab_size=10)
    weight = np.random.default_rng(0).standard_normal((3 * 96, 96)).astype(np.float32)
    kernel = qkv_from_hf(weight, config)
    assert kernel.shape == (96, 3, 8, 12)
    np.testing.assert_array_equal(qkv_to_hf(kernel, config), weight)
    # shard 0's first rows are its queries: head 0, dim 0 of the query
    np.testing.assert_array_equal(kernel[:, 0, 0, 0], weight[0])
    # shard 0, block 1 is values (q, v, k order in the checkpoint)
    np.testing.assert_array_equal(kernel[:, 2, 0, 0], weight[24])
    np.testing.assert_array_equal(kernel[:, 1, 0, 0], weight[48])
    # shard 1 starts at row 72 and holds heads 2..3
    np.testing.assert_array_equal(kernel[:, 0, 2, 0], weight[72])


@pytest.mark.parametrize("layout", ["safetensors", "bin"])
def test_sharded_checkpoints_load(tmp_path: Path, tiny_hf, layout: str) -> None:
    if layout == "safetensors":
        tiny_hf.save_pretrained(tmp_path, max_shard_size="100KB")
        assert (tmp_path / "model.safetensors.index.json").exists()
        reference = tiny_hf
    else:
        save_bin(tiny_hf, tmp_path, shards=3)
        reference = hf_codegen()
        with torch.no_grad():
            for param in reference.parameters():
                param.copy_(param.half().float())
    error = relative_error(jax_logits(tmp_path, IDS), torch_logits(reference, IDS))
    assert error < LOGIT_TOLERANCE


def test_bfloat16_checkpoints_load(tmp_path: Path) -> None:
    """bf16 safetensors and bf16 .bin, compared with transformers on the same bf16 weights."""
    reference = hf_codegen(seed=3)
    with torch.no_grad():  # round the parameters only (the rotary table stays fp32)
        for param in reference.parameters():
            param.copy_(param.bfloat16().float())
    bf16 = copy.deepcopy(reference).to(torch.bfloat16)
    bf16.save_pretrained(tmp_path / "safetensors")
    torch.save(bf16.state_dict(), tmp_path / "pytorch_model.bin")
    bf16.config.to_json_file(tmp_path / "config.json")
    for folder in (tmp_path / "safetensors", tmp_path):
        assert relative_error(jax_logits(folder, IDS), torch_logits(reference, IDS)) < (
            LOGIT_TOLERANCE
        )


def test_export_round_trips_through_transformers(tmp_path: Path, tiny_checkpoint, tiny_hf):
    from transformers import CodeGenForCausalLM

    loaded = load_model(tiny_checkpoint)
    save_hf(loaded.params, loaded.config, tmp_path / "export")
    again = CodeGenForCausalLM.from_pretrained(tmp_path / "export").eval()
    error = relative_error(torch_logits(again, IDS), torch_logits(tiny_hf, IDS))
    assert error < LOGIT_TOLERANCE
    assert relative_error(jax_logits(tmp_path / "export", IDS), torch_logits(again, IDS)) < (
        LOGIT_TOLERANCE
    )


def test_bfloat16_export_keeps_dtype(tmp_path: Path, tiny_checkpoint) -> None:
    from safetensors import safe_open

    loaded = load_model(tiny_checkpoint, dtype="bfloat16")
    save_hf(loaded.params, loaded.config, tmp_path)
    with safe_open(str(tmp_path / "model.safetensors"), framework="pt") as handle:
        assert handle.get_tensor("lm_head.weight").dtype == torch.bfloat16


# --------------------------------------------------------------------------------- the hub cache


def fake_hub_cache(cache: Path, checkpoint: Path, repo_id: str) -> Path:
    """Lay out `checkpoint` as huggingface_hub's cache does: blobs, snapshots/<commit>, refs."""
    commit = "0123456789abcdef0123456789abcdef01234567"
    repo = cache / f"models--{repo_id.replace('/', '--')}"
    snapshot = repo / "snapshots" / commit
    (repo / "blobs").mkdir(parents=True)
    snapshot.mkdir(parents=True)
    for file in checkpoint.iterdir():
        blob = repo / "blobs" / f"blob-{file.name}"
        shutil.copy(file, blob)
        (snapshot / file.name).symlink_to(blob)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(commit)
    return snapshot


def test_hub_id_loads_from_cache_offline(tmp_path, tiny_checkpoint, tiny_hf, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    snapshot = fake_hub_cache(tmp_path, tiny_checkpoint, "Salesforce/codegen-350M-mono")
    loaded = load_model("Salesforce/codegen-350M-mono", cache_dir=tmp_path)
    assert loaded.path == snapshot
    assert (
        relative_error(jax_logits(loaded.path, IDS), torch_logits(tiny_hf, IDS)) < LOGIT_TOLERANCE
    )


def test_offline_without_cache_says_how_to_proceed(tmp_path: Path, monkeypatch) -> None:
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(CheckpointError) as error:
        resolve_checkpoint("Salesforce/codegen-2B-mono", cache_dir=tmp_path)
    message = str(error.value)
    assert "not in the local HF cache" in message and "HF_HUB_OFFLINE" in message
    assert "connect to the internet once" in message and "--model PATH" in message


# --------------------------------------------------------------------------------- error cases


def copy_checkpoint(source: Path, target: Path) -> Path:
    shutil.copytree(source, target)
    return target


def test_missing_folder_or_bad_name(tmp_path: Path) -> None:
    with pytest.raises(CheckpointError, match="neither a folder nor a hub id"):
        resolve_checkpoint(str(tmp_path / "nope"))
    (tmp_path / "file.txt").write_text("x")
    with pytest.raises(CheckpointError, match="is a file; pass the folder"):
        resolve_checkpoint(tmp_path / "file.txt")


def test_missing_config(tmp_path: Path, tiny_checkpoint) -> None:
    folder = copy_checkpoint(tiny_checkpoint, tmp_path / "c")
    (folder / "config.json").unlink()
    with pytest.raises(CheckpointError, match=r"config.json does not exist"):
        load_model(folder)


def test_missing_weights(tmp_path: Path, tiny_checkpoint) -> None:
    folder = copy_checkpoint(tiny_checkpoint, tmp_path / "c")
    (folder / "model.safetensors").unlink()
    with pytest.raises(CheckpointError, match=r"holds no weights: expected model.safetensors"):
        load_model(folder)


@pytest.mark.parametrize("fault", ["folder", "float", "string"])
def test_bad_config_json_is_one_line_and_exit_status_2(tmp_path, tiny_checkpoint, fault) -> None:
    """A config.json that is a folder used to give a 52-line traceback; `"n_embd": 64.5` or
    `"64"` loaded silently as 64."""
    folder = copy_checkpoint(tiny_checkpoint, tmp_path / "c")
    config = folder / "config.json"
    if fault == "folder":
        config.unlink()
        config.mkdir()
        expected = f"{config} is a folder; a checkpoint's config.json must be a JSON file"
    else:
        value = 64.5 if fault == "float" else "64"
        config.write_text(json.dumps(json.loads(config.read_text()) | {"n_embd": value}))
        expected = (
            f"{config}: n_embd is {json.dumps(value)}, expected an integer; "
            "fix that field or download the checkpoint again"
        )
    with pytest.raises(CheckpointError) as error:
        load_model(folder)
    assert str(error.value) == expected
    script = str(Path(sys.executable).with_name("codegen-repl"))
    result = subprocess.run(
        [script, "generate", "--model", str(folder), "x"],
        capture_output=True,
        text=True,
        timeout=300,
        env={**os.environ, "JAX_PLATFORMS": "cpu"},
    )
    assert (result.returncode, result.stdout, result.stderr) == (2, "", f"error: {expected}\n")


def test_unknown_architecture(tmp_path: Path, tiny_checkpoint) -> None:
    folder = copy_checkpoint(tiny_checkpoint, tmp_path / "c")
    config = json.loads((folder / "config.json").read_text())
    config |= {"model_type": "gptj", "architectures": ["GPTJForCausalLM"]}
    (folder / "config.json").write_text(json.dumps(config))
    with pytest.raises(CheckpointError, match=r"unsupported architecture: model_type='gptj'"):
        load_model(folder)


def test_wrong_tensor_shape_names_the_tensor(tmp_path: Path, tiny_hf) -> None:
    state = state_dict(tiny_hf)
    state["transformer.h.1.mlp.fc_in.weight"] = torch.zeros(100, 64)
    tiny_hf.config.to_json_file(tmp_path / "config.json")
    save_file(state, str(tmp_path / "model.safetensors"))
    with pytest.raises(CheckpointError) as error:
        load_model(tmp_path)
    assert "'transformer.h.1.mlp.fc_in.weight' has shape (100, 64), expected (256, 64)" in str(
        error.value
    )


def test_missing_and_unexpected_tensors(tmp_path: Path, tiny_hf) -> None:
    tiny_hf.config.to_json_file(tmp_path / "config.json")
    state = state_dict(tiny_hf)
    del state["lm_head.bias"], state["transformer.h.2.ln_1.weight"]
    save_file(state, str(tmp_path / "model.safetensors"))
    with pytest.raises(CheckpointError, match=r"lacks 2 tensors: lm_head.bias, transformer.h.2"):
        load_model(tmp_path)
    state = state_dict(tiny_hf) | {"transformer.h.0.attn.q_proj.weight": torch.zeros(2)}
    save_file(state, str(tmp_path / "model.safetensors"))
    with pytest.raises(CheckpointError, match=r"unexpected tensor 'transformer.h.0.attn.q_proj"):
        load_model(tmp_path)


def test_truncated_safetensors(tmp_path: Path, tiny_checkpoint) -> None:
    folder = copy_checkpoint(tiny_checkpoint, tmp_path / "c")
    weights = folder / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])
    with pytest.raises(CheckpointError, match=r"model.safetensors is truncated or corrupt"):
        load_model(folder)


@pytest.mark.parametrize("cut", ["empty", "in the header size", "in the header", "in a tensor"])
def test_safetensors_cut_anywhere_are_truncated_or_corrupt(
    tmp_path: Path, tiny_checkpoint, cut: str
) -> None:
    folder = copy_checkpoint(tiny_checkpoint, tmp_path / "c")
    weights = folder / "model.safetensors"
    data = weights.read_bytes()
    header_end = 8 + int.from_bytes(data[:8], "little")
    keep = {"empty": 0, "in the header size": 5, "in the header": header_end - 3}
    weights.write_bytes(data[: keep.get(cut, len(data) - 7)])
    with pytest.raises(CheckpointError, match=r"model.safetensors is truncated or corrupt"):
        load_model(folder)


def _rewrite_header(weights: Path, change) -> None:
    """Rewrite model.safetensors' JSON header through `change(header)`, data left as it is."""
    data = weights.read_bytes()
    end = 8 + int.from_bytes(data[:8], "little")
    header = json.loads(data[8:end])
    text = change(header)
    raw = (text if isinstance(text, str) else json.dumps(header)).encode()
    weights.write_bytes(len(raw).to_bytes(8, "little") + raw + data[end:])


def _all_at_zero(header: dict) -> None:  # every tensor's bytes at the data's start
    for name, info in header.items():
        if name != "__metadata__":
            begin, end = info["data_offsets"]
            info["data_offsets"] = [0, end - begin]


def _shift_bias(header: dict) -> None:  # lm_head.bias reads 4 bytes of its neighbour
    begin, end = header["lm_head.bias"]["data_offsets"]
    header["lm_head.bias"]["data_offsets"] = [begin + 4, end + 4]


@pytest.mark.parametrize(
    "change",
    [
        _shift_bias,
        _all_at_zero,
        lambda h: h["lm_head.bias"].update(shape=[1003.0]),
        lambda h: json.dumps(h)[:-1] + ', "lm_head.bias": ' + json.dumps(h["lm_head.bias"]) + "}",
    ],
    ids=["overlapping offsets", "every tensor at 0", "a float in a shape", "a name twice"],
)
def test_safetensors_whose_header_does_not_cover_the_data_exactly_are_corrupt(
    tmp_path: Path, tiny_checkpoint, change
) -> None:
    """As safetensors' own reader: silently wrong weights otherwise (a breaker's finding)."""
    folder = copy_checkpoint(tiny_checkpoint, tmp_path / "c")
    _rewrite_header(folder / "model.safetensors", change)
    with pytest.raises(CheckpointError, match=r"model.safetensors is truncated or corrupt"):
        load_model(folder)


def test_safetensors_with_bytes_after_the_last_tensor_are_corrupt(
    tmp_path: Path, tiny_checkpoint
) -> None:
    folder = copy_checkpoint(tiny_checkpoint, tmp_path / "c")
    with open(folder / "model.safetensors", "ab") as weights:
        weights.write(b"\0" * 16)
    with pytest.raises(CheckpointError, match=r"model.safetensors is truncated or corrupt"):
        load_model(folder)


def test_a_dtype_we_do_not_read_is_named(tmp_path: Path, tiny_checkpoint) -> None:
    folder = copy_checkpoint(tiny_checkpoint, tmp_path / "c")
    _rewrite_header(
        folder / "model.safetensors", lambda h: h["lm_head.bias"].update(dtype="F8_E4M3")
    )
    with pytest.raises(CheckpointError, match=r"'lm_head.bias' in .* is F8_E4M3, which"):
        load_model(folder)


def test_the_load_ends_when_the_weights_are_copied_out_of_the_file(
    tmp_path: Path, tiny_checkpoint, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The conversions read views of the mapped file after dispatch: a load that returned
    before they ran let a file cut after it crash the process (SIGBUS; a breaker's finding)."""
    import jax
    import jax.numpy as jnp

    from codegen_repl.model import checkpoint

    convert = checkpoint._to_device

    @jax.jit
    def late(out: jax.Array) -> jax.Array:  # ready well after dispatch, as a big tensor is
        work = jax.lax.fori_loop(0, 40, lambda _, x: x @ x / 512, jnp.eye(512))
        return out + (work[0, 0] * 0).astype(out.dtype)

    def slow(to_flax, array, dtype):
        return late(convert(to_flax, array, dtype))

    monkeypatch.setattr(checkpoint, "_to_device", slow)
    folder = copy_checkpoint(tiny_checkpoint, tmp_path / "c")
    params = load_model(folder).params
    assert all(leaf.is_ready() for leaf in jax.tree_util.tree_leaves(params))


def test_safetensors_are_read_as_the_library_reads_them(tmp_path: Path) -> None:
    """Our reader maps the file (views, no copies): every dtype equal to safetensors' own."""
    from safetensors.numpy import load_file
    from safetensors.numpy import save_file as save_numpy

    from codegen_repl.model.checkpoint import read_tensors

    rng = np.random.default_rng(0)
    tensors = {
        "f32": rng.normal(size=(3, 5)).astype(np.float32),
        "f16": rng.normal(size=(7,)).astype(np.float16),
        "i64": np.arange(6, dtype=np.int64).reshape(2, 3),
        "scalar": np.array(2.5, dtype=np.float32),
        "empty": np.zeros((0, 4), dtype=np.float32),
    }
    save_numpy(tensors, str(tmp_path / "t.safetensors"))
    save_file({"bf16": torch.arange(5, dtype=torch.bfloat16)}, str(tmp_path / "b.safetensors"))
    read = dict(read_tensors([tmp_path / "t.safetensors", tmp_path / "b.safetensors"]))
    expected = load_file(str(tmp_path / "t.safetensors"))
    for name, array in expected.items():
        assert read[name].dtype == array.dtype and read[name].shape == array.shape, name
        np.testing.assert_array_equal(read[name], array)
        assert not read[name].flags.writeable  # a view of the mapped file
    assert str(read["bf16"].dtype) == "bfloat16"
    np.testing.assert_array_equal(read["bf16"].astype(np.float32), np.arange(5, dtype=np.float32))


def test_corrupt_torch_bin(tmp_path: Path, tiny_hf) -> None:
    save_bin(tiny_hf, tmp_path)
    (tmp_path / "pytorch_model.bin").write_bytes(b"not a checkpoint" * 100)
    with pytest.raises(CheckpointError, match=r"pytorch_model.bin is truncated or corrupt"):
        load_model(tmp_path)


def test_index_with_missing_shard(tmp_path: Path, tiny_hf) -> None:
    tiny_hf.save_pretrained(tmp_path, max_shard_size="100KB")
    next(tmp_path.glob("model-00002-*.safetensors")).unlink()
    with pytest.raises(CheckpointError, match=r"lists shards that are missing: model-00002"):
        load_model(tmp_path)


@pytest.mark.parametrize("shard", [5, "../other/model.safetensors", "/etc/hostname", ".."])
def test_index_names_only_files_beside_it(tmp_path: Path, tiny_hf, shard: object) -> None:
    tiny_hf.save_pretrained(tmp_path, max_shard_size="100KB")
    index = tmp_path / "model.safetensors.index.json"
    data = json.loads(index.read_text())
    first = next(iter(data["weight_map"]))
    data["weight_map"][first] = shard
    index.write_text(json.dumps(data))
    with pytest.raises(CheckpointError, match=r"which is not a file name beside it"):
        load_model(tmp_path)


def test_bad_dtype(tiny_checkpoint) -> None:
    with pytest.raises(ValueError, match=r"dtype must be one of float32, bfloat16, float16"):
        load_model(tiny_checkpoint, dtype="int4")


@pytest.mark.parametrize("layout", ["safetensors", "bin"])
def test_int8_quantized_while_loading_equals_quantized_after(tmp_path, layout: str) -> None:
    """int8 quantizes each tensor as it is read (the fp32 model never exists whole: 2B's peak
    RSS was the fp32 model plus its int8 copy): the same params, bit for bit, as quantizing
    the loaded fp32 model, and quantize_int8 leaves them as they are."""
    import jax

    from codegen_repl.model.checkpoint import load_params, read_config
    from codegen_repl.model.modeling import quantize_int8, quantize_leaf

    model = hf_codegen(seed=3)
    if layout == "safetensors":
        model.save_pretrained(tmp_path)
    else:
        save_bin(model, tmp_path)
    config = read_config(tmp_path)
    after = quantize_int8(load_params(tmp_path, config))
    during = load_params(tmp_path, config, transform=quantize_leaf)
    flat_after = jax.tree_util.tree_leaves_with_path(after)
    flat_during = jax.tree_util.tree_leaves_with_path(during)
    assert [p for p, _ in flat_after] == [p for p, _ in flat_during]
    assert any(leaf.dtype == np.int8 for _, leaf in flat_during)
    for (_, a), (_, b) in zip(flat_after, flat_during, strict=True):
        assert a.dtype == b.dtype
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    again = quantize_int8(during)
    for a, b in zip(
        jax.tree_util.tree_leaves(again), jax.tree_util.tree_leaves(during), strict=True
    ):
        assert a is b
