"""torch.save files read without torch (amvlm_jax.torch_pickle), against torch.load on the same files."""

import argparse
import collections
import io
import os
import pickle
import struct
import sys
import time
import warnings
import zipfile

import numpy as np
import pytest

from amvlm_jax import torch_pickle, weights
from amvlm_jax.weights import WeightError

torch = pytest.importorskip("torch", reason="torch writes the files and is the reference reader")

# numpy has no such types, or compares them by value: compared by their bits.
_BITS = {torch.bfloat16: (torch.int16, np.int16), torch.float8_e4m3fn: (torch.int8, np.int8),
         torch.uint16: (torch.int16, np.int16)}


def _tensor_zoo(with_new_dtypes: bool) -> dict:
    """A module's state dict (OrderedDict with _metadata, a BatchNorm's int64 counter) and tensors that share
    storages at offsets and strides (transpose, slice, expand: stride 0), a 0-d and an empty tensor, a
    Parameter, and every dtype a checkpoint holds."""
    torch.manual_seed(0)
    state = torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.BatchNorm1d(4), torch.nn.Embedding(5, 3)).state_dict()
    base = torch.arange(24, dtype=torch.float32).reshape(4, 6)
    state.update({
        "base": base, "transposed": base.t(), "slice": base[1:, 2:5], "expanded": torch.randn(3, 1).expand(3, 5),
        "scalar": torch.tensor(2.5), "empty": torch.zeros(0, 3), "parameter": torch.nn.Parameter(torch.randn(2, 2)),
        "bf16": torch.randn(5).to(torch.bfloat16), "f16": torch.randn(2, 3).half(), "f64": torch.randn(3).double(),
        "i8": torch.tensor([-3, 4], dtype=torch.int8), "u8": torch.tensor([200, 1], dtype=torch.uint8),
        "bool": torch.tensor([True, False]), "i32": torch.tensor([1, -2], dtype=torch.int32),
        "i16": torch.tensor([7, -7], dtype=torch.int16), "c64": torch.tensor([1 + 2j, -3j], dtype=torch.complex64),
    })
    if with_new_dtypes:  # Stored as untyped storages with the dtype beside them (torch's legacy format cannot).
        state["f8"] = torch.tensor([0.5, -2.0, 448.0]).to(torch.float8_e4m3fn)
        state["u16"] = torch.tensor([7, 9, 65535], dtype=torch.int32).to(torch.uint16)
    return state


def _assert_same(ours: np.ndarray, reference, name: str):
    reference = reference.detach()
    assert isinstance(ours, np.ndarray) and ours.shape == tuple(reference.shape), name
    if reference.dtype in _BITS:
        as_torch, as_numpy = _BITS[reference.dtype]
        assert str(ours.dtype) == str(reference.dtype).removeprefix("torch."), name
        np.testing.assert_array_equal(ours.view(as_numpy), reference.view(as_torch).numpy(), err_msg=name)
    else:
        assert ours.dtype == reference.numpy().dtype, name
        np.testing.assert_array_equal(ours, reference.numpy(), err_msg=name)
    assert ours.flags.c_contiguous and ours.flags.owndata, name


@pytest.mark.parametrize("legacy", [False, True], ids=["zip", "legacy"])
def test_a_checkpoint_reads_as_torch_load_reads_it(legacy, tmp_path, monkeypatch):
    state = _tensor_zoo(with_new_dtypes=not legacy)
    checkpoint = {"model": state, "epoch": 3, "args": argparse.Namespace(lr=0.1), "best": np.float64(0.5)}
    path = tmp_path / "checkpoint.pth"
    torch.save(checkpoint, path, _use_new_zipfile_serialization=not legacy)
    reference = torch.load(path, weights_only=False)
    monkeypatch.setitem(sys.modules, "torch", None)  # `import torch` fails, as where only the project is installed.
    loaded = torch_pickle.load(path)
    assert set(loaded) == {"model", "epoch", "args", "best"} and loaded["epoch"] == 3
    assert isinstance(loaded["args"], torch_pickle.Opaque) and loaded["args"].qualname == "argparse.Namespace"
    assert list(loaded["model"]) == list(reference["model"])
    for name, tensor in reference["model"].items():
        _assert_same(loaded["model"][name], tensor, name)
    # weights.read_state_dict: the wrapper unwrapped, floating tensors as float32 (bfloat16 and float8 too).
    tensors = weights.read_state_dict(path)
    assert list(tensors) == list(reference["model"])
    for name, tensor in reference["model"].items():
        if tensor.is_floating_point():
            assert tensors[name].dtype == np.float32
            np.testing.assert_array_equal(tensors[name], tensor.detach().float().numpy(), err_msg=name)
        else:
            _assert_same(tensors[name], tensor, name)


