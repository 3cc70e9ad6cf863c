"""save_layout_first writes torch.save's archive with each CPU storage's bytes where O_DIRECT writes them from their
memory, and torch.load gives back the same tensors and sharing."""

import errno
import io

import pytest
import torch

from ds_fastckpt import AioFileWriter, open_fds_under
from ds_fastckpt.native import layout_save
from ds_fastckpt.native.fault_injection import inject_fault
from ds_fastckpt.native.file_part import FilePart
from ds_fastckpt.native.layout_save import (Layout, LayoutMismatchError, SnapshotTooLargeError, lay_out,
                                            layout_first_supported, save_layout_first)
from ds_fastckpt.native.op_builder import FastCkptBuilder
from ds_fastckpt.native.writer import torch_zip_crc32
from tests.zip_records import assert_same_records, records

pytestmark = pytest.mark.skipif(not FastCkptBuilder().is_compatible(),
                                reason="the native op needs libaio (apt-get install libaio-dev)")

# 64 KiB staging halves: a megabyte tensor crosses many of them.
HALF = 64 << 10
SMALL = dict(io_buffer_size=HALF, block_size=4096, queue_depth=2)

# Every dtype torch.save can write, by name; those missing from this torch are left out.
DTYPE_NAMES = [
    "float32", "float64", "float16", "bfloat16", "complex32", "complex64", "complex128", "float8_e4m3fn",
    "float8_e4m3fnuz", "float8_e5m2", "float8_e5m2fnuz", "float8_e8m0fnu", "float4_e2m1fn_x2", "int8", "int16",
    "int32", "int64", "uint8", "uint16", "uint32", "uint64", "bool", "bits8", "bits16", "bits1x8", "bits2x4",
    "bits4x2"
]
DTYPES = [getattr(torch, name) for name in DTYPE_NAMES if hasattr(torch, name)]
# Quantized dtypes need a quantizer; torch.save refuses the sub-byte int1..int7 and uint1..uint7.
QUANTIZED_PREFIXES = ("qint", "quint")
SUB_BYTE = {f"{kind}{bits}" for kind in ("int", "uint") for bits in range(1, 8)}


@pytest.fixture(autouse=True)
def torch_crc32_off():
    """The layout-first path needs torch's zip CRC32 off (the engine's default); the CRC test turns it back on."""
    with torch_zip_crc32(False):
        assert layout_first_supported()
        yield


@pytest.fixture
def storage_alignment_4096():
    config = torch.utils.serialization.config.save
    before = config.storage_alignment
    config.storage_alignment = 4096
    yield
    config.storage_alignment = before


def torch_save_bytes(obj) -> bytes:
    buffer = io.BytesIO()
    torch.save(obj, buffer)
    return buffer.getvalue()


def layout_save_file(obj, path, **kwargs) -> None:
    with AioFileWriter(path, **{**SMALL, **kwargs}) as writer:
        save_layout_first(obj, writer)


def random_tensor(dtype, shape, generator) -> torch.Tensor:
    """Random bits of any dtype (bool gets only valid 0/1 bytes)."""
    count = 1
    for size in shape:
        count *= size
    itemsize = torch.empty(0, dtype=dtype).element_size()
    raw = torch.randint(0, 256, (count * itemsize,), dtype=torch.uint8, generator=generator)
    if dtype == torch.bool:
        raw %= 2
    return raw.view(dtype).reshape(shape)


def storage_bytes(storage) -> bytes:
    untyped = storage._untyped_storage if isinstance(storage, torch.TypedStorage) else storage
    return torch.empty(0, dtype=torch.uint8).set_(untyped).numpy().tobytes()


def storage_key(value) -> int:
    if isinstance(value, torch.Tensor):
        return value.untyped_storage()._cdata
    if isinstance(value, torch.TypedStorage):
        return value._untyped_storage._cdata
    return value._cdata


