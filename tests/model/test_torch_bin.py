"""PyTorch checkpoints read without torch: files torch.save wrote load to what torch.load gives;
a pickle that names any other global is refused before it runs; a `.bin` folder and a hub cache
of one decode as transformers does in a process where torch cannot be imported."""

from __future__ import annotations

import collections
import io
import json
import os
import pickle
import re
import subprocess
import sys
import zipfile
from pathlib import Path

import ml_dtypes
import numpy as np
import pytest
import torch

from codegen_repl.errors import CheckpointError
from codegen_repl.model.torch_bin import load_state_dict
from tests.conftest import hf_codegen, save_bin
from tests.model.test_checkpoint import fake_hub_cache

ROOT = Path(__file__).resolve().parents[2]


def torch_arrays(file: Path) -> dict[str, np.ndarray]:
    """What torch.load reads, as numpy (bf16 by its bits, since torch cannot export it)."""
    out = {}
    for name, tensor in torch.load(file, weights_only=True).items():
        tensor = tensor.detach()
        if tensor.dtype == torch.bfloat16:
            out[name] = tensor.view(torch.int16).numpy().view(ml_dtypes.bfloat16)
        else:
            out[name] = tensor.numpy()
    return out


def assert_same_as_torch_load(file: Path) -> dict[str, np.ndarray]:
    ours, theirs = load_state_dict(file), torch_arrays(file)
    assert list(ours) == list(theirs)
    for name, expected in theirs.items():
        assert ours[name].dtype == expected.dtype, name
        assert ours[name].shape == expected.shape, name
        np.testing.assert_array_equal(ours[name], expected, err_msg=name)
    return ours


# --------------------------------------------------------------------------------- what torch wrote


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("shape", [{}, {"n_embd": 96, "n_head": 8, "rotary_dim": 6, "n_layer": 1}])
def test_codegen_state_dicts_load_as_torch_load(tmp_path: Path, dtype, shape) -> None:
    model = hf_codegen(seed=4, **shape).to(dtype)
    torch.save(model.state_dict(), tmp_path / "pytorch_model.bin")
    ours = assert_same_as_torch_load(tmp_path / "pytorch_model.bin")
    assert len(ours) == len(model.state_dict())


def test_published_layout_with_buffers_and_shards(tmp_path: Path) -> None:
    """fp16 with the bool causal_mask and the 0-d masked_bias the 2022 checkpoints carry."""
    save_bin(hf_codegen(seed=1), tmp_path, shards=3)
    files = sorted(tmp_path.glob("pytorch_model-*.bin"))
    assert len(files) == 3
    arrays = {}
    for file in files:
        arrays |= assert_same_as_torch_load(file)
    assert arrays["transformer.h.0.attn.causal_mask"].dtype == np.bool_
    assert arrays["transformer.h.0.attn.masked_bias"].shape == ()


def test_views_offsets_strides_and_shared_storages(tmp_path: Path) -> None:
    base = torch.arange(60, dtype=torch.float32)
    half = torch.randn(6, 7).half()
    state = {
        "offset_view": base[5:25].view(4, 5),
        "transposed": base.view(6, 10).t(),
        "stepped": base[1::3],
        "broadcast": torch.arange(3.0).expand(4, 3),  # stride 0
        "narrow_columns": half[:, 2:5],
        "half_full": half,
        "bf16_slice": torch.randn(5, 4).bfloat16()[1:, ::2],
        "float64": torch.randn(3, dtype=torch.float64),
        "int64": torch.arange(7),
        "bool": torch.rand(2, 3) > 0.5,
        "scalar": torch.tensor(2.5),
        "empty": torch.zeros(0, 4),
        "parameter": torch.nn.Parameter(torch.ones(2, 2)),
    }
    torch.save(state, tmp_path / "views.bin")
    ours = assert_same_as_torch_load(tmp_path / "views.bin")
    assert ours["transposed"].strides == (4, 40)
    assert ours["broadcast"].strides == (0, 4)
    # one storage in the file, one piece of memory here: as torch.load shares storages
    assert np.shares_memory(ours["offset_view"], ours["transposed"])
    assert np.shares_memory(ours["offset_view"], ours["stepped"])
    assert np.shares_memory(ours["narrow_columns"], ours["half_full"])
    assert not np.shares_memory(ours["offset_view"], ours["half_full"])
    assert not any(array.flags.writeable for array in ours.values())


