"""Every CRC-32C path this CPU runs gives the standard values, chains, and matches the writer's checksum."""

import contextlib
import errno
import random

import pytest

from ds_fastckpt import AioFileWriter
from ds_fastckpt.native.fault_injection import inject_fault
from ds_fastckpt.native.op import DIRECT_ALIGNMENT, load_op
from ds_fastckpt.native.op_builder import FastCkptBuilder

pytestmark = pytest.mark.skipif(not FastCkptBuilder().is_compatible(),
                                reason="the native op needs libaio (apt-get install libaio-dev)")

# RFC 3720 (iSCSI) appendix B.4, the check value of the CRC catalogue, and the empty string.
KNOWN = [
    (bytes(32), 0x8A9136AA),
    (b"\xff" * 32, 0x62A8AB43),
    (bytes(range(32)), 0x46DD794E),
    (bytes(range(31, -1, -1)), 0x113FDB5C),
    (b"123456789", 0xE3069283),
    (b"", 0),
]

# Lengths around the 8-byte steps of every path, and misaligned starts into one random buffer.
ODD_LENGTHS = [1, 3, 7, 8, 9, 15, 17, 63, 65, 511, 4095, 4097, 65537]
RANDOM = random.Random(20240531).randbytes((1 << 20) + 64)

ALL_PATHS = ["portable", "sse4.2", "armv8"]  # csrc/crc32c.h Crc32cPath, by crc32c_path_name()


def _vector_id(value):
    return None if isinstance(value, bytes) else hex(value)


def op():
    return load_op()


def runnable_paths():
    return op()._crc32c_paths()


def require_path(path: str) -> None:
    if path not in runnable_paths():
        pytest.skip(f"this CPU or build does not run the {path} path (it runs {', '.join(runnable_paths())})")


def reference_crc32c(data: bytes, crc: int = 0) -> int:
    """Bit-at-a-time CRC-32C in Python: slow, but shares nothing with the op's tables or instructions."""
    crc ^= 0xFFFFFFFF
    for byte in data:
        crc ^= byte
        for _ in range(8):
            crc = (crc >> 1) ^ (0x82F63B78 if crc & 1 else 0)
    return crc ^ 0xFFFFFFFF


def test_paths_include_portable_last():
    paths = runnable_paths()
    assert paths[-1] == "portable"
    assert len(set(paths)) == len(paths) and set(paths) <= set(ALL_PATHS)


@pytest.mark.parametrize("path", ALL_PATHS)
@pytest.mark.parametrize("data, expected", KNOWN, ids=_vector_id)
def test_known_vectors(path, data, expected):
    require_path(path)
    assert op()._crc32c_with(path, data) == expected
    assert reference_crc32c(data) == expected


@pytest.mark.parametrize("data, expected", KNOWN, ids=_vector_id)
def test_default_is_the_fastest_path(data, expected):
    assert op().crc32c(data) == expected
    chunk = memoryview(RANDOM)[3:3 + 100_003]
    assert op().crc32c(chunk) == op()._crc32c_with(runnable_paths()[0], chunk)


@pytest.mark.parametrize("path", ALL_PATHS)
def test_odd_lengths_and_misaligned_starts_match_the_reference(path):
    require_path(path)
    view = memoryview(RANDOM)
    for length in ODD_LENGTHS[:-1]:  # the bitwise reference is slow; the longest is checked across paths below
        for start in (0, 1, 3, 5, 7):
            data = view[start:start + length]
            assert op()._crc32c_with(path, data) == reference_crc32c(bytes(data)), (length, start)


def test_paths_agree_on_random_buffers():
    view = memoryview(RANDOM)
    rng = random.Random(7)
    cases = [(start, length) for length in ODD_LENGTHS for start in (0, 1, 2, 5, 7, 13)]
    cases += [(rng.randrange(64), rng.randrange(1 << 20)) for _ in range(20)]
    for start, length in cases:
        data = view[start:start + length]
        values = {path: op()._crc32c_with(path, data) for path in runnable_paths()}
        assert len(set(values.values())) == 1, (start, length, values)
        assert op().crc32c(data) == values["portable"]


def test_chaining_holds_within_and_across_paths():
    view = memoryview(RANDOM)
    rng = random.Random(11)
    for _ in range(40):
        start, length = rng.randrange(16), rng.randrange(1, 200_000)
        cut = rng.randrange(length + 1)
        whole = op()._crc32c_with("portable", view[start:start + length])
        for first in runnable_paths():
            head = op()._crc32c_with(first, view[start:start + cut])
            for second in runnable_paths():
                assert op()._crc32c_with(second, view[start + cut:start + length], head) == whole, (first, second)
        assert op().crc32c(view[start + cut:start + length], op().crc32c(view[start:start + cut])) == whole


