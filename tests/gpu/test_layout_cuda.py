"""Layout-first saves of CUDA tensors: torch.save's bytes, DMA through pinned memory, in stream order."""

import io

import pytest
import torch

from ds_fastckpt import AioFileWriter
from ds_fastckpt.native.device_copy import DeviceCopier
from ds_fastckpt.native.layout_save import lay_out, layout_first_supported, save_layout_first
from ds_fastckpt.native.writer import torch_zip_crc32

# GPU clock cycles torch.cuda._sleep spins for (~0.25 s at 2 GHz): long enough that a copy not ordered after the
# queued kernel would read the tensor before the kernel writes it.
SLEEP_CYCLES = 500_000_000


@pytest.fixture(autouse=True)
def torch_crc32_off():
    """The layout-first path needs torch's zip CRC32 off (the engine's default)."""
    with torch_zip_crc32(False):
        assert layout_first_supported()
        yield


@pytest.fixture
def device():
    return torch.device("cuda", torch.cuda.current_device())


def torch_save_bytes(obj) -> bytes:
    """What torch.save writes into a file object; CUDA storages are recorded with their location ('cuda:0')."""
    buffer = io.BytesIO()
    torch.save(obj, buffer)
    return buffer.getvalue()


def save_file(obj, path, device_copiers=None) -> None:
    with AioFileWriter(path) as writer:
        save_layout_first(obj, writer, device_copiers)


def storage_bytes(tensor: torch.Tensor) -> bytes:
    """Every byte of the tensor's whole storage, read back to the host (test code may copy)."""
    raw = torch.empty(0, dtype=torch.uint8, device=tensor.device).set_(tensor.untyped_storage())
    return raw.cpu().numpy().tobytes()


def leaves(obj, where="obj"):
    """(where, value) for every tensor and plain value in a nest of dicts, lists and tuples."""
    if isinstance(obj, dict):
        for key, value in obj.items():
            yield from leaves(value, f"{where}[{key!r}]")
    elif isinstance(obj, (list, tuple)):
        for index, value in enumerate(obj):
            yield from leaves(value, f"{where}[{index}]")
    else:
        yield where, obj


def tensors_of(obj):
    return [(where, value) for where, value in leaves(obj) if isinstance(value, torch.Tensor)]


def cuda_storage_count(obj) -> int:
    return len({tensor.untyped_storage()._cdata for _, tensor in tensors_of(obj) if tensor.is_cuda})


def assert_loads_on_cuda_bit_exact(path, obj) -> None:
    """torch.load(map_location="cuda") gives back every value, and every tensor's bits, metadata and storage
    sharing, on the GPU."""
    loaded = torch.load(path, map_location="cuda", weights_only=True)
    expected = list(leaves(obj))
    got = dict(leaves(loaded))
    assert [where for where, _ in expected] == list(got)
    for where, value in expected:
        back = got[where]
        if not isinstance(value, torch.Tensor):
            assert type(back) is type(value) and back == value, where
            continue
        assert isinstance(back, torch.Tensor) and back.device.type == "cuda", where
        assert (back.dtype, back.shape, back.stride(), back.storage_offset()) == (
            value.dtype, value.shape, value.stride(), value.storage_offset()), where
        assert storage_bytes(back) == storage_bytes(value), where
    pairs = [(where, value, got[where]) for where, value in tensors_of(obj)]
    for where_a, a, back_a in pairs:
        for where_b, b, back_b in pairs:
            shared_before = a.untyped_storage()._cdata == b.untyped_storage()._cdata
            shared_after = back_a.untyped_storage()._cdata == back_b.untyped_storage()._cdata
            assert shared_before == shared_after, f"{where_a} and {where_b}"


def bf16_weights(device):
    generator = torch.Generator(device=device).manual_seed(0)
    return {f"layer{i}.weight": torch.randn(97 * i + 5, 33, generator=generator, device=device).to(torch.bfloat16)
            for i in range(6)}


def adam_states(device):
    generator = torch.Generator(device=device).manual_seed(1)
    state = {}
    for index in range(4):
        shape = (257 * index + 3, 64)
        state[index] = {"exp_avg": torch.randn(shape, generator=generator, device=device),
                        "exp_avg_sq": torch.rand(shape, generator=generator, device=device),
                        "step": torch.tensor(float(index + 10), device=device)}
    master = [torch.randn(1000 + index, generator=generator, device=device) for index in range(3)]
    return {"state": state, "param_groups": [{"lr": 1e-4, "params": [0, 1, 2, 3]}], "fp32_master": master}


def views_of_one_tensor(device):
    base = torch.randn(64, 33, generator=torch.Generator(device=device).manual_seed(2), device=device)
    return {"base": base, "columns": base[:, 3:9], "row": base[5], "strided": base[::3, ::2],
            "flat_slice": base.view(-1)[100:200], "reshaped": base.view(33, 64), "transposed": base.t()}


