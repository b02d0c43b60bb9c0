"""PyTorch checkpoints (`pytorch_model.bin`) read without torch, and without running their code.

A file written by `torch.save` (PyTorch >= 1.6) is a zip archive whose entries are stored
uncompressed:

    <name>/data.pkl     the pickled object, here a state_dict. A tensor is the call
                        `torch._utils._rebuild_tensor_v2(storage, offset, size, stride, ...)`
                        and a storage the persistent id
                        `('storage', torch.<Dtype>Storage, key, device, numel)`.
    <name>/data/<key>   the raw bytes of storage `key`
    <name>/byteorder    `little` or `big` (absent in old files, which are little-endian)

Security rule: `data.pkl` is read by an unpickler that resolves only the tensor-rebuild functions,
the storage types and `collections.OrderedDict`, each to a harmless stand-in of ours; any other
global (`os.system`, `builtins.eval`, ...) is a `CheckpointError` naming it, raised before
anything is called. Tensors are numpy views (read-only) into one `mmap` of the file, with the
offset, shape and strides torch recorded, so reading a checkpoint makes no copy of the weights;
tensors that share a storage in the file share memory here too.
"""

from __future__ import annotations

import collections
import dataclasses
import io
import mmap
import pickle
import struct
import zipfile
from pathlib import Path
from typing import Any

import ml_dtypes
import numpy as np

from codegen_repl.errors import CheckpointError

# The storage classes torch names in data.pkl, by the numpy dtype of their elements.
STORAGE_DTYPES: dict[str, np.dtype] = {
    "FloatStorage": np.dtype(np.float32),
    "DoubleStorage": np.dtype(np.float64),
    "HalfStorage": np.dtype(np.float16),
    "BFloat16Storage": np.dtype(ml_dtypes.bfloat16),
    "LongStorage": np.dtype(np.int64),
    "IntStorage": np.dtype(np.int32),
    "ShortStorage": np.dtype(np.int16),
    "CharStorage": np.dtype(np.int8),
    "ByteStorage": np.dtype(np.uint8),
    "BoolStorage": np.dtype(np.bool_),
    "UntypedStorage": np.dtype(np.uint8),
}
# What torch.save wrote before PyTorch 1.6 (and still writes with
# _use_new_zipfile_serialization=False): a pickled magic number, then more pickles.
LEGACY_MAGIC = b"\x80\x02\x8a\x0a" + (0x1950A86A20F9469CFC6C).to_bytes(10, "little")
_LOCAL_HEADER = struct.Struct("<4s5H3L2H")  # a zip entry's local header, before its name


@dataclasses.dataclass(frozen=True, slots=True)
class _StorageType:
    """What `torch.<Dtype>Storage` stands for while unpickling: only its element type."""

    dtype: np.dtype


@dataclasses.dataclass(frozen=True, slots=True)
class _Storage:
    key: str
    dtype: np.dtype
    numel: int


@dataclasses.dataclass(frozen=True, slots=True)
class _Tensor:
    """A tensor as data.pkl describes it; made an array once the whole pickle is read."""

    storage: _Storage
    offset: int
    size: tuple[int, ...]
    stride: tuple[int, ...]


def _rebuild_tensor(storage: _Storage, offset: int, size: Any, stride: Any, *_: Any) -> _Tensor:
    """Stands in for torch._utils._rebuild_tensor(_v2); the rest (requires_grad, backward
    hooks, metadata) means nothing without autograd."""
    if not isinstance(storage, _Storage):
        raise pickle.UnpicklingError(f"a tensor's storage is a {type(storage).__name__}")
    return _Tensor(storage, offset, tuple(size), tuple(stride))


def _rebuild_parameter(data: _Tensor, *_: Any) -> _Tensor:
    """Stands in for torch._utils._rebuild_parameter(_with_state): a Parameter is its tensor."""
    if not isinstance(data, _Tensor):
        raise pickle.UnpicklingError(f"a parameter holds a {type(data).__name__}")
    return data