def assert_same_object(expected, loaded, where="obj", storages=None):
    """Same structure, python values, tensor metadata and bits; pairs of (expected, loaded) storages collected."""
    storages = [] if storages is None else storages
    if isinstance(expected, torch.Tensor):
        assert type(loaded) is type(expected), where
        assert loaded.dtype == expected.dtype, where
        assert loaded.shape == expected.shape, where
        assert loaded.stride() == expected.stride(), where
        assert loaded.storage_offset() == expected.storage_offset(), where
        assert loaded.requires_grad == expected.requires_grad, where
        assert storage_bytes(loaded.untyped_storage()) == storage_bytes(expected.untyped_storage()), where
        storages.append((where, expected, loaded))
    elif isinstance(expected, torch.TypedStorage):
        assert isinstance(loaded, torch.TypedStorage), where
        assert loaded.dtype == expected.dtype and loaded.size() == expected.size(), where
        assert storage_bytes(loaded) == storage_bytes(expected), where
        storages.append((where, expected, loaded))
    elif isinstance(expected, torch.UntypedStorage):
        # torch.load gives a bare untyped storage back as a uint8 TypedStorage
        assert isinstance(loaded, (torch.UntypedStorage, torch.TypedStorage)), where
        assert storage_bytes(loaded) == storage_bytes(expected), where
        storages.append((where, expected, loaded))
    elif isinstance(expected, dict):
        assert type(loaded) is type(expected) and list(loaded) == list(expected), where
        for key in expected:
            assert_same_object(expected[key], loaded[key], f"{where}[{key!r}]", storages)
    elif isinstance(expected, (list, tuple)):
        assert type(loaded) is type(expected) and len(loaded) == len(expected), where
        for index, (item, loaded_item) in enumerate(zip(expected, loaded)):
            assert_same_object(item, loaded_item, f"{where}[{index}]", storages)
    else:
        assert type(loaded) is type(expected) and loaded == expected, where
    return storages


def assert_loads_like(path, obj) -> None:
    """torch.load gives back ``obj``: values, metadata, and which tensors share a storage."""
    loaded = torch.load(path, weights_only=True)
    pairs = assert_same_object(obj, loaded)
    for where_a, expected_a, loaded_a in pairs:
        for where_b, expected_b, loaded_b in pairs:
            shared_before = storage_key(expected_a) == storage_key(expected_b)
            shared_after = storage_key(loaded_a) == storage_key(loaded_b)
            assert shared_before == shared_after, f"{where_a} and {where_b}: shared {shared_before} -> {shared_after}"


def dtype_object(dtype):
    generator = torch.Generator().manual_seed(1)
    full = random_tensor(dtype, (5, 7), generator)
    return {"full": full, "transposed": full.t(), "slice": full[1:, ::2], "zero_dim": full[2, 3],
            "other": random_tensor(dtype, (3, ), generator)}


def views_and_slices():
    base = torch.randn(64, 33, generator=torch.Generator().manual_seed(2))
    return {"base": base, "columns": base[:, 3:9], "row": base[5], "strided": base[::3, ::2],
            "flat_slice": base.view(-1)[100:200], "reshaped": base.view(33, 64)}


def non_contiguous():
    generator = torch.Generator().manual_seed(3)
    return {"permuted": torch.randn(4, 5, 6, generator=generator).permute(2, 0, 1),
            "transposed": torch.randn(9, 4, generator=generator).t(),
            "expanded": torch.randn(3, 1, generator=generator).expand(3, 8)}


def shared_across_entries():
    shared = torch.arange(10, dtype=torch.float32)
    return {"x": shared, "nested": {"same": shared}, "list": [shared[2:5], shared.view(2, 5)], "again": shared,
            "own": torch.ones(4)}


def offset_views_only():
    base = torch.randn(100, generator=torch.Generator().manual_seed(4))
    other = torch.arange(50, dtype=torch.int64)
    return {"tail": base[60:], "middle": base[10:20], "other_tail": other[49:], "other_step": other[1::7]}