def views_only(device):
    base = torch.randn(1000, generator=torch.Generator(device=device).manual_seed(3), device=device)
    return {"tail": base[600:], "middle": base[10:20]}


def non_contiguous(device):
    generator = torch.Generator(device=device).manual_seed(4)
    return {"permuted": torch.randn(4, 5, 6, generator=generator, device=device).permute(2, 0, 1),
            "transposed": torch.randn(9, 4, generator=generator, device=device).t(),
            "expanded": torch.randn(3, 1, generator=generator, device=device).expand(3, 8),
            "bf16_columns": torch.randn(16, 16, generator=generator, device=device).to(torch.bfloat16)[:, ::3]}


def empty_tensors(device):
    return {"empty": torch.empty(0, device=device), "zero_by_n": torch.empty(0, 7, device=device),
            "between": torch.arange(3.0, device=device), "empty_view": torch.arange(10.0, device=device)[3:3],
            "bf16_empty": torch.empty(0, 4, dtype=torch.bfloat16, device=device)}


def mixed_cpu_and_cuda(device):
    generator = torch.Generator().manual_seed(5)
    on_cpu = torch.randn(300, generator=generator)
    on_gpu = on_cpu.to(device) * 2
    return {"gpu": on_gpu, "cpu": on_cpu, "gpu_view": on_gpu[7:19], "cpu_view": on_cpu[::2],
            "bf16_gpu": on_gpu.to(torch.bfloat16), "int_cpu": torch.arange(17, dtype=torch.int64),
            "step": 12345, "name": "global_step12345", "nested": [None, (1.5, {"t": torch.ones(3, device=device)})]}


OBJECTS = {
    "bf16_weights": bf16_weights,
    "adam_states": adam_states,
    "views_of_one_tensor": views_of_one_tensor,
    "views_only": views_only,
    "non_contiguous": non_contiguous,
    "empty_tensors": empty_tensors,
    "mixed_cpu_and_cuda": mixed_cpu_and_cuda,
}


@pytest.mark.parametrize("name", OBJECTS)
def test_cuda_object_is_byte_identical_and_loads_back(tmp_path, device, name):
    obj = OBJECTS[name](device)
    path = tmp_path / f"{name}.pt"
    save_file(obj, path)
    expected = torch_save_bytes(obj)
    assert path.read_bytes() == expected
    if any(tensor.is_cuda for _, tensor in tensors_of(obj)):
        assert b"cuda:0" in expected  # torch records where each storage lived
    assert_loads_on_cuda_bit_exact(path, obj)


class RecordingWriter(io.RawIOBase):
    """Passes every write to an AioFileWriter and records its size."""

    def __init__(self, inner):
        super().__init__()
        self.inner = inner
        self.sizes = []

    def writable(self) -> bool:
        return True

    def write(self, data) -> int:
        self.sizes.append(memoryview(data).nbytes)
        return self.inner.write(data)

    def write_in_place(self, data, *, until_written: bool = False) -> int:
        self.sizes.append(memoryview(data).nbytes)
        return self.inner.write_in_place(data, until_written=until_written)

    def tell(self) -> int:
        return self.inner.tell()

    @property
    def memory_alignment(self) -> int:
        return self.inner.memory_alignment


