"""Reading ``torch.save`` files (.bin, .pth, .pt, .ckpt, .pth.tar) into numpy arrays without torch.

``torch.save`` pickles its object with each tensor as a call of a rebuild function of ``torch._utils``
(storage, offset, size, stride, ...) whose storage is a persistent reference to a flat typed buffer: in the
zip format (torch >= 1.6) one zip entry per buffer, in the legacy format (older torch, or
``_use_new_zipfile_serialization=False``) the buffers follow the pickle in the file. Bio_ClinicalBERT's
pytorch_model.bin and the DeiT release's .pth files are such pickles.

The pickle is read with an allow-list: the rebuild functions of dense tensors and parameters, storage
and dtype names, ``collections.OrderedDict``, ``set``. Every other global a pickle names (a training script's
argparse.Namespace, a numpy scalar, or anything a crafted file would call) becomes an inert ``Opaque``
object: nothing outside this module runs. Tensors come back as numpy arrays in their own dtype
(bfloat16 and float8 as ml_dtypes'), copied out of their storage with its offset and strides, so views
that share a storage (tied weights, transposes) come back as separate arrays with the same values.
Tensors of other kinds (quantized, sparse, nested, subclasses) come back as ``Opaque`` objects named
after their rebuild function. A whole model saved with torch.save(model) comes back as its state dict.
"""

from __future__ import annotations

import collections
import pickle
import struct
import sys
import tarfile
import zipfile
from typing import Any, Callable, Dict, Optional, Sequence

import ml_dtypes
import numpy as np

_LEGACY_MAGIC = 0x1950A86A20F9469CFC6C  # What torch's legacy format pickles first, then its protocol (1001).

_STORAGE_DTYPES = {
    "FloatStorage": np.float32, "DoubleStorage": np.float64, "HalfStorage": np.float16,
    "BFloat16Storage": ml_dtypes.bfloat16, "LongStorage": np.int64, "IntStorage": np.int32,
    "ShortStorage": np.int16, "CharStorage": np.int8, "ByteStorage": np.uint8, "BoolStorage": np.bool_,
    "ComplexFloatStorage": np.complex64, "ComplexDoubleStorage": np.complex128,
}
_DTYPES = {
    "float32": np.float32, "float": np.float32, "float64": np.float64, "double": np.float64,
    "float16": np.float16, "half": np.float16, "bfloat16": ml_dtypes.bfloat16, "int64": np.int64,
    "long": np.int64, "int32": np.int32, "int": np.int32, "int16": np.int16, "short": np.int16,
    "int8": np.int8, "uint8": np.uint8, "uint16": np.uint16, "uint32": np.uint32, "uint64": np.uint64,
    "bool": np.bool_, "complex64": np.complex64, "complex128": np.complex128,
    "float8_e4m3fn": ml_dtypes.float8_e4m3fn, "float8_e5m2": ml_dtypes.float8_e5m2,
}


class CheckpointFormatError(ValueError):
    """The file is no torch.save file, or its pickle and buffers disagree (a one-line reason)."""


class Opaque:
    """What a global outside the allow-list becomes, and what calling or building it gives: it records the
    global's name (``qualname``) and the state the pickle gives it (``state``); nothing of it runs."""

    qualname = ""
    state = None

    def __init__(self, *args, **kwargs):
        pass

    def __setstate__(self, state):
        self.state = state

    def __setitem__(self, key, value):
        pass

    def append(self, value):
        pass

    def extend(self, values):
        pass

    def __repr__(self):
        return f"<{self.qualname}>"


class _StorageType:
    def __init__(self, dtype):
        self.dtype = None if dtype is None else np.dtype(dtype)  # None: an untyped storage (bytes).


class _DType:
    def __init__(self, dtype):
        self.dtype = np.dtype(dtype)


class _Storage:
    """A persistent storage reference: bytes read on first use (``read``), typed or untyped."""

    def __init__(self, key: str, dtype: Optional[np.dtype], read: Callable[[str], np.ndarray], unknown: str = "",
                 root: str = ""):
        self.key, self.dtype, self._read, self.unknown = key, dtype, read, unknown
        self.root = root or key  # The storage whose bytes these are (another one's for a legacy view).

    def elements(self, dtype: np.dtype, byteorder: str = sys.byteorder) -> np.ndarray:
        """The storage's bytes as a flat array of dtype, in this machine's byte order."""
        raw = self._read(self.key)
        if raw.size % dtype.itemsize:
            raise CheckpointFormatError(f"storage {self.key} holds {raw.size} bytes, not whole {dtype} elements")
        if byteorder == sys.byteorder or dtype.itemsize == 1:
            return raw.view(dtype)
        if dtype.kind in "biufc":  # numpy's own types swap each part (a complex number's two halves apart).
            return raw.view(dtype.newbyteorder()).astype(dtype)
        return raw.reshape(-1, dtype.itemsize)[:, ::-1].copy().reshape(-1).view(dtype)  # bfloat16, float8.