def empty_tensors():
    return {"empty": torch.empty(0), "zero_by_n": torch.empty(0, 7), "n_by_zero": torch.zeros(7, 0, dtype=torch.int64),
            "between": torch.arange(3.0), "empty_view_of_data": torch.arange(10.0)[3:3], "last": torch.empty(0, 0)}


def scalars():
    return {"float": torch.tensor(3.5), "int": torch.tensor(7, dtype=torch.int64), "bool": torch.tensor(True),
            "half": torch.tensor(-2.0, dtype=torch.float16), "element_of": torch.arange(6.0)[4]}


def untyped_storage():
    return torch.arange(10, dtype=torch.int32).untyped_storage()


def typed_storage():
    tensor = torch.arange(6, dtype=torch.float64)
    return {"storage": tensor.storage(), "tensor": tensor, "alone": torch.arange(5, dtype=torch.int16).storage()}


def nested_python():
    return {"step": 12345, "lr": 1e-4, "name": "global_step12345", "none": None, "flag": True, "raw": b"\x00\xff",
            "list": [1, (2, 3.5, "x"), {"deep": [None, {"tensor": torch.arange(4)}]}],
            "tuple": (torch.ones(2), "after", (None, )), "ints": {1: "one", 2: [torch.zeros(3, dtype=torch.int8)]}}


def parameters():
    generator = torch.Generator().manual_seed(5)
    weight = torch.nn.Parameter(torch.randn(4, 3, generator=generator))
    return {"weight": weight, "frozen": torch.nn.Parameter(torch.randn(3, generator=generator), requires_grad=False),
            "leaf_requiring_grad": torch.randn(2, 2, generator=generator).requires_grad_(),
            "state": {"exp_avg": torch.zeros_like(weight.detach())}}


def large_tensor():
    generator = torch.Generator().manual_seed(6)
    return {"large": torch.randn((1 << 20) + 3, generator=generator), "small": torch.arange(5),
            "odd_sized": torch.randint(0, 256, (3 * HALF + 1, ), dtype=torch.uint8, generator=generator)}


def many_tensors():
    # More than ten storages: torch names their records data/0 ... data/N in the order it meets them.
    generator = torch.Generator().manual_seed(7)
    return {f"p{index}": torch.randn(index % 7 + 1, generator=generator) for index in range(40)}


def no_tensors():
    return {"step": 3, "name": "x", "lr": 1e-3, "nested": [None, (1, 2)], "empty": {}}


OBJECTS = {
    "views_and_slices": views_and_slices,
    "non_contiguous": non_contiguous,
    "shared_across_entries": shared_across_entries,
    "offset_views_only": offset_views_only,
    "empty_tensors": empty_tensors,
    "scalars": scalars,
    "untyped_storage": untyped_storage,
    "typed_storage": typed_storage,
    "nested_python": nested_python,
    "parameters": parameters,
    "large_tensor": large_tensor,
    "many_tensors": many_tensors,
    "no_tensors": no_tensors,
    "empty_dict": dict,
    "lone_tensor": lambda: torch.arange(12.0).view(3, 4),
    "lone_empty_tensor": lambda: torch.empty(0),
}


def test_dtype_list_covers_every_dtype_torch_saves():
    every = {value for value in vars(torch).values() if isinstance(value, torch.dtype)}
    missing = []
    for dtype in every - set(DTYPES):
        name = str(dtype).removeprefix("torch.")
        if name.startswith(QUANTIZED_PREFIXES) or name in SUB_BYTE:
            continue
        missing.append(str(dtype))
    assert missing == [], "add these dtypes to DTYPE_NAMES"
    assert {torch.float32, torch.bfloat16, torch.float8_e4m3fn, torch.float8_e5m2, torch.uint16, torch.complex128,
            torch.bool} <= set(DTYPES)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_every_dtype_has_torch_save_s_records_and_loads_back(ext4_dir, dtype):
    obj = dtype_object(dtype)
    path = ext4_dir / "dtype.pt"
    layout_save_file(obj, path)
    assert_same_records(path.read_bytes(), torch_save_bytes(obj))
    assert_loads_like(path, obj)