class _Block(torch.nn.Module):
    """A module with a parameter-free child slot, a buffer kept out of its state and one kept in it."""

    def __init__(self):
        super().__init__()
        self.linear = torch.nn.Linear(3, 3, bias=False)
        self.register_buffer("scratch", torch.ones(2), persistent=False)
        self.register_buffer("kept", torch.arange(3.0))
        self.absent = None


@pytest.mark.parametrize("legacy", [False, True], ids=["zip", "legacy"])
def test_a_whole_model_saved_reads_as_its_state_dict(legacy, tmp_path, monkeypatch):
    """torch.save(model) pickles the model's class by name and its attributes: read without importing or running
    the class (torch blocked here), the attributes give model.state_dict(), names, order and values, a
    DataParallel wrapper's 'module.' prefix and a BatchNorm's buffers included, a non-persistent buffer and an
    absent bias left out; a model under a checkpoint's 'model' key too."""
    torch.manual_seed(0)
    model = torch.nn.DataParallel(torch.nn.Sequential(torch.nn.Linear(2, 3), torch.nn.BatchNorm1d(3), _Block()))
    expected = model.state_dict()
    assert "module.2.scratch" not in expected and "module.2.linear.bias" not in expected
    whole, wrapped = tmp_path / "model.pth", tmp_path / "checkpoint.pth"
    torch.save(model, whole, _use_new_zipfile_serialization=not legacy)
    torch.save({"epoch": 1, "model": model}, wrapped, _use_new_zipfile_serialization=not legacy)
    monkeypatch.setitem(sys.modules, "torch", None)
    for path in (whole, wrapped):
        tensors = weights.read_state_dict(path)
        assert list(tensors) == list(expected), path
        for name, tensor in expected.items():
            _assert_same(tensors[name], tensor, name)


class _CountingFile:
    """A file whose read calls count the bytes they return (peek, seek and the rest pass through)."""

    def __init__(self, file, counts):
        self._file, self._counts = file, counts

    def read(self, *size):
        data = self._file.read(*size)
        self._counts.append(len(data))
        return data

    def __getattr__(self, name):
        return getattr(self._file, name)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self._file.close()


@pytest.mark.parametrize("legacy", [False, True], ids=["zip", "legacy"])
def test_only_the_unwrapped_state_dict_is_copied_out_of_the_file(legacy, tmp_path, monkeypatch):
    """A training checkpoint holds the optimiser's moments beside the model (two more copies of it, in MAE's and
    MoCo's .pth.tar files): weights.read_state_dict takes the model and reads none of the other storages (the
    legacy format's are skipped over)."""
    model = {"weight": torch.randn(4, 4), "bias": torch.randn(4)}
    moments = {"exp_avg": torch.randn(256, 256), "exp_avg_sq": torch.randn(256, 256)}
    path = tmp_path / "checkpoint_0099.pth.tar"
    torch.save({"epoch": 99, "model": model, "optimizer": {"state": {0: moments}}}, path,
               _use_new_zipfile_serialization=not legacy)
    read, entries = [], []
    real_read = zipfile.ZipFile.read
    monkeypatch.setattr(zipfile.ZipFile, "read", lambda self, name, *a: entries.append(name) or real_read(self, name, *a))
    monkeypatch.setattr(torch_pickle, "open", lambda *a: _CountingFile(open(*a), read), raising=False)
    tensors = weights.read_state_dict(path)
    assert list(tensors) == ["weight", "bias"]
    for name, tensor in model.items():
        np.testing.assert_array_equal(tensors[name], tensor.numpy())
    if legacy:
        assert sum(read) < 10_000 < 2 * 256 * 256 * 4 < path.stat().st_size
    else:
        assert sorted(name.rpartition("/")[2] for name in entries if "/data/" in name) == ["0", "1"]
    everything = torch_pickle.load(path)
    np.testing.assert_array_equal(everything["optimizer"]["state"][0]["exp_avg_sq"], moments["exp_avg_sq"].numpy())


def test_a_checkpoint_written_big_endian_reads_the_same_values(tmp_path):
    """The zip format's byteorder entry: the same archive with 'big' and every storage's elements byte-swapped
    (a complex number's two halves each) reads the values of the little-endian original."""
    state = {"f32": torch.randn(3, 2), "bf16": torch.randn(4).to(torch.bfloat16), "c64": torch.tensor([1 + 2j, 3 - 4j]),
             "i64": torch.tensor([1, -2**40])}
    little, big = tmp_path / "little.pt", tmp_path / "big.pt"
    torch.save(state, little)
    swap = {"0": 4, "1": 2, "2": 4, "3": 8}  # Storage keys in the order the tensors were saved; bytes per swap.
    with zipfile.ZipFile(little) as source, zipfile.ZipFile(big, "w") as target:
        for info in source.infolist():
            data = source.read(info)
            folder, _, key = info.filename.rpartition("/")
            if info.filename.endswith("/byteorder"):
                data = b"big"
            elif folder.endswith("/data") and key in swap:
                data = np.frombuffer(data, np.uint8).reshape(-1, swap[key])[:, ::-1].tobytes()
            target.writestr(info, data)
    assert zipfile.ZipFile(little).read("little/byteorder") == b"little"
    loaded = torch_pickle.load(big)
    for name, tensor in state.items():
        _assert_same(loaded[name], tensor, name)