class _Tensor:
    """A tensor to copy out of its storage once every storage can be read (legacy files put them last)."""

    def __init__(self, storage, offset, size, stride, dtype=None):
        if not isinstance(storage, _Storage):
            raise CheckpointFormatError(f"a tensor's storage is {type(storage).__name__}, not a storage")
        dtype = storage.dtype if dtype is None else dtype
        if dtype is None:
            raise CheckpointFormatError(f"storage {storage.key} has no dtype")
        self.storage, self.offset, self.size, self.stride, self.dtype = storage, offset, tuple(size), tuple(stride), dtype

    def array(self, byteorder: str) -> np.ndarray:
        flat = self.storage.elements(self.dtype, byteorder)
        if len(self.size) != len(self.stride) or self.offset < 0 or any(s < 0 for s in self.stride + self.size):
            raise CheckpointFormatError(f"a tensor of storage {self.storage.key} has offset {self.offset}, "
                                        f"size {self.size} and stride {self.stride}")
        if 0 in self.size:
            return np.zeros(self.size, self.dtype)
        last = self.offset + sum((n - 1) * s for n, s in zip(self.size, self.stride))
        if last >= flat.size:
            raise CheckpointFormatError(f"a tensor reads element {last} of storage {self.storage.key}, "
                                        f"which holds {flat.size}")
        view = np.lib.stride_tricks.as_strided(flat[self.offset:], self.size, [s * flat.itemsize for s in self.stride])
        return np.array(view, order="C")  # A C-contiguous copy.


def _rebuild_tensor(storage, offset, size, stride, *_):
    return _Tensor(storage, offset, size, stride)


def _rebuild_tensor_v3(storage, offset, size, stride, requires_grad, hooks, dtype, *_):
    if not isinstance(dtype, _DType):
        raise CheckpointFormatError(f"a tensor's dtype is {dtype!r}")
    return _Tensor(storage, offset, size, stride, dtype.dtype)


def _rebuild_parameter(data, *_):
    return data


def _rebuild_from_type_v2(function, new_type, arguments, state):  # A tensor subclass or one with attributes.
    return function(*arguments)


_ALLOWED: Dict[tuple, Any] = {
    ("collections", "OrderedDict"): collections.OrderedDict,
    ("torch._utils", "_rebuild_tensor"): _rebuild_tensor,
    ("torch._utils", "_rebuild_tensor_v2"): _rebuild_tensor,
    ("torch._utils", "_rebuild_tensor_v3"): _rebuild_tensor_v3,
    ("torch._utils", "_rebuild_parameter"): _rebuild_parameter,
    ("torch._utils", "_rebuild_parameter_with_state"): _rebuild_parameter,
    ("torch._tensor", "_rebuild_from_type_v2"): _rebuild_from_type_v2,
    ("torch.storage", "UntypedStorage"): _StorageType(None),
    ("torch", "UntypedStorage"): _StorageType(None),
    # A module's names of its buffers that are not saved: protocol 2 pickles a set as a call of set, under
    # Python 2's module name (the overridden find_class gets it unmapped).
    ("__builtin__", "set"): set, ("builtins", "set"): set,
    ("__builtin__", "frozenset"): frozenset, ("builtins", "frozenset"): frozenset,
}
_ALLOWED.update({("torch", name): _StorageType(dtype) for name, dtype in _STORAGE_DTYPES.items()})
_ALLOWED.update({("torch", name): _DType(dtype) for name, dtype in _DTYPES.items()})