@pytest.mark.parametrize("name", OBJECTS)
def test_object_has_torch_save_s_records_and_loads_back(ext4_dir, name):
    obj = OBJECTS[name]()
    path = ext4_dir / f"{name}.pt"
    layout_save_file(obj, path)
    assert_same_records(path.read_bytes(), torch_save_bytes(obj))
    assert_loads_like(path, obj)


def test_default_staging_size_has_torch_save_s_records(ext4_dir):
    obj = {**large_tensor(), **views_and_slices(), **nested_python()}
    path = ext4_dir / "default.pt"
    with AioFileWriter(path) as writer:
        save_layout_first(obj, writer)
    assert_same_records(path.read_bytes(), torch_save_bytes(obj))
    assert_loads_like(path, obj)


def test_views_still_share_one_storage_after_load(ext4_dir):
    base = torch.arange(20.0)
    path = ext4_dir / "views.pt"
    layout_save_file({"base": base, "head": base[:5], "tail": base[15:]}, path)
    loaded = torch.load(path, weights_only=True)
    loaded["base"][0] = -1.0
    loaded["base"][19] = -2.0
    assert loaded["head"][0] == -1.0 and loaded["tail"][4] == -2.0


@pytest.mark.parametrize("name", ["views_and_slices", "empty_tensors", "large_tensor", "many_tensors", "scalars",
                                  "no_tensors", "typed_storage"])
def test_storage_alignment_4096_keeps_torch_s_alignment(ext4_dir, storage_alignment_4096, name):
    obj = OBJECTS[name]()
    path = ext4_dir / f"{name}.pt"
    layout_save_file(obj, path)
    expected = torch_save_bytes(obj)
    assert b"4096" in expected  # torch records the alignment it used
    written = path.read_bytes()
    assert_same_records(written, expected)
    assert all(start % 4096 == 0 for name, (start, data) in records(written).items() if "/data/" in name and data)
    assert_loads_like(path, obj)


def test_snapshot_keeps_the_values_at_snapshot_time(ext4_dir):
    base = torch.arange(1000, dtype=torch.float32)
    obj = {"base": base, "view": base[10:20], "other": torch.ones(3, 3, dtype=torch.int64),
           "storage": torch.arange(4, dtype=torch.int16).untyped_storage(), "empty": torch.empty(0)}
    before_bytes = torch_save_bytes(obj)
    before = {"base": base.clone(), "other": obj["other"].clone()}
    layout = lay_out(obj)
    snapshot = layout.snapshot()
    assert isinstance(snapshot, Layout)
    assert snapshot.storage_bytes == layout.storage_bytes == 1000 * 4 + 9 * 8 + 4 * 2

    base.add_(1.0)
    obj["other"].fill_(-5)
    torch.empty(0, dtype=torch.uint8).set_(obj["storage"]).fill_(0xAB)

    snapshot_path = ext4_dir / "snapshot.pt"
    with AioFileWriter(snapshot_path, **SMALL) as writer:
        snapshot.write_to(writer)
    assert snapshot_path.read_bytes() == before_bytes
    loaded = torch.load(snapshot_path, weights_only=True)
    assert torch.equal(loaded["base"], before["base"])
    assert torch.equal(loaded["view"], before["base"][10:20])
    assert torch.equal(loaded["other"], before["other"])
    assert loaded["view"].untyped_storage()._cdata == loaded["base"].untyped_storage()._cdata
    assert loaded["view"].storage_offset() == 10

    live_path = ext4_dir / "live.pt"  # the layout itself reads the tensors as they are now
    with AioFileWriter(live_path, **SMALL) as writer:
        layout.write_to(writer)
    assert_same_records(live_path.read_bytes(), torch_save_bytes(obj))
    assert torch.equal(torch.load(live_path, weights_only=True)["base"], base)


def big_storages():
    """Storages over the 64 KiB a write_in_place copies below, of odd sizes, at torch's 64-byte alignment."""
    generator = torch.Generator().manual_seed(3)
    return {"w": torch.randn(1 << 20, generator=generator), "odd": torch.randn(70001, generator=generator).half(),
            "small": torch.arange(7), "i": torch.randint(0, 9, (300001,), generator=generator)}