_ALLOWED: dict[tuple[str, str], Any] = {
    ("collections", "OrderedDict"): collections.OrderedDict,
    ("torch._utils", "_rebuild_tensor"): _rebuild_tensor,
    ("torch._utils", "_rebuild_tensor_v2"): _rebuild_tensor,
    ("torch._utils", "_rebuild_parameter"): _rebuild_parameter,
    ("torch._utils", "_rebuild_parameter_with_state"): _rebuild_parameter,
    **{("torch", name): _StorageType(dtype) for name, dtype in STORAGE_DTYPES.items()},
    ("torch.storage", "UntypedStorage"): _StorageType(np.dtype(np.uint8)),
}


class _RestrictedUnpickler(pickle.Unpickler):
    """Resolves the globals of a plain state_dict and nothing else."""

    def __init__(self, data: bytes, file: Path) -> None:
        super().__init__(io.BytesIO(data))
        self.file = file

    def find_class(self, module: str, name: str) -> Any:
        try:
            return _ALLOWED[(module, name)]
        except KeyError:
            raise CheckpointError(
                f"{self.file} refers to the Python global {module}.{name}, which a checkpoint of "
                "plain tensors never needs; it was not loaded, since unpickling it could run "
                "arbitrary code. Use a checkpoint from a source you trust, in safetensors "
                "format if you can"
            ) from None

    def persistent_load(self, pid: Any) -> _Storage:
        match pid:
            case ("storage", _StorageType(dtype), str(key), _, int(numel)) if numel >= 0:
                return _Storage(key, dtype, numel)
        raise pickle.UnpicklingError(f"unknown persistent id {str(pid)[:80]}")


# --------------------------------------------------------------------------------- the archive


class _Archive:
    """The zip's storages as arrays over one read-only mmap of the file."""

    def __init__(self, file: Path, archive: zipfile.ZipFile) -> None:
        self.file = file
        self.zip = archive
        pickles = [n for n in self.zip.namelist() if n.endswith("/data.pkl") and n.count("/") == 1]
        if len(pickles) != 1:
            raise CheckpointError(
                f"{file} is a zip archive but not one torch.save wrote (no <name>/data.pkl); "
                "download the checkpoint again"
            )
        self.prefix = pickles[0].removesuffix("data.pkl")
        order = self._read_text("byteorder", default="little")
        if order not in ("little", "big"):
            raise CheckpointError(f"{file} has an unknown byte order {order!r}")
        self.big_endian = order == "big"
        with open(file, "rb") as handle:
            self.mmap = mmap.mmap(handle.fileno(), 0, access=mmap.ACCESS_READ)
        self.storages: dict[tuple[str, np.dtype], np.ndarray] = {}

    def _read_text(self, name: str, default: str) -> str:
        try:
            return self.zip.read(self.prefix + name).decode("ascii").strip()
        except KeyError:
            return default

    def pickle(self) -> bytes:
        return self.zip.read(self.prefix + "data.pkl")

    def storage(self, storage: _Storage) -> np.ndarray:
        """Storage `key` as a 1-D array of `dtype`, a view into the mmap (one per storage)."""
        cache_key = (storage.key, storage.dtype)
        if cache_key not in self.storages:
            self.storages[cache_key] = self._load_storage(storage)
        return self.storages[cache_key]

    def _load_storage(self, storage: _Storage) -> np.ndarray:
        try:
            info = self.zip.getinfo(f"{self.prefix}data/{storage.key}")
        except KeyError:
            raise CheckpointError(f"{self.file} lacks the storage data/{storage.key}") from None
        nbytes = storage.numel * storage.dtype.itemsize
        if info.file_size < nbytes:
            raise CheckpointError(
                f"{self.file}: storage data/{storage.key} holds {info.file_size} bytes, "
                f"expected {nbytes}; the file is truncated or corrupt"
            )
        if info.compress_type != zipfile.ZIP_STORED:  # not torch.save's, but still readable
            raw = self.zip.read(info)
            array = np.frombuffer(raw, storage.dtype, count=storage.numel)
        else:
            start = self._data_start(info)
            array = np.frombuffer(self.mmap, storage.dtype, storage.numel, offset=start)
        return array.byteswap() if self.big_endian else array

    def _data_start(self, info: zipfile.ZipInfo) -> int:
        """Where an uncompressed entry's bytes start: after its local header, name and extra
        field (torch pads the extra field so that data is 64-byte aligned)."""
        header = self.mmap[info.header_offset : info.header_offset + _LOCAL_HEADER.size]
        if len(header) < _LOCAL_HEADER.size:
            raise CheckpointError(f"{self.file} is truncated or corrupt (a zip header is cut)")
        fields = _LOCAL_HEADER.unpack(header)
        if fields[0] != b"PK\x03\x04":
            raise CheckpointError(f"{self.file} is truncated or corrupt (a bad zip header)")
        start = info.header_offset + _LOCAL_HEADER.size + fields[9] + fields[10]
        if start + info.file_size > len(self.mmap):
            raise CheckpointError(f"{self.file} is truncated or corrupt (an entry is cut)")
        return start