# pickle's Python unpickler: its memo is a dict, where the C one's is an array as long as the largest index a
# file names (a damaged or crafted index of 2**28 allocated 2 GiB). A checkpoint's pickle is small (its tensors'
# bytes are in the storages), so the Python one's pace is no cost.
class _Unpickler(pickle._Unpickler):
    def __init__(self, file, read_storage: Callable[[str], np.ndarray], storages: Dict[str, _Storage]):
        super().__init__(file)
        self._read_storage, self._storages = read_storage, storages
        self._opaque: Dict[str, type] = {}

    def load(self):
        try:
            return super().load()
        except KeyError as error:  # How the Python unpickler meets an unknown opcode or memo index.
            raise pickle.UnpicklingError(f"not a pickle (unknown opcode or memo index {error.args[0]!r})") from None

    def find_class(self, module, name):
        if (module, name) in _ALLOWED:
            return _ALLOWED[module, name]
        qualname = f"{module}.{name}"
        if qualname not in self._opaque:
            self._opaque[qualname] = type(name, (Opaque,), {"qualname": qualname})
        return self._opaque[qualname]

    def persistent_load(self, pid):
        if isinstance(pid, tuple) and len(pid) == 4 and pid[0] == "module":  # Legacy: (.., class, file, source).
            return pid[1]
        if not (isinstance(pid, tuple) and len(pid) >= 5 and pid[0] == "storage" and isinstance(pid[2], str)):
            raise CheckpointFormatError(f"unknown persistent reference {pid!r:.80}")
        key, kind = pid[2], pid[1]
        if key not in self._storages:
            # A storage type outside the allow-list (a quantized tensor's) is kept without a dtype: the tensor
            # built on it is Opaque, and only the legacy format, which needs its element size, refuses it.
            dtype = kind.dtype if isinstance(kind, _StorageType) else None
            unknown = "" if isinstance(kind, _StorageType) else getattr(kind, "qualname", repr(kind))
            self._storages[key] = _Storage(key, dtype, self._read_storage, unknown)
        dtype = self._storages[key].dtype
        view = pid[5] if len(pid) > 5 else None
        if view is None:
            return self._storages[key]
        # Legacy files of old torch: a storage that is a slice of another, (view key, element offset, size).
        view_key, offset, size = view
        base = self._storages[key]
        self._storages.setdefault(view_key, _Storage(view_key, dtype, lambda _: base.elements(
            np.dtype(np.uint8))[offset * dtype.itemsize:(offset + size) * dtype.itemsize], root=key))
        return self._storages[view_key]


def _map_tensors(obj, function: Callable[[_Tensor], Any], depth: int = 0):
    """obj with ``function`` of each tensor reference in its place (dicts, lists and tuples walked)."""
    if depth > 64:
        raise CheckpointFormatError("nested more than 64 levels deep")
    if isinstance(obj, _Tensor):
        return function(obj)
    if isinstance(obj, dict):  # Unpickled dicts are dicts or OrderedDicts: any other class is Opaque.
        return type(obj)((key, _map_tensors(value, function, depth + 1)) for key, value in obj.items())
    if isinstance(obj, (list, tuple)):
        return type(obj)(_map_tensors(value, function, depth + 1) for value in obj)
    return obj


def _materialise(obj, byteorder: str):
    """obj with every tensor reference replaced by its array."""
    return _map_tensors(obj, lambda tensor: tensor.array(byteorder))


def _storage_roots(obj) -> set:
    """The keys of the stored buffers that obj's tensors read."""
    roots = set()
    _map_tensors(obj, lambda tensor: roots.add(tensor.storage.root))
    return roots


def _is_module(obj) -> bool:
    """Whether obj is a whole torch.nn.Module as torch.save(model) pickles it (its attributes as state)."""
    return (isinstance(obj, Opaque) and isinstance(obj.state, dict)
            and {"_parameters", "_buffers", "_modules"} <= obj.state.keys())


def _module_state_dict(module, prefix: str = "", out=None, depth: int = 0) -> dict:
    """What module.state_dict() gives for a pickled module: each module's parameters, then its buffers but
    those it keeps out of its state (``_non_persistent_buffers_set``), then its children's, prefixed."""
    if depth > 64:
        raise CheckpointFormatError("modules nested more than 64 levels deep")
    out = collections.OrderedDict() if out is None else out
    state = module.state
    left_out = state.get("_non_persistent_buffers_set") or ()
    for name, value in list(state["_parameters"].items()) + list(state["_buffers"].items()):
        if value is not None and name not in left_out:
            out[prefix + name] = value
    for name, child in state["_modules"].items():
        if child is not None:
            if not _is_module(child):
                raise CheckpointFormatError(f"submodule {prefix + name} is a {getattr(child, 'qualname', child)!r:.60}")
            _module_state_dict(child, f"{prefix}{name}.", out, depth + 1)
    return out


def _unwrapped(obj, unwrap: Sequence[str]):
    """obj after ``load``'s unwrap keys, a whole model as its state dict."""
    for key in unwrap:
        if isinstance(obj, dict) and (isinstance(obj.get(key), dict) or _is_module(obj.get(key))):
            obj = obj[key]
    return _module_state_dict(obj) if _is_module(obj) else obj