def test_tensors_are_views_of_the_file_not_copies(tmp_path: Path) -> None:
    """64 MB of weights: loading maps the file and reads none of it."""
    torch.save({"big": torch.ones(16 * 2**20)}, tmp_path / "big.bin")

    def resident_bytes() -> int:
        return int(Path("/proc/self/statm").read_text().split()[1]) * os.sysconf("SC_PAGE_SIZE")

    before = resident_bytes()
    state = load_state_dict(tmp_path / "big.bin")
    grown = resident_bytes() - before
    assert grown < 8 * 2**20, f"loading grew the resident set by {grown / 2**20:.1f} MiB"
    assert not state["big"].flags.owndata
    assert state["big"][-1] == 1.0 and state["big"].sum() == 16 * 2**20


# --------------------------------------------------------------------------------- hand-made files


class FakeStorage:
    def __init__(self, kind, key: str, numel: int) -> None:
        self.kind, self.key, self.numel = kind, key, numel


class FakeTensor:
    def __init__(self, storage: FakeStorage, offset: int, size: tuple, stride: tuple) -> None:
        self.storage, self.offset, self.size, self.stride = storage, offset, size, stride


class TorchLikePickler(pickle.Pickler):
    """Writes data.pkl as torch.save does, for layouts torch itself would not write."""

    def persistent_id(self, obj):
        if isinstance(obj, FakeStorage):
            return ("storage", obj.kind, obj.key, "cpu", obj.numel)
        return None

    def reducer_override(self, obj):
        if isinstance(obj, FakeTensor):
            args = (obj.storage, obj.offset, obj.size, obj.stride, False, collections.OrderedDict())
            return torch._utils._rebuild_tensor_v2, args
        return NotImplemented


def write_archive(
    file: Path,
    data_pkl: bytes,
    storages: dict[str, bytes],
    byteorder: str | None = "little",
    compression: int = zipfile.ZIP_STORED,
) -> Path:
    with zipfile.ZipFile(file, "w", compression=compression) as archive:
        archive.writestr("archive/data.pkl", data_pkl)
        archive.writestr("archive/version", "3\n")
        if byteorder is not None:
            archive.writestr("archive/byteorder", byteorder)
        for key, raw in storages.items():
            archive.writestr(f"archive/data/{key}", raw)
    return file


def torch_like(state: dict) -> bytes:
    buffer = io.BytesIO()
    TorchLikePickler(buffer, protocol=2).dump(state)
    return buffer.getvalue()


def test_hand_made_archive_big_endian_and_compressed(tmp_path: Path) -> None:
    values = np.arange(12, dtype=np.float32)
    storage = FakeStorage(torch.FloatStorage, "0", 12)
    pkl = torch_like({"w": FakeTensor(storage, 2, (2, 3), (1, 2))})
    expected = values[2:].reshape(5, 2).T[:, :3]  # element (i, j) at 2 + i + 2 j
    for byteorder, raw in (("little", values.tobytes()), ("big", values.byteswap().tobytes())):
        for compression in (zipfile.ZIP_STORED, zipfile.ZIP_DEFLATED):
            file = write_archive(tmp_path / "w.bin", pkl, {"0": raw}, byteorder, compression)
            np.testing.assert_array_equal(load_state_dict(file)["w"], expected)
            np.testing.assert_array_equal(torch.load(file, weights_only=True)["w"], expected)