def _as_array(archive: _Archive, name: str, tensor: _Tensor) -> np.ndarray:
    """The tensor as a read-only strided view of its storage; every element checked in bounds."""
    size, stride, offset = tensor.size, tensor.stride, tensor.offset
    numbers = (offset, *size, *stride)
    if (
        len(size) != len(stride)
        or not all(isinstance(n, int) and not isinstance(n, bool) and n >= 0 for n in numbers)
        or offset > tensor.storage.numel
    ):
        raise CheckpointError(
            f"tensor {name!r} in {archive.file} has an invalid layout (offset {offset}, "
            f"size {size}, stride {stride}); the file is corrupt"
        )
    storage = archive.storage(tensor.storage)
    if 0 in size:
        empty = np.empty(size, storage.dtype)
        empty.flags.writeable = False
        return empty
    last = offset + sum((n - 1) * s for n, s in zip(size, stride, strict=True))
    if last >= storage.size:
        raise CheckpointError(
            f"tensor {name!r} in {archive.file} reaches element {last} of a storage of "
            f"{storage.size}; the file is corrupt"
        )
    itemsize = storage.dtype.itemsize
    return np.lib.stride_tricks.as_strided(
        storage[offset:],
        shape=size,
        strides=tuple(s * itemsize for s in stride),
        writeable=False,
    )


def load_state_dict(file: Path) -> dict[str, np.ndarray]:
    """Every tensor of the state_dict in `file`, by name, as read-only numpy views of the file.

    Args:
        file: a `torch.save` file (zip format) holding a dict of tensors, e.g. pytorch_model.bin.

    Returns:
        name -> array with the dtype (float32/16, bfloat16 via ml_dtypes, ints, bool), shape and
        strides torch recorded. The arrays keep the file mapped while they live.

    Raises:
        CheckpointError: the file pickles any other global (named in the message), is in the
            legacy pre-1.6 format, is not a dict of tensors, or is truncated or corrupt.
    """
    file = Path(file)
    with open(file, "rb") as handle:
        head = handle.read(len(LEGACY_MAGIC))
    if head == LEGACY_MAGIC:
        raise CheckpointError(
            f"{file} is in PyTorch's legacy format (torch.save with "
            "_use_new_zipfile_serialization=False, or PyTorch < 1.6), which only torch can "
            'read. Convert it once where torch is installed: python -c "import torch; '
            f"torch.save(torch.load('{file}', weights_only=True), '{file}')\""
        )
    try:
        with zipfile.ZipFile(file) as zipped:
            archive = _Archive(file, zipped)
            state = _RestrictedUnpickler(archive.pickle(), file).load()
            return _tensors(archive, state)
    except CheckpointError:
        raise
    except Exception as bad:  # zipfile, pickle and numpy each have their own errors
        raise CheckpointError(
            f"{file} is truncated or corrupt ({type(bad).__name__}: {bad}); "
            "delete it and download the checkpoint again"
        ) from None


def _tensors(archive: _Archive, state: object) -> dict[str, np.ndarray]:
    if not isinstance(state, dict):
        raise CheckpointError(
            f"{archive.file} holds a {_kind(state)}, not a dict of tensors (a state_dict)"
        )
    out = {}
    for name, value in state.items():
        if not isinstance(name, str) or not isinstance(value, _Tensor):
            raise CheckpointError(
                f"{archive.file} holds {name!r}: a {_kind(value)}, not a tensor; only flat "
                "state_dicts (name -> tensor) are read"
            )
        out[name] = _as_array(archive, name, value)
    return out


def _kind(value: object) -> str:
    return "tensor" if isinstance(value, _Tensor) else type(value).__name__