def test_storage_larger_than_two_copier_blocks(tmp_path, device):
    block = 1 << 20
    generator = torch.Generator(device=device).manual_seed(6)
    large = torch.randint(0, 256, (5 * block + 12345, ), dtype=torch.uint8, generator=generator, device=device)
    obj = {"large": large, "bf16": torch.randn(3 * block // 2 + 7, generator=generator, device=device).bfloat16()}
    copier = DeviceCopier(device, block_bytes=block)
    assert all(pinned.is_pinned() for pinned in copier._blocks)
    copiers = {device: copier}
    path = tmp_path / "large.pt"
    with AioFileWriter(path) as aio:
        recording = RecordingWriter(aio)
        save_layout_first(obj, recording, copiers)
    assert copiers == {device: copier}  # the copier given was used: no other was made for this device
    # Each block lands in pinned memory where O_DIRECT writes it from: only its unaligned edges are copied.
    device_bytes = large.numel() + obj["bf16"].numel() * 2
    assert device_bytes - 8 * 2 * 4096 <= aio.bytes_in_place <= device_bytes
    # 5 full blocks of the large storage and 3 of the bf16 one, each handed over alone; nothing larger. A block
    # carries DIRECT_ALIGNMENT bytes less than its size: its slack places the bytes where their file offset needs.
    assert recording.sizes.count(block - 4096) == 5 + 3
    assert max(recording.sizes) == block - 4096
    assert path.read_bytes() == torch_save_bytes(obj)
    assert_loads_on_cuda_bit_exact(path, obj)

    again = tmp_path / "again.pt"  # the same copier serves the next file
    obj["large"].add_(1)
    save_file(obj, again, copiers)
    assert again.read_bytes() == torch_save_bytes(obj)


@pytest.mark.parametrize("stream_kind", ["default_stream", "side_stream"])
def test_kernel_queued_just_before_the_save_is_in_the_file(tmp_path, device, stream_kind):
    tensor = torch.zeros(3 << 20, device=device)  # 12 MiB
    torch.cuda.synchronize(device)
    stream = torch.cuda.Stream(device) if stream_kind == "side_stream" else torch.cuda.current_stream(device)
    path = tmp_path / "ordered.pt"
    with torch.cuda.stream(stream):
        torch.cuda._sleep(SLEEP_CYCLES)  # keeps the stream busy: the fill below runs after the save is issued
        tensor.fill_(7.0)
        save_file({"t": tensor, "view": tensor[5:9]}, path)
    loaded = torch.load(path, map_location="cuda", weights_only=True)
    assert torch.all(loaded["t"] == 7.0).item()
    assert torch.all(loaded["view"] == 7.0).item()


@pytest.mark.parametrize("stream_kind", ["default_stream", "side_stream"])
def test_snapshot_after_a_queued_kernel_holds_its_result(tmp_path, device, stream_kind):
    tensor = torch.zeros(1 << 20, device=device)
    torch.cuda.synchronize(device)
    stream = torch.cuda.Stream(device) if stream_kind == "side_stream" else torch.cuda.current_stream(device)
    with torch.cuda.stream(stream):
        torch.cuda._sleep(SLEEP_CYCLES)
        tensor.fill_(3.0)
        snapshot = lay_out({"t": tensor}).snapshot()
    path = tmp_path / "snapshot.pt"
    with AioFileWriter(path) as writer:
        snapshot.write_to(writer)
    assert torch.all(torch.load(path, weights_only=True)["t"] == 3.0).item()


def test_snapshot_is_pinned_host_memory_and_ignores_later_changes(tmp_path, device):
    obj = {**bf16_weights(device), **adam_states(device), "cpu": torch.arange(100.0), "view": None}
    obj["view"] = obj["layer1.weight"][2:5]
    expected = torch_save_bytes(obj)
    layout = lay_out(obj)
    snapshot = layout.snapshot()
    assert snapshot.storage_bytes == layout.storage_bytes
    cuda_pieces = 0
    for original, copy in zip(layout.pieces, snapshot.pieces):
        if isinstance(original, bytes):
            assert copy == original
            continue
        assert copy.device.type == "cpu"
        assert copy.numel() == original.nbytes()
        if original.device.type == "cuda":
            assert copy.is_pinned()
            cuda_pieces += 1
    assert cuda_pieces == cuda_storage_count(obj)  # every CUDA storage, once

    with torch.no_grad():
        for key, value in obj.items():
            if key.startswith("layer"):
                value.add_(1)
        for state in obj["state"].values():
            state["exp_avg"].fill_(0)
            state["exp_avg_sq"].mul_(3)
        obj["cpu"].fill_(-1)

    path = tmp_path / "snapshot.pt"
    with AioFileWriter(path) as writer:
        snapshot.write_to(writer)
    assert path.read_bytes() == expected
    assert torch_save_bytes(obj) != expected


def test_write_makes_no_pageable_copy(tmp_path, device, monkeypatch):
    obj = {**bf16_weights(device), **views_of_one_tensor(device), "big": torch.randn(5 << 20, device=device),
           "cpu": torch.arange(10.0)}
    expected = torch_save_bytes(obj)  # torch.save itself copies through .cpu(): done before the patch
    layout = lay_out(obj)
    copiers = {}

    def refuse(self, *args, **kwargs):
        raise AssertionError(f".cpu() called on a {type(self).__name__} while writing")

    path = tmp_path / "direct.pt"
    with monkeypatch.context() as patch:
        patch.setattr(torch.UntypedStorage, "cpu", refuse)
        patch.setattr(torch.TypedStorage, "cpu", refuse)
        patch.setattr(torch.Tensor, "cpu", refuse)
        with pytest.raises(AssertionError, match="called on a Tensor"):
            obj["big"].cpu()  # the patch is in force
        with AioFileWriter(path) as writer:
            layout.write_to(writer, copiers)
    assert list(copiers) == [device]
    assert all(block.is_pinned() for block in copiers[device]._blocks)
    assert path.read_bytes() == expected
    assert_loads_on_cuda_bit_exact(path, obj)