@pytest.mark.parametrize("legacy", [False, True], ids=["zip", "legacy"])
def test_a_huggingface_pytorch_model_bin_loads_as_its_safetensors(legacy, tmp_path, monkeypatch):
    """MiniLM (a real BERT) saved as pytorch_model.bin, as transformers saved models before safetensors, in
    torch's zip or legacy format: the folder loads without torch to the parameters of the model.safetensors
    it was made from."""
    from transformers import BertModel

    directory = weights.default_text_encoder_dir()
    model = BertModel.from_pretrained(directory, local_files_only=True)
    torch.save(model.state_dict(), tmp_path / "pytorch_model.bin", _use_new_zipfile_serialization=not legacy)
    model.config.to_json_file(tmp_path / "config.json")
    assert sorted(os.listdir(tmp_path)) == ["config.json", "pytorch_model.bin"]
    monkeypatch.setitem(sys.modules, "torch", None)
    expected = weights.load_bert(directory)
    config, params = weights.load_bert(tmp_path)
    assert config == expected[0]
    flat, flat_expected = dict(weights._flatten(params)), dict(weights._flatten(expected[1]))
    assert flat.keys() == flat_expected.keys()
    for name, value in flat_expected.items():
        np.testing.assert_array_equal(flat[name], value, err_msg=str(name))


class _PersistentStorage:
    def __init__(self, pid):
        self.pid = pid


class _RebuiltTensor:
    def __init__(self, storage, offset, size, stride):
        self.arguments = (storage, offset, size, stride, False, collections.OrderedDict())

    def __reduce__(self):
        return torch._utils._rebuild_tensor_v2, self.arguments


class _LegacyPickler(pickle.Pickler):
    def persistent_id(self, obj):
        return obj.pid if isinstance(obj, _PersistentStorage) else None


def test_a_legacy_checkpoint_with_a_storage_view_reads_the_view(tmp_path):
    """Files of old torch could reference a storage as a slice of another, ('storage', type, root key, location,
    size, (view key, element offset, view size)): written here as such a file would be (torch 2 writes none),
    a tensor on the view (offset 1 in it, stride 2) and one on the root."""
    root = np.arange(10, dtype=np.float32)
    view = _PersistentStorage(("storage", torch.FloatStorage, "root", "cpu", 10, ("view", 3, 6)))
    whole = _PersistentStorage(("storage", torch.FloatStorage, "root", "cpu", 10, None))
    state = {"on_view": _RebuiltTensor(view, 1, (2, 2), (2, 1)), "on_root": _RebuiltTensor(whole, 0, (10,), (1,))}
    buffer = io.BytesIO()
    for value in (torch_pickle._LEGACY_MAGIC, 1001, {"little_endian": True}):
        pickle.dump(value, buffer, protocol=2)
    _LegacyPickler(buffer, protocol=2).dump(state)
    pickle.dump(["root"], buffer, protocol=2)
    buffer.write(struct.pack("<q", root.size) + root.tobytes())
    (tmp_path / "old.pth").write_bytes(buffer.getvalue())
    loaded = torch_pickle.load(tmp_path / "old.pth")
    np.testing.assert_array_equal(loaded["on_view"], [[4, 5], [6, 7]])  # The view starts at root element 3.
    np.testing.assert_array_equal(loaded["on_root"], root)
    torch_loaded = torch.load(tmp_path / "old.pth", weights_only=False)  # torch reads the view the same.
    np.testing.assert_array_equal(torch_loaded["on_view"].numpy(), loaded["on_view"])


class _RunsACommand:
    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return os.system, (f"touch {self.marker}",)