@pytest.mark.parametrize(
    ("offset", "size", "stride", "message"),
    [
        (0, (4, 4), (4, 1), "reaches element 15 of a storage of 12"),
        (10, (3,), (1,), "reaches element 12 of a storage of 12"),
        (13, (1,), (1,), "has an invalid layout (offset 13"),
        (0, (3,), (-1,), "has an invalid layout"),
        (0, (3, 1), (1,), "has an invalid layout"),
    ],
)
def test_out_of_bounds_layouts_are_refused(tmp_path, offset, size, stride, message) -> None:
    storage = FakeStorage(torch.FloatStorage, "0", 12)
    pkl = torch_like({"w": FakeTensor(storage, offset, size, stride)})
    file = write_archive(tmp_path / "w.bin", pkl, {"0": np.zeros(12, np.float32).tobytes()})
    with pytest.raises(CheckpointError, match=rf"tensor 'w' in .*{re.escape(message)}"):
        load_state_dict(file)


def test_truncated_storage_and_non_state_dicts(tmp_path: Path) -> None:
    storage = FakeStorage(torch.FloatStorage, "0", 12)
    pkl = torch_like({"w": FakeTensor(storage, 0, (12,), (1,))})
    file = write_archive(tmp_path / "w.bin", pkl, {"0": b"\0" * 40})
    with pytest.raises(CheckpointError, match=r"holds 40 bytes, expected 48; the file is trunc"):
        load_state_dict(file)
    torch.save(torch.ones(3), tmp_path / "tensor.bin")
    with pytest.raises(CheckpointError, match=r"holds a tensor, not a dict of tensors"):
        load_state_dict(tmp_path / "tensor.bin")
    torch.save({"model": {"w": torch.ones(3)}}, tmp_path / "nested.bin")
    with pytest.raises(CheckpointError, match=r"holds 'model': a dict, not a tensor"):
        load_state_dict(tmp_path / "nested.bin")
    (tmp_path / "cut.bin").write_bytes((tmp_path / "nested.bin").read_bytes()[:300])
    with pytest.raises(CheckpointError, match=r"cut.bin is truncated or corrupt"):
        load_state_dict(tmp_path / "cut.bin")


def test_legacy_format_says_how_to_convert(tmp_path: Path) -> None:
    file = tmp_path / "old.bin"
    torch.save({"w": torch.ones(2)}, file, _use_new_zipfile_serialization=False)
    with pytest.raises(CheckpointError) as error:
        load_state_dict(file)
    message = str(error.value)
    assert "PyTorch's legacy format" in message and "_use_new_zipfile_serialization" in message
    assert f"torch.save(torch.load('{file}', weights_only=True), '{file}')" in message


# ----------------------------------------------------------------------------- malicious pickles


class RunsCommand:
    def __init__(self, function, argument: str) -> None:
        self.function, self.argument = function, argument

    def __reduce__(self):
        return self.function, (self.argument,)


def malicious_files(tmp_path: Path, marker: Path) -> list[tuple[Path, str]]:
    """(file, the global it names) for pickles that would touch `marker` if they ran."""
    touch = f"touch {marker}"
    system = f"{os.system.__module__}.system"  # posix.system on Linux
    evaluated = f"__import__('os').system({touch!r})"
    # what torch.save itself writes for a state_dict with a booby-trapped entry
    torch.save({"w": torch.ones(2), "x": RunsCommand(os.system, touch)}, tmp_path / "saved.bin")
    pickles = {
        "builtins.eval": pickle.dumps(RunsCommand(eval, evaluated), protocol=4),
        "__builtin__.eval": pickle.dumps(RunsCommand(eval, evaluated), protocol=2),
        "os.system": f"(S'{touch}'\nios\nsystem\n.".encode(),  # protocol 0, INST
        system: pickle.dumps({"w": RunsCommand(os.system, touch)}, protocol=5),
        # a torch global that is not a plain-tensor rebuild function
        "torch.serialization.get_default_load_endianness": pickle.dumps(
            torch.serialization.get_default_load_endianness, protocol=2
        ),
    }
    return [(tmp_path / "saved.bin", system)] + [
        (write_archive(tmp_path / f"{index}.bin", pkl, {}), name)
        for index, (name, pkl) in enumerate(pickles.items())
    ]