def in_place_ceiling(obj) -> int:
    """The bytes O_DIRECT can take from the storages' memory: all but the unaligned edges of each over 64 KiB."""
    sizes = [value.untyped_storage().nbytes() for value in obj.values()]
    return sum(size for size in sizes if size >= (64 << 10) + 4096)


@pytest.mark.parametrize("copied", [False, True], ids=["live", "snapshot"])
def test_cpu_storages_go_to_disk_from_their_own_memory(ext4_dir, copied):
    obj = big_storages()
    layout = lay_out(obj)
    path = ext4_dir / "in_place.pt"
    with AioFileWriter(path) as writer:
        assert writer.memory_alignment in (1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024, 2048, 4096)
        (layout.snapshot() if copied else layout).write_to(writer)
    ceiling = in_place_ceiling(obj)
    # Each storage gives up at most its two partial blocks to staging.
    assert ceiling - 3 * 2 * 4096 <= writer.bytes_in_place <= ceiling
    assert_loads_like(path, obj)
    written, expected = path.read_bytes(), torch_save_bytes(obj)
    assert_same_records(written, expected)
    if copied:  # each copy lies where torch.save's offset needs it: nothing moved
        assert written == expected
    for name, (start, data) in records(written).items():
        if "/data/" in name and len(data) >= 64 << 10:
            key = int(name.rpartition("/")[2])
            storage = list(obj.values())[key].untyped_storage()
            assert copied or (start - storage.data_ptr()) % writer.memory_alignment == 0, name


def test_a_write_from_memory_that_fails_keeps_errno_and_path_and_no_fd(tmp_path):
    obj = big_storages()
    path = tmp_path / "failed.pt"
    with inject_fault("write", errno.ENOSPC, skip=3):
        with pytest.raises(OSError) as raised:
            with AioFileWriter(path, **SMALL) as writer:
                save_layout_first(obj, writer)
    assert raised.value.errno == errno.ENOSPC and raised.value.filename == str(path)
    assert writer.closed
    assert open_fds_under(tmp_path) == []


def test_snapshot_over_its_limit_is_refused(ext4_dir):
    layout = lay_out({"a": torch.zeros(100), "b": torch.zeros(28)})
    with pytest.raises(SnapshotTooLargeError, match="512 bytes exceeds the limit of 511 bytes"):
        layout.snapshot(limit_bytes=511)
    assert layout.snapshot(limit_bytes=512).storage_bytes == 512


def _mismatched_orders():
    return {
        "reversed": lambda found: list(reversed(found)),
        "first_missing": lambda found: found[1:],
        "middle_missing": lambda found: found[:1] + found[2:],
        "last_missing": lambda found: found[:-1],
        "one_extra": lambda found: found + [torch.zeros(7).untyped_storage()],
    }


@pytest.mark.parametrize("order", list(_mismatched_orders()))
def test_wrong_storage_order_raises_and_writes_nothing(tmp_path, monkeypatch, order):
    # Sizes all differ, so any wrong order gives torch a skip that is not the next storage's size.
    obj = {"a": torch.zeros(10), "b": torch.zeros(3, dtype=torch.int64), "c": torch.zeros(5, dtype=torch.int16)}
    found = layout_save.storages_in_save_order(obj)
    assert [storage.nbytes() for storage in found] == [40, 24, 10]
    reorder = _mismatched_orders()[order]
    monkeypatch.setattr(layout_save, "storages_in_save_order", lambda value: reorder(found))
    with pytest.raises(LayoutMismatchError):
        lay_out(obj)
    path = tmp_path / "mismatch.pt"
    writer = AioFileWriter(path, **SMALL)
    with pytest.raises(LayoutMismatchError):
        save_layout_first(obj, writer)
    assert writer.bytes_written == 0
    writer.close()
    assert path.read_bytes() == b""