def _load_zip(path: str, unwrap: Sequence[str]):
    with zipfile.ZipFile(path) as archive:
        pickles = [name for name in archive.namelist() if name.endswith("data.pkl") and name.count("/") == 1]
        if len(pickles) != 1:
            raise CheckpointFormatError("a zip file without one <folder>/data.pkl (not written by torch.save)")
        prefix = pickles[0][: -len("data.pkl")]
        byteorder = "little"
        if f"{prefix}byteorder" in archive.namelist():
            byteorder = archive.read(f"{prefix}byteorder").decode("ascii", "replace").strip()
            if byteorder not in ("little", "big"):
                raise CheckpointFormatError(f"byte order {byteorder!r}")
        cache: Dict[str, np.ndarray] = {}

        def read_storage(key: str) -> np.ndarray:
            if key not in cache:
                try:
                    cache[key] = np.frombuffer(archive.read(f"{prefix}data/{key}"), np.uint8)
                except KeyError:
                    raise CheckpointFormatError(f"storage {key} is missing from the archive") from None
            return cache[key]

        with archive.open(pickles[0]) as file:
            obj = _Unpickler(file, read_storage, {}).load()
        return _materialise(_unwrapped(obj, unwrap), byteorder)


def _load_legacy(path: str, unwrap: Sequence[str]):
    with open(path, "rb") as file:
        end = file.seek(0, 2)
        file.seek(0)
        header = []
        for expected in (_LEGACY_MAGIC, 1001, dict):
            header.append(_Unpickler(file, None, {}).load())
            if not (isinstance(header[-1], expected) if expected is dict else header[-1] == expected):
                raise CheckpointFormatError("a pickle that torch.save did not write")
        byteorder = "little" if header[2].get("little_endian", True) else "big"
        data: Dict[str, np.ndarray] = {}
        storages: Dict[str, _Storage] = {}

        def read_storage(key: str) -> np.ndarray:
            if key not in data:
                raise CheckpointFormatError(f"storage {key} has no data")
            return data[key]

        obj = _unwrapped(_Unpickler(file, read_storage, storages).load(), unwrap)
        keys = _Unpickler(file, None, {}).load()
        if not isinstance(keys, list) or any(key not in storages for key in keys):
            raise CheckpointFormatError("its list of storages does not match its pickle")
        needed = _storage_roots(obj)
        for key in keys:
            count_bytes = file.read(8)
            if len(count_bytes) < 8:
                raise CheckpointFormatError(f"the file ends before storage {key}")
            (count,) = struct.unpack("<q" if byteorder == "little" else ">q", count_bytes)
            if storages[key].unknown:  # Its element size, and so where the next storage starts, is unknown.
                raise CheckpointFormatError(f"storage {key} is a {storages[key].unknown}, which is not read")
            if count < 0:
                raise CheckpointFormatError(f"storage {key} has {count} elements")
            dtype = storages[key].dtype
            size = count * (1 if dtype is None else dtype.itemsize)  # An untyped storage counts bytes.
            if size > end - file.tell():
                raise CheckpointFormatError(f"the file ends inside storage {key}")
            if key not in needed:  # Left out by unwrap: skipped, not read.
                file.seek(size, 1)
                continue
            raw = file.read(size)
            data[key] = np.frombuffer(raw, np.uint8)
        return _materialise(obj, byteorder)


def load(path, unwrap: Sequence[str] = ()) -> Any:
    """The object a torch.save file holds, with numpy arrays for its dense tensors. ``unwrap``: keys taken in
    turn where the object is a dict whose value there is a dict or a model (('model', 'state_dict') takes the
    state dict out of a training checkpoint); only what is left is copied out of the file, not, say, an
    optimiser's moments beside it. A whole model (torch.save(model)) comes back as its state dict, read from
    the attributes its pickle gives it: its class, which the file names, is neither imported nor run. Raises
    CheckpointFormatError (one line) for a file that torch.save did not write or that is cut short."""
    path = str(path)
    try:
        with open(path, "rb") as file:
            start = file.read(4)
        if start == b"PK\x03\x04":  # A zip archive's first entry: torch >= 1.6.
            if not zipfile.is_zipfile(path):
                raise CheckpointFormatError("a zip archive without its directory: cut short or damaged")
            return _load_zip(path, unwrap)
        if tarfile.is_tarfile(path):
            raise CheckpointFormatError("a tar archive, the format of torch's first releases (load it and save it "
                                        "again with a newer torch)")
        return _load_legacy(path, unwrap)
    except CheckpointFormatError:
        raise
    except Exception as error:  # Damaged or crafted bytes fail in many ways (pickle, zipfile, numpy): all are the file's.
        reason = " ".join(str(error).split())[:120]  # One line, whatever the file put in the message.
        raise CheckpointFormatError(f"{type(error).__name__}: {reason}".rstrip(": ")) from None