@pytest.mark.parametrize("legacy", [False, True], ids=["zip", "legacy"])
def test_a_pickle_that_would_run_a_command_runs_nothing(legacy, tmp_path):
    marker = tmp_path / "ran"
    payload = pickle.dumps({"model": {"weight": _RunsACommand(marker)}}, protocol=2)
    path = tmp_path / "crafted.pth"
    if legacy:
        header = b"".join(pickle.dumps(value, protocol=2)
                          for value in (torch_pickle._LEGACY_MAGIC, 1001, {"little_endian": True}))
        path.write_bytes(header + payload + pickle.dumps([], protocol=2))
    else:
        with zipfile.ZipFile(path, "w") as archive:
            archive.writestr("crafted/data.pkl", payload)
    loaded = torch_pickle.load(path)
    assert isinstance(loaded["model"]["weight"], torch_pickle.Opaque)
    assert loaded["model"]["weight"].qualname == f"{os.system.__module__}.system"
    assert not marker.exists()
    assert weights.read_state_dict(path) == {}  # No tensor in it.


def test_tensors_and_objects_it_does_not_read_are_one_line_errors(tmp_path):
    quantized = tmp_path / "quantized.pth"
    with warnings.catch_warnings():  # torch deprecates its quantized tensors.
        warnings.simplefilter("ignore")
        torch.save({"weight": torch.quantize_per_tensor(torch.ones(2), 0.1, 0, torch.qint8)}, quantized)
    with pytest.raises(WeightError) as info:
        weights.read_state_dict(quantized)
    assert str(info.value) == (f"{quantized}: weight is a tensor of a kind that is not read "
                               "(torch._utils._rebuild_qtensor; save it as a dense tensor)")
    tensors = tmp_path / "tensors.pth"
    torch.save([torch.ones(2), torch.zeros(2)], tensors)
    with pytest.raises(WeightError) as info:
        weights.read_state_dict(tensors)
    assert str(info.value) == f"{tensors}: not a state dict (it holds a list; save the model's state_dict())"


def test_broken_files_are_one_line_errors(tmp_path):
    good = tmp_path / "good.pth"
    torch.save({"weight": torch.randn(64, 64)}, good)
    legacy = tmp_path / "legacy.pth"
    torch.save({"weight": torch.randn(64, 64)}, legacy, _use_new_zipfile_serialization=False)
    cases = {
        "junk.pth": (b"not a pickle", "UnpicklingError"),
        "empty.bin": (b"", "EOFError"),
        "plain_pickle.pt": (pickle.dumps({"weight": [1.0]}, protocol=2), "torch.save did not write"),
        "cut_zip.pth": (good.read_bytes()[:3000], "a zip archive without its directory"),
        "cut_legacy.pth": (legacy.read_bytes()[:-100], "the file ends inside storage"),
    }
    without_storage = tmp_path / "without_storage.pth"
    with zipfile.ZipFile(good) as source, zipfile.ZipFile(without_storage, "w") as target:
        for info in source.infolist():
            if not info.filename.endswith("/data/0"):
                target.writestr(info, source.read(info))
    for name, (content, _) in cases.items():
        (tmp_path / name).write_bytes(content)
    cases["without_storage.pth"] = (None, "storage 0 is missing from the archive")
    for name, (_, reason) in cases.items():
        with pytest.raises(WeightError) as info:
            weights.read_state_dict(tmp_path / name)
        message = str(info.value)
        assert message.startswith(f"{tmp_path / name}: not a PyTorch checkpoint (") and reason in message, message
        assert "\n" not in message


def test_damaged_bytes_anywhere_are_a_one_line_error(tmp_path):
    """Seeded damage to a checkpoint in either format (bytes overwritten, the file cut short) ends in a one-line
    WeightError or loads: never another exception. A memo index the file names is no allocation: the index
    2**28, as one damaged byte made it, took the C unpickler a minute and 2 GiB."""
    state = torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.BatchNorm1d(4)).state_dict()
    rng = np.random.default_rng(0)
    path = tmp_path / "damaged.pth"
    for legacy in (False, True):
        buffer = io.BytesIO()
        torch.save({"model": state, "epoch": 2}, buffer, _use_new_zipfile_serialization=not legacy)
        original = np.frombuffer(buffer.getvalue(), np.uint8)
        for _ in range(150):
            damaged = original.copy()
            damaged[rng.integers(0, len(damaged), rng.choice([1, 4, 16]))] = rng.integers(0, 256)
            path.write_bytes(damaged[: rng.integers(1, len(damaged))].tobytes() if rng.random() < 0.1 else damaged.tobytes())
            try:
                weights.read_state_dict(path)
            except WeightError as error:
                assert "\n" not in str(error) and str(error).startswith(f"{path}: ")
    header = b"".join(pickle.dumps(value, protocol=2) for value in (torch_pickle._LEGACY_MAGIC, 1001))
    path.write_bytes(header + b"\x80\x02}r" + struct.pack("<I", 2**28) + b".")  # {} memoised at index 2**28.
    start = time.perf_counter()
    with pytest.raises(WeightError, match="not a PyTorch checkpoint"):
        weights.read_state_dict(path)
    assert time.perf_counter() - start < 5
