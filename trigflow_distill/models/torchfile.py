"""Torch-free reader and writer of PyTorch's zip checkpoint format (``torch.save`` since 1.6).

``load`` unpickles ``*/data.pkl`` with an unpickler that only resolves the globals a state dict needs (tensor
rebuild functions, storage types, OrderedDict) and refuses everything else, so a malicious file cannot run code.
Tensors are located in the (uncompressed, 64-byte aligned) ``*/data/<key>`` zip members and either memory-mapped
(``load``) or read one at a time on access (``LazyStateDict``), so converting never needs more than one copy of
the weights in memory. ``save`` writes a zip that
``torch.load(path, weights_only=True)`` accepts, with a pickle emitted opcode by opcode (no torch needed).
"""

from __future__ import annotations

import collections
import io
import json
import math
import os
import pickle
import struct
import zipfile
from collections.abc import Mapping
from typing import Any, BinaryIO, Callable

import ml_dtypes
import numpy as np


class TorchFileError(ValueError):
    """The file is not a readable PyTorch checkpoint (corrupt, truncated, unsupported content)."""


class UnsafePickleError(TorchFileError):
    """The checkpoint's pickle references a global outside the tensor-rebuild allowlist."""


# torch legacy storage class name <-> numpy dtype (the names torch.save writes into the pickle).
_STORAGE_DTYPES: dict[str, np.dtype] = {
    "DoubleStorage": np.dtype(np.float64),
    "FloatStorage": np.dtype(np.float32),
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
_DTYPE_STORAGES = {dt: name for name, dt in _STORAGE_DTYPES.items() if name != "UntypedStorage"}

_LEGACY_MAGIC = b"\x80\x02\x8a\x0a\x6c\xfc\x9c\x46\xf9\x20\x6a\xa8\x50\x19"  # pickled 0x1950a86a20f9469cfc6c
_ALIGN = 64  # torch.save aligns every storage to 64 bytes inside the zip


class _StorageType:
    """Stands in for ``torch.<X>Storage``: only carries the element dtype."""

    def __init__(self, name: str):
        self.dtype = _STORAGE_DTYPES[name]


class _Storage:
    """A storage's place in the file: uncompressed bytes at ``file_offset``, or the bytes themselves."""

    def __init__(self, name: str, dtype: np.dtype, numel: int, file_offset: int, data: bytes | None = None):
        self.name, self.dtype, self.numel, self.file_offset, self.data = name, dtype, numel, file_offset, data


class TensorRef:
    """A tensor not yet read: its storage, element offset, shape and strides (in elements)."""

    def __init__(self, storage: _Storage, offset: int, shape: tuple, strides: tuple):
        self.storage, self.offset, self.shape, self.strides = storage, offset, shape, strides
        self.dtype = storage.dtype
        self.nbytes = int(np.prod(shape, dtype=np.int64)) * storage.dtype.itemsize
        # elements [offset, end) of the storage hold the tensor
        self._end = offset + 1 + sum((n - 1) * s for n, s in zip(shape, strides)) if self.nbytes else offset

    def _view(self, flat: np.ndarray) -> np.ndarray:
        """The tensor as a view of ``flat`` = storage elements [offset, end)."""
        if not self.nbytes:
            return np.zeros(self.shape, self.dtype)
        return np.lib.stride_tricks.as_strided(
            flat, shape=self.shape, strides=tuple(s * self.dtype.itemsize for s in self.strides)
        )

    def read(self, f: BinaryIO) -> np.ndarray:
        """Reads just this tensor's bytes from the open checkpoint ``f`` into a new contiguous array."""
        flat = np.empty(self._end - self.offset, self.dtype)
        if self.storage.data is not None:
            flat[...] = np.frombuffer(self.storage.data, self.dtype, flat.size, self.offset * self.dtype.itemsize)
        elif flat.size:
            f.seek(self.storage.file_offset + self.offset * self.dtype.itemsize)
            if f.readinto(flat.view(np.uint8)) != flat.nbytes:
                raise TorchFileError(f"{f.name}: short read in storage {self.storage.name!r} (truncated file)")
        view = self._view(flat)
        return view if view.flags.c_contiguous else view.copy()

    def mmap(self, f: BinaryIO) -> np.ndarray:
        """Read-only view of a memory map of this tensor's bytes (nothing is read until used)."""
        st = self.storage
        if st.data is not None or not self.nbytes:
            return self.read(f)
        flat = np.memmap(
            f,
            dtype=self.dtype,
            mode="r",
            offset=st.file_offset + self.offset * self.dtype.itemsize,
            shape=(self._end - self.offset,),
        )
        view = self._view(flat)
        view.flags.writeable = False
        return view


def _rebuild_tensor(storage, storage_offset, size, stride, *_unused):
    size, stride = tuple(int(s) for s in size), tuple(int(s) for s in stride)
    if len(size) != len(stride) or storage_offset < 0 or any(s < 0 for s in size + stride):
        raise TorchFileError(f"invalid tensor geometry size={size} stride={stride} offset={storage_offset}")
    ref = TensorRef(storage, int(storage_offset), size, stride)
    if ref._end > storage.numel:
        raise TorchFileError(
            f"tensor size={size} stride={stride} offset={storage_offset} reads past its storage "
            f"{storage.name!r} of {storage.numel} elements (corrupt file)"
        )
    return ref


def _rebuild_parameter(data, requires_grad=False, backward_hooks=None, state=None):
    return data


def _rebuild_from_type_v2(func, new_type, args, state):
    if new_type is not _TENSOR_TYPE:
        raise UnsafePickleError(f"tensor subclass {new_type!r} is not supported")
    return func(*args)


def _latin1_encode(text, encoding="latin1"):
    # Protocol-2 pickles store bytes as _codecs.encode(str, "latin1"); nothing else is allowed.
    if encoding != "latin1" or not isinstance(text, str):
        raise UnsafePickleError("_codecs.encode is only allowed as encode(str, 'latin1')")
    return text.encode("latin1")


_TENSOR_TYPE = object()
_ALLOWED_GLOBALS: dict[tuple[str, str], Any] = {
    ("torch._utils", "_rebuild_tensor_v2"): _rebuild_tensor,
    ("torch._utils", "_rebuild_tensor"): _rebuild_tensor,
    ("torch._utils", "_rebuild_parameter"): _rebuild_parameter,
    ("torch._utils", "_rebuild_parameter_with_state"): _rebuild_parameter,
    ("torch._tensor", "_rebuild_from_type_v2"): _rebuild_from_type_v2,
    ("torch", "Tensor"): _TENSOR_TYPE,
    ("torch.nn.parameter", "Parameter"): _TENSOR_TYPE,
    ("torch", "Size"): tuple,
    ("collections", "OrderedDict"): collections.OrderedDict,
    ("_codecs", "encode"): _latin1_encode,
    ("io", "BytesIO"): io.BytesIO,  # TransformerEngine `_extra_state` entries (skipped by load)
    ("_io", "BytesIO"): io.BytesIO,
    **{("torch", name): _StorageType(name) for name in _STORAGE_DTYPES},
}


class _Unpickler(pickle.Unpickler):
    """Resolves only allowlisted globals; storages come from ``storage_fn(key, dtype, numel)``."""

    def __init__(self, data: bytes, storage_fn, path: str):
        super().__init__(io.BytesIO(data))
        self._storage_fn, self._path, self._storages = storage_fn, path, {}

    def find_class(self, module, name):
        try:
            return _ALLOWED_GLOBALS[(module, name)]
        except KeyError:
            raise UnsafePickleError(
                f"{self._path}: refusing to load global '{module}.{name}': only tensor-rebuild globals are "
                "allowed in a weights checkpoint (the file may be malicious or not a plain state dict)"
            ) from None

    def persistent_load(self, pid):
        if not (isinstance(pid, tuple) and len(pid) == 5 and pid[0] == "storage" and isinstance(pid[1], _StorageType)):
            raise TorchFileError(f"{self._path}: unsupported persistent id {pid!r}")
        _, storage_type, key, _location, numel = pid
        if key not in self._storages:
            self._storages[key] = self._storage_fn(str(key), storage_type.dtype, int(numel))
        return self._storages[key]


def _member_data_offset(f: BinaryIO, info: zipfile.ZipInfo) -> int:
    """Byte offset of a stored member's data: after its local header (whose extra field may differ from the
    central directory's)."""
    f.seek(info.header_offset)
    header = f.read(30)
    if len(header) != 30 or header[:4] != b"PK\x03\x04":
        raise TorchFileError(f"bad local zip header for member {info.filename!r}")
    name_len, extra_len = struct.unpack("<HH", header[26:30])
    return info.header_offset + 30 + name_len + extra_len


def _check_path(path: str) -> None:
    if not os.path.exists(path):
        raise FileNotFoundError(f"{path}: no such checkpoint file")
    if os.path.isdir(path):
        raise IsADirectoryError(
            f"{path} is a directory, not a torch.save file; for a torch.distributed.checkpoint folder run "
            "torch.distributed.checkpoint.format_utils.dcp_to_torch_save first; for a diffusers folder use "
            "convert.load_diffusers_folder"
        )


def _open_zip(path: str) -> zipfile.ZipFile:
    with open(path, "rb") as f:
        head = f.read(len(_LEGACY_MAGIC))
    if head.startswith(_LEGACY_MAGIC):
        raise TorchFileError(
            f"{path}: legacy (pre-1.6) torch.save format is not supported; re-save it with torch>=1.6: "
            "torch.save(torch.load(path), new_path)"
        )
    try:
        return zipfile.ZipFile(path)
    except (zipfile.BadZipFile, OSError, EOFError) as e:
        if head.startswith(b"PK\x03\x04"):
            raise TorchFileError(
                f"{path}: truncated or corrupt zip checkpoint ({e}); re-download or re-save it"
            ) from None
        raise TorchFileError(
            f"{path}: not a PyTorch checkpoint (neither a torch.save zip nor a legacy pickle)"
        ) from None


def _flatten(obj, prefix: str, out: dict) -> None:
    for k, v in obj.items():
        key = f"{prefix}{k}"
        if isinstance(v, dict):
            _flatten(v, key + ".", out)
        elif isinstance(v, TensorRef):
            out[key] = v


def _read_refs(path: str) -> dict[str, TensorRef]:
    """Unpickles the checkpoint's structure: ``{name: TensorRef}`` (no tensor data read)."""
    _check_path(path)
    file_size = os.path.getsize(path)
    with _open_zip(path) as zf, open(path, "rb") as f:
        infos = {i.filename: i for i in zf.infolist()}
        pkl = [n for n in infos if n.endswith("data.pkl") and n.count("/") == 1]
        if len(pkl) != 1:
            raise TorchFileError(
                f"{path}: zip file is not a PyTorch checkpoint (expected one '<name>/data.pkl', found {pkl or 'none'})"
            )
        root = pkl[0][: -len("data.pkl")]

        def storage(key: str, dtype: np.dtype, numel: int) -> _Storage:
            name = f"{root}data/{key}"
            info = infos.get(name)
            if info is None:
                raise TorchFileError(f"{path}: storage member {name!r} is missing (truncated or corrupt file)")
            nbytes = numel * dtype.itemsize
            if info.file_size < nbytes:
                raise TorchFileError(f"{path}: storage {name!r} has {info.file_size} bytes, needs {nbytes}")
            if info.compress_type != zipfile.ZIP_STORED:  # not written by torch.save; read it whole
                return _Storage(name, dtype, numel, -1, zf.read(name))
            offset = _member_data_offset(f, info)
            if offset + nbytes > file_size:
                raise TorchFileError(
                    f"{path}: storage {name!r} ends at byte {offset + nbytes} beyond the file "
                    f"size {file_size} (truncated file)"
                )
            return _Storage(name, dtype, numel, offset)

        try:
            obj = _Unpickler(zf.read(pkl[0]), storage, path).load()
        except (UnsafePickleError, TorchFileError):
            raise
        except (
            pickle.UnpicklingError,
            EOFError,
            zipfile.BadZipFile,
            ValueError,
            TypeError,
            AttributeError,
            IndexError,
            KeyError,
        ) as e:
            raise TorchFileError(f"{path}: corrupt checkpoint pickle ({type(e).__name__}: {e})") from None
    if not isinstance(obj, dict):
        raise TorchFileError(f"{path}: checkpoint holds a {type(obj).__name__}, expected a dict of tensors")
    out: dict[str, TensorRef] = {}
    _flatten(obj, "", out)
    return out


class LazyStateDict(Mapping):
    """``{name: array}`` view of a checkpoint that touches a tensor's bytes only when it is accessed.

    ``mmap=True`` (default): each access returns a fresh read-only memory-map view; it is unmapped (and leaves
    the process's memory) when the caller drops it, so a consumer that keeps only transformed copies holds one
    copy of the weights plus the tensor in flight, and ``sd[k].shape`` costs no I/O. ``mmap=False``: each access
    reads the tensor into a new array. ``refs[name]`` / ``shapes`` give shapes without touching data;
    ``on_read(name, nbytes)`` is called on every access.
    """

    def __init__(self, path: str | os.PathLike, on_read: Callable[[str, int], None] | None = None, mmap: bool = True):
        self.path = os.fspath(path)
        self.refs = _read_refs(self.path)
        self.on_read, self.mmap = on_read, mmap

    @property
    def shapes(self) -> dict[str, tuple[int, ...]]:
        return {k: ref.shape for k, ref in self.refs.items()}

    def __getitem__(self, key: str) -> np.ndarray:
        ref = self.refs[key]
        with open(self.path, "rb") as f:
            arr = ref.mmap(f) if self.mmap else ref.read(f)
        if self.on_read is not None:
            self.on_read(key, ref.nbytes)
        return arr

    def __iter__(self):
        return iter(self.refs)

    def __len__(self) -> int:
        return len(self.refs)

    def subset(self, keys: Mapping[str, str]) -> "LazyStateDict":
        """A lazy dict with entries renamed ``{new_name: old_name}`` (e.g. to strip a prefix)."""
        sub = object.__new__(LazyStateDict)
        sub.path, sub.on_read, sub.mmap = self.path, self.on_read, self.mmap
        sub.refs = {new: self.refs[old] for new, old in keys.items()}
        return sub


def load(path: str | os.PathLike, *, mmap: bool = True) -> dict[str, np.ndarray]:
    """Tensors of a ``torch.save`` zip checkpoint without torch, as ``{name: array}``.

    Nested dicts are flattened with ``.``; non-tensor entries (ints, strings, TransformerEngine extra state
    as BytesIO) are dropped. With ``mmap=True`` arrays are read-only views of memory maps (nothing read yet);
    with ``mmap=False`` they are in-memory copies. bfloat16 comes back as ``ml_dtypes.bfloat16``.
    See ``LazyStateDict`` for reading tensor by tensor.
    """
    path = os.fspath(path)
    refs = _read_refs(path)
    with open(path, "rb") as f:
        return {k: (ref.mmap(f) if mmap else ref.read(f)) for k, ref in refs.items()}


class _PickleWriter:
    """Emits a protocol-2 pickle of ``{name: tensor}`` exactly as torch.save lays it out."""

    def __init__(self):
        self.buf = io.BytesIO()
        self.buf.write(b"\x80\x02")  # PROTO 2

    def str(self, s: str) -> None:
        b = s.encode("utf-8")
        self.buf.write(b"X" + struct.pack("<I", len(b)) + b)  # BINUNICODE

    def int(self, n: int) -> None:
        if 0 <= n < 2**31:
            self.buf.write(b"J" + struct.pack("<i", n))  # BININT
        else:
            b = n.to_bytes((n.bit_length() + 8) // 8, "little", signed=True)
            self.buf.write(b"\x8a" + bytes([len(b)]) + b)  # LONG1

    def ints(self, values) -> None:
        self.buf.write(b"(")  # MARK
        for v in values:
            self.int(int(v))
        self.buf.write(b"t")  # TUPLE

    def glob(self, module: str, name: str) -> None:
        self.buf.write(b"c" + f"{module}\n{name}\n".encode())  # GLOBAL

    def tensor(self, key: str, storage_name: str, shape, numel: int) -> None:
        strides = [int(np.prod(shape[i + 1 :], dtype=np.int64)) for i in range(len(shape))]
        self.glob("torch._utils", "_rebuild_tensor_v2")
        self.buf.write(b"((")  # MARK args, MARK persistent id
        self.str("storage")
        self.glob("torch", storage_name)
        self.str(key)
        self.str("cpu")
        self.int(numel)
        self.buf.write(b"tQ")  # TUPLE, BINPERSID
        self.int(0)  # storage offset
        self.ints(shape)
        self.ints(strides)
        self.buf.write(b"\x89")  # NEWFALSE: requires_grad
        self.glob("collections", "OrderedDict")
        self.buf.write(b")RtR")  # EMPTY_TUPLE REDUCE (hooks), TUPLE (args), REDUCE (rebuild)


def _aligned_info(name: str, position: int, nbytes: int) -> zipfile.ZipInfo:
    """ZipInfo whose extra field pads the local header so the member's data starts on a 64-byte boundary."""
    info = zipfile.ZipInfo(name, date_time=(1980, 1, 1, 0, 0, 0))
    info.compress_type = zipfile.ZIP_STORED
    info.file_size = nbytes
    zip64_extra = 20 if nbytes * 1.05 > zipfile.ZIP64_LIMIT else 0  # what zipfile adds to the local header
    pad = -(position + 30 + len(name.encode()) + zip64_extra) % _ALIGN
    if pad:
        pad += _ALIGN if pad < 4 else 0  # an extra field needs a 4-byte header
        info.extra = b"FB" + struct.pack("<H", pad - 4) + b"Z" * (pad - 4)
    return info


def save(path: str | os.PathLike, tensors: Mapping[str, np.ndarray], archive_name: str = "archive") -> None:
    """Writes ``{name: array}`` as a ``torch.save`` zip (contiguous tensors, 64-byte aligned storages) that
    ``torch.load(path, weights_only=True)`` reads. Written to ``path + '.tmp'`` first, then renamed."""
    path = os.fspath(path)
    arrays = {}
    for key, value in tensors.items():
        if not isinstance(key, str):
            raise TypeError(f"checkpoint keys must be str, got {key!r}")
        arr = np.asarray(value)
        if arr.dtype not in _DTYPE_STORAGES:
            raise TypeError(
                f"{key}: dtype {arr.dtype} has no torch storage type; cast to one of "
                f"{sorted(str(d) for d in _DTYPE_STORAGES)}"
            )
        arrays[key] = arr
    pw = _PickleWriter()
    pw.buf.write(b"}(")  # EMPTY_DICT, MARK
    for i, (key, arr) in enumerate(arrays.items()):
        pw.str(key)
        pw.tensor(str(i), _DTYPE_STORAGES[arr.dtype], arr.shape, arr.size)
    pw.buf.write(b"u.")  # SETITEMS, STOP
    tmp = path + ".tmp"
    with open(tmp, "wb") as f, zipfile.ZipFile(f, "w", zipfile.ZIP_STORED, allowZip64=True) as zf:

        def write(name: str, payload) -> None:
            view = memoryview(payload).cast("B")
            with zf.open(_aligned_info(f"{archive_name}/{name}", f.tell(), view.nbytes), "w") as w:
                w.write(view)

        write("data.pkl", pw.buf.getvalue())
        write(".format_version", b"1")
        write(".storage_alignment", str(_ALIGN).encode())
        write("byteorder", b"little")
        for i, arr in enumerate(arrays.values()):
            write(f"data/{i}", np.ascontiguousarray(arr).reshape(-1).view(np.uint8))
        write("version", b"3\n")
    os.replace(tmp, path)


# safetensors dtype names -> bytes per element (the format's list; F8 variants and BOOL are one byte).
_SAFETENSORS_ITEMSIZE = {
    "BOOL": 1, "U8": 1, "I8": 1, "F8_E4M3": 1, "F8_E5M2": 1, "I16": 2, "U16": 2, "F16": 2, "BF16": 2,
    "I32": 4, "U32": 4, "F32": 4, "I64": 8, "U64": 8, "F64": 8,
}  # fmt: skip
# The safetensors library's own limit on the header size (anything larger is a damaged length field).
_SAFETENSORS_MAX_HEADER = 100_000_000


def safetensors_header(path: str | os.PathLike) -> dict[str, dict]:
    """``{name: {"dtype", "shape", "data_offsets"}}`` of a safetensors file, checked before the file is used.

    The safetensors library reports a truncated file, a header that is not JSON or offsets outside the file as
    ``SafetensorError: Error while deserializing header: ...`` without the file's name (or maps it and fails later),
    so every reader checks the header here first: a ``TorchFileError`` (a ValueError) naming the file and the fault.
    """
    path = os.fspath(path)

    def bad(why: str) -> TorchFileError:
        return TorchFileError(f"{path}: not a valid safetensors file ({why}); re-download or re-save it")

    size = os.path.getsize(path)
    with open(path, "rb") as f:
        head = f.read(8)
        if len(head) < 8:
            raise bad(f"{size} bytes, shorter than the 8-byte header length: truncated or empty")
        (n,) = struct.unpack("<Q", head)
        if n > size - 8 or n > _SAFETENSORS_MAX_HEADER:
            raise bad(f"the header length {n} is larger than the file's {size - 8} remaining bytes: truncated?")
        raw = f.read(n)
    try:
        header = json.loads(raw)
    except (UnicodeDecodeError, ValueError) as e:
        raise bad(f"the header is not valid JSON: {e}") from None
    if not isinstance(header, dict):
        raise bad(f"the header is a JSON {type(header).__name__}, not an object")
    data_size = size - 8 - n
    tensors = {}
    for name, entry in header.items():
        if name == "__metadata__":
            continue
        if not isinstance(entry, dict):
            raise bad(f"tensor {name!r} has no dtype/shape/data_offsets")
        dtype, shape, offsets = entry.get("dtype"), entry.get("shape"), entry.get("data_offsets")
        if dtype not in _SAFETENSORS_ITEMSIZE:
            raise bad(f"tensor {name!r} has an unknown dtype {dtype!r}")
        if not isinstance(shape, list) or not all(isinstance(d, int) and d >= 0 for d in shape):
            raise bad(f"tensor {name!r} has an invalid shape {shape!r}")
        if not (isinstance(offsets, list) and len(offsets) == 2 and all(isinstance(o, int) for o in offsets)):
            raise bad(f"tensor {name!r} has invalid data_offsets {offsets!r}")
        begin, end = offsets
        if not 0 <= begin <= end <= data_size:
            raise bad(f"tensor {name!r} at bytes [{begin}, {end}) is outside the {data_size} bytes of data: truncated?")
        if end - begin != math.prod(shape) * _SAFETENSORS_ITEMSIZE[dtype]:
            raise bad(f"tensor {name!r} of shape {shape} {dtype} does not fill its {end - begin} bytes")
        tensors[name] = entry
    return tensors