def test_pickles_that_name_other_globals_are_refused_and_run_nothing(tmp_path: Path) -> None:
    marker = tmp_path / "ran"
    for file, global_name in malicious_files(tmp_path, marker):
        with pytest.raises(CheckpointError) as error:
            load_state_dict(file)
        message = str(error.value)
        assert f"refers to the Python global {global_name}," in message
        assert "could run arbitrary code" in message and "\n" not in message
        assert not marker.exists(), f"{global_name}: the pickle ran"


def test_a_state_dict_with_a_trap_is_refused_through_load_model(tmp_path: Path) -> None:
    from codegen_repl.model.checkpoint import load_model

    marker = tmp_path / "ran"
    model = hf_codegen()
    model.config.to_json_file(tmp_path / "config.json")
    state = dict(model.state_dict()) | {"trap": RunsCommand(os.system, f"touch {marker}")}
    torch.save(state, tmp_path / "pytorch_model.bin")
    with pytest.raises(CheckpointError, match=r"refers to the Python global posix.system"):
        load_model(tmp_path)
    assert not marker.exists()


# --------------------------------------------------------------------------------- without torch

NO_TORCH_SCRIPT = r"""
import importlib.abc, json, sys


class NoTorch(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] in ("torch", "transformers"):
            raise ImportError(f"{name} is not installed here (blocked by the test)")
        return None


sys.meta_path.insert(0, NoTorch())
from codegen_repl.decoders.local import LocalDecoder
from codegen_repl.model.sample_params import SampleParams

folder, cache, prompt = sys.argv[1], sys.argv[2], json.loads(sys.argv[3])
out = {}
hub_id = "Salesforce/codegen-350M-mono"
for key, model, cache_dir in (("folder", folder, None), ("hub", hub_id, cache)):
    decoder = LocalDecoder.load(model, dtype="float32", cache_dir=cache_dir)
    chunks = list(decoder.stream_tokens(prompt, SampleParams(max_new_tokens=32)))
    out[key] = [int(t) for chunk in chunks for t in chunk[0]]
out["torch_imported"] = any(name.split(".")[0] == "torch" for name in sys.modules)
print(json.dumps(out))
"""


def test_bin_folder_and_hub_cache_decode_as_transformers_without_torch(
    tmp_path: Path, tokenizer_files: Path
) -> None:
    """The published repos' layout: fp16 pytorch_model.bin with buffers, tokenizer files; read in
    a process where `import torch` fails, locally and from an offline HF cache."""
    from codegen_repl.model.tokenizer import CodeGenTokenizer

    vocab_size = CodeGenTokenizer.from_dir(tokenizer_files).vocab_size
    reference = hf_codegen(seed=6, vocab_size=vocab_size)
    folder = save_bin(reference, tmp_path / "bin_folder")
    for file in tokenizer_files.iterdir():
        (folder / file.name).write_bytes(file.read_bytes())
    snapshot = fake_hub_cache(tmp_path / "cache", folder, "Salesforce/codegen-350M-mono")
    with torch.no_grad():  # the .bin holds fp16: compare with the fp16-rounded weights
        for param in reference.parameters():
            param.copy_(param.half().float())
    prompt = np.random.default_rng(5).integers(0, vocab_size, (1, 9))
    with torch.no_grad():
        expected = reference.generate(
            torch.as_tensor(prompt),
            attention_mask=torch.ones_like(torch.as_tensor(prompt)),
            max_new_tokens=32,
            do_sample=False,
            eos_token_id=None,
            pad_token_id=0,
        )[0, prompt.shape[1] :].tolist()
    ids = json.dumps(prompt[0].tolist())
    result = subprocess.run(
        [sys.executable, "-c", NO_TORCH_SCRIPT, str(folder), str(tmp_path / "cache"), ids],
        capture_output=True,
        text=True,
        timeout=600,
        cwd=ROOT,
        env={**os.environ, "JAX_PLATFORMS": "cpu", "HF_HUB_OFFLINE": "1"},
    )
    assert result.returncode == 0, result.stderr
    out = json.loads(result.stdout.splitlines()[-1])
    assert out == {"folder": expected, "hub": expected, "torch_imported": False}
    assert (snapshot / "pytorch_model.bin").is_symlink()
