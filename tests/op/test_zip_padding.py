"""zip_padding.repad: each storage record moves to where its memory can be written from, the archive stays one
that torch.load and zipfile read, past 4 GiB too, and nothing moves that would change the zip format."""

import io
import zipfile

import pytest
import torch

from ds_fastckpt.native.layout_save import lay_out
from ds_fastckpt.native.writer import torch_zip_crc32
from ds_fastckpt.native.zip_padding import repad
from tests.zip_records import assert_same_records, records

ZIP64_LINE = 0xFFFFFFFF


@pytest.fixture(autouse=True)
def torch_crc32_off():
    with torch_zip_crc32(False):
        yield


def archive_bytes(pieces) -> bytes:
    out = bytearray()
    for piece in pieces:
        if isinstance(piece, bytes):
            out += piece
        else:
            tensor = piece if isinstance(piece, torch.Tensor) else torch.empty(0, dtype=torch.uint8).set_(piece)
            out += tensor.numpy().tobytes()
    return bytes(out)


def torch_save_bytes(obj) -> bytes:
    buffer = io.BytesIO()
    torch.save(obj, buffer)
    return buffer.getvalue()


def sample():
    generator = torch.Generator().manual_seed(0)
    base = torch.randn(3000, generator=generator)
    return {"base": base, "view": base[7:20], "half": torch.randn(999, generator=generator).half(),
            "ints": torch.arange(12345), "empty": torch.empty(0), "step": 7, "name": "x"}


@pytest.mark.parametrize("alignment", [4, 512, 4096])
def test_each_storage_lands_at_the_residue_its_address_needs(alignment):
    obj = sample()
    layout = lay_out(obj)
    residues = {}

    def address_of(piece):
        residues[piece._cdata] = (piece.data_ptr() * 7 + 100) % alignment  # addresses torch would never give
        return residues[piece._cdata]

    pieces = repad(layout.pieces, alignment, address_of)
    written = archive_bytes(pieces)
    assert_same_records(written, torch_save_bytes(obj))
    storages = [piece for piece in layout.pieces if not isinstance(piece, bytes)]
    found = records(written)
    for key, storage in enumerate(storages):
        start, data = found[f"archive/data/{key}"]
        assert start % alignment == residues[storage._cdata] % alignment
        assert len(data) == storage.nbytes()
    loaded = torch.load(io.BytesIO(written), weights_only=True)
    assert all(torch.equal(loaded[key], obj[key]) for key in ("base", "view", "half", "ints", "empty"))
    assert loaded["view"].untyped_storage()._cdata == loaded["base"].untyped_storage()._cdata


def test_torch_reads_offsets_from_the_headers_of_a_moved_archive(tmp_path):
    """Its .format_version says 0, so torch's opt-in offset calculation (which assumes its own padding) is off."""
    obj = sample()
    written = archive_bytes(repad(lay_out(obj).pieces, 4096, lambda piece: 1000))
    assert records(written)["archive/.format_version"][1] == b"0"
    path = tmp_path / "moved.pt"
    path.write_bytes(written)
    config = torch.utils.serialization.config.load
    before = config.calculate_storage_offsets
    config.calculate_storage_offsets = True
    try:
        loaded = torch.load(path, weights_only=True, mmap=True)
    finally:
        config.calculate_storage_offsets = before
    assert torch.equal(loaded["ints"], obj["ints"]) and torch.equal(loaded["half"], obj["half"])


def test_nothing_to_move_gives_torch_save_s_archive_itself():
    layout = lay_out(sample())
    assert repad(layout.pieces, 512, lambda piece: None) is layout.pieces
    assert archive_bytes(layout.pieces) == torch_save_bytes(sample())


def test_an_archive_torch_did_not_lay_out_is_left_alone():
    assert repad([b"not a zip archive at all, just bytes" * 3], 512, lambda piece: 0) is None


def huge_layout(big_bytes: int):
    """A layout with an untouched storage of ``big_bytes`` (never read: lay_out skips data) between small ones."""
    big = torch.empty(big_bytes, dtype=torch.uint8)  # not touched, so not resident
    return lay_out({"a": torch.arange(10.0), "big": big, "c": torch.arange(5, dtype=torch.int16)})


def end_of_biggest_storage(pieces) -> int:
    """Where the biggest storage's bytes end: its 16-byte data descriptor, then the next local header, follow."""
    position, ends = 0, {}
    for piece in pieces:
        length = len(piece) if isinstance(piece, bytes) else piece.nbytes()
        if not isinstance(piece, bytes):
            ends[length] = position + length
        position += length
    return ends[max(ends)]


def test_an_archive_past_4_gib_moves_its_zip64_offsets_and_loads(tmp_path):
    layout = huge_layout((1 << 32) + 100)
    pieces = repad(layout.pieces, 512, lambda piece: 200)
    assert pieces is not None and pieces is not layout.pieces
    path = tmp_path / "huge.pt"
    with open(path, "wb") as file:  # sparse: the big storage's bytes stay a hole
        for piece in pieces:
            if isinstance(piece, bytes):
                file.write(piece)
            elif piece.nbytes() > 1 << 20:
                file.seek(piece.nbytes(), io.SEEK_CUR)
            else:
                file.write(torch.empty(0, dtype=torch.uint8).set_(piece).numpy().tobytes())
    with zipfile.ZipFile(path) as archive:  # the zip64 central directory and end records agree with the headers
        names = [info.filename for info in archive.infolist()]
        assert names[:2] == ["archive/data.pkl", "archive/.format_version"]
        offsets = {info.filename: info.header_offset for info in archive.infolist()}
    assert offsets["archive/data/2"] > ZIP64_LINE
    loaded = torch.load(path, weights_only=True, mmap=True)
    assert torch.equal(loaded["a"], torch.arange(10.0)) and torch.equal(loaded["c"], torch.arange(5, dtype=torch.int16))
    assert loaded["big"].numel() == (1 << 32) + 100


def test_a_move_across_the_zip64_line_is_not_made():
    """A local header just below 4 GiB that padding would push over it: the layout is kept as torch made it."""
    def address_of(piece):
        return 300

    probe = huge_layout(1 << 20)
    shift = end_of_biggest_storage(repad(probe.pieces, 512, address_of)) - end_of_biggest_storage(probe.pieces)
    assert shift > 1
    # Grow the big storage so that the header after it lies one byte below the line; the shift carries it over.
    big_starts_at = end_of_biggest_storage(probe.pieces) - (1 << 20)
    big = ZIP64_LINE - 1 - 16 - big_starts_at
    below_line = huge_layout(big)
    assert end_of_biggest_storage(below_line.pieces) + 16 == ZIP64_LINE - 1
    assert repad(below_line.pieces, 512, address_of) is None
    assert repad(huge_layout(big - shift - 4096).pieces, 512, address_of) is not None