# csrc/crc32c_sse42.cpp hashes three stripes of 32 KiB side by side; lengths around whole rounds of them.
STRIPE_ROUND = 3 * 32768
STRIPE_LENGTHS = [STRIPE_ROUND - 1, STRIPE_ROUND, STRIPE_ROUND + 1, STRIPE_ROUND + 8, 2 * STRIPE_ROUND + 13,
                  10 * STRIPE_ROUND + 7]


def test_paths_agree_around_whole_rounds_of_interleaved_stripes():
    google_crc32c = pytest.importorskip("google_crc32c", reason="google-crc32c is not installed")
    view = memoryview(RANDOM)
    for length in STRIPE_LENGTHS:
        for start in (0, 3):
            data = bytes(view[start:start + length])
            expected = google_crc32c.value(data)
            assert {path: op()._crc32c_with(path, data) for path in runnable_paths()} == dict.fromkeys(
                runnable_paths(), expected), (start, length)
            cut = length // 3 + start
            assert op().crc32c(data[cut:], op().crc32c(data[:cut])) == expected


def test_combine_joins_crcs_of_neighbouring_ranges_without_their_bytes():
    view = memoryview(RANDOM)
    rng = random.Random(5)
    cases = [(0, 0), (0, 1), (1, 0), (5, 4096), (4096, 1 << 19)] + [
        (rng.randrange(1 << 19), rng.randrange(1 << 19)) for _ in range(30)]
    for size_a, size_b in cases:
        a, b = view[:size_a], view[size_a:size_a + size_b]
        assert op().crc32c_combine(op().crc32c(a), op().crc32c(b), size_b) == op().crc32c(view[:size_a + size_b]), (
            size_a, size_b)
    zeros = bytes(3 << 20)  # a long run: every power of x the combine uses up to 2**25 bits
    assert op().crc32c_combine(op().crc32c(b"head"), op().crc32c(zeros), len(zeros)) == op().crc32c(b"head" + zeros)


def test_agrees_with_google_crc32c():
    google_crc32c = pytest.importorskip("google_crc32c", reason="google-crc32c is not installed")
    view = memoryview(RANDOM)
    for start, length in [(0, 0), (1, 1), (3, 4097), (5, 65537), (7, (1 << 20) + 1), (0, 1 << 20)]:
        data = bytes(view[start:start + length])
        expected = google_crc32c.value(data)
        for path in runnable_paths():
            assert op()._crc32c_with(path, data) == expected, (path, start, length)


def test_unknown_or_unavailable_path_is_refused_with_the_choices():
    with pytest.raises(ValueError, match="path='bogus' is not allowed.*portable"):
        op()._crc32c_with("bogus", b"x")
    unavailable = set(ALL_PATHS) - set(runnable_paths())
    for path in unavailable:
        with pytest.raises(ValueError, match=f"path='{path}' is not allowed"):
            op()._crc32c_with(path, b"x")


def test_direct_alignment_matches_the_op():
    assert op().DIRECT_ALIGNMENT == DIRECT_ALIGNMENT


@pytest.mark.parametrize("direct", [True, False], ids=["o_direct", "buffered"])
def test_writer_checksum_is_the_crc_of_the_bytes_on_disk(tmp_path, direct):
    # Small halves and blocks, odd write sizes: the payload crosses many halves, requests and a padded tail.
    path = tmp_path / "data.bin"
    rng = random.Random(3)
    pieces = [rng.randbytes(rng.choice([1, 7, 4095, 4097, 8191, 12289])) for _ in range(40)]
    # EINVAL from open(O_DIRECT) is a filesystem without O_DIRECT: the writer falls back to buffered writes.
    with inject_fault("open_direct", errno.EINVAL) if not direct else contextlib.nullcontext():
        writer = AioFileWriter(path, io_buffer_size=8192, block_size=4096, queue_depth=3)
        for piece in pieces:
            writer.write(piece)
        writer.close()
    on_disk = path.read_bytes()
    assert on_disk == b"".join(pieces)
    if not direct:
        assert not writer.is_direct
    assert writer.checksum == op()._crc32c_with("portable", on_disk)


@pytest.mark.parametrize("path", ALL_PATHS)
def test_fused_copy_copies_and_hashes_like_the_reference_on_every_path(path):
    require_path(path)
    view = memoryview(RANDOM)
    for length in [0, *ODD_LENGTHS, *STRIPE_LENGTHS]:
        for start in (0, 5):
            source = bytes(view[start:start + length])
            destination = bytearray(length + 16)
            target = memoryview(destination)[3:3 + length]  # a misaligned destination too
            crc = op()._crc32c_copy_with(path, target, source, 0x1234)
            assert crc == op()._crc32c_with("portable", source, 0x1234), (length, start)
            assert bytes(target) == source, (length, start)
            assert destination[:3] == bytes(3) and destination[3 + length:] == bytes(13), "wrote outside its target"


def test_fused_copy_refuses_a_destination_of_another_length():
    with pytest.raises(ValueError, match="a destination as long as the source"):
        op()._crc32c_copy_with("portable", bytearray(3), b"abcd")