def test_torch_crc32_on_falls_back_to_torch_save(ext4_dir):
    obj = {**views_and_slices(), **empty_tensors(), "large": large_tensor()["large"]}
    crc_off_bytes = torch_save_bytes(obj)
    path = ext4_dir / "crc.pt"
    with torch_zip_crc32(True):
        assert not layout_first_supported()
        layout_save_file(obj, path)
        expected = torch_save_bytes(obj)
    assert expected != crc_off_bytes  # the CRC fields are filled in
    assert path.read_bytes() == expected
    assert_loads_like(path, obj)


@pytest.mark.parametrize("size", [100, (1 << 20) + 3], ids=["within_one_half", "many_halves"])
def test_write_error_is_an_os_error_with_errno_and_path(tmp_path, size):
    obj = {"w": torch.randn(size), "view": torch.arange(10)[2:]}
    path = tmp_path / "failed.pt"
    with inject_fault("write", errno.EIO):
        with pytest.raises(OSError) as raised:
            with AioFileWriter(path, **SMALL) as writer:
                save_layout_first(obj, writer)
    assert raised.value.errno == errno.EIO
    assert raised.value.filename == str(path)
    assert writer.closed
    assert open_fds_under(tmp_path) == []


def model_states(width: int = 700):
    """A DeepSpeed model-states dict: parameters, a batch-norm buffer, and rank-specific client state."""
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(33, width), torch.nn.BatchNorm1d(width), torch.nn.Linear(width, 9))
    return {"module": model.state_dict(), "buffer_names": ["1.running_mean", "1.running_var",
                                                           "1.num_batches_tracked"],
            "client_rng": torch.arange(5000), "global_steps": 3}


def test_parameter_storages_are_the_module_parameters_in_save_order():
    state = model_states()
    module = state["module"]
    expected = [module[name].untyped_storage() for name in ("0.weight", "0.bias", "1.weight", "1.bias",
                                                           "2.weight", "2.bias")]
    assert [storage.data_ptr() for storage in layout_save.parameter_storages(state)] == \
        [storage.data_ptr() for storage in expected]
    assert layout_save.parameter_storages({"module": None}) == []
    assert layout_save.parameter_storages([1, 2]) == []


@pytest.mark.parametrize("writers", [1, 2, 3])
def test_parts_written_by_several_writers_make_torch_save_s_file(ext4_dir, writers):
    """The leader's part of its layout and the others' parts of copies of the parameters: torch.save's bytes."""
    from ds_fastckpt.decisions.shares import split_shares

    state = model_states()
    layout = lay_out(state)
    parameters = layout_save.parameter_storages(state)
    ranges = layout.storage_ranges(parameters)
    shares = split_shares(layout.file_size, ranges, writers)
    copies = [storage.clone() for storage in parameters]  # another rank's identical parameters
    parts = [layout.part_without(sorted(span for share in shares[1:] for span in share))]
    parts += [FilePart.of_storages(copies, [start for start, _ in ranges], share, layout.file_size)
              for share in shares[1:]]
    path = ext4_dir / "shared.pt"
    with open(path, "wb") as file:
        file.truncate(layout.file_size)
    for part in parts:
        with AioFileWriter(path, shared=True, **SMALL) as writer:
            part.snapshot().write_to(writer)
    assert path.read_bytes() == torch_save_bytes(state)
    assert sum(part.storage_bytes for part in parts[1:]) == sum(end - start for share in shares[1:]
                                                                for start, end in share)


def test_a_range_outside_one_storage_is_refused():
    storages = [torch.zeros(8192, dtype=torch.uint8).untyped_storage()]
    assert FilePart.of_storages(storages, [4096], [(4096, 12288)], 20000).storage_bytes == 8192
    for outside in [(4096, 16384), (0, 4096)]:
        with pytest.raises(ValueError, match=f"bytes {outside[0]}-{outside[1]} of the file are not inside one "
                           "storage"):
            FilePart.of_storages(storages, [4096], [outside], 20000)
