"""``plan_share`` on one rank, with the other member's side of the exchange scripted: what each rank writes
when the members agree, when they do not, and when the leader cannot make the file."""

import errno
import logging

import pytest
import torch

from ds_fastckpt.engine.shared_write import FileShare, join_shares, plan_share
from ds_fastckpt.engine.writer_groups import WriterGroup
from ds_fastckpt.format.manifest import FileRecord
from ds_fastckpt.native import layout_save
from ds_fastckpt.native.writer import torch_zip_crc32


class ScriptedRanks:
    """The member's half of the one all-gather: this process is rank 0, the scripted member rank 1."""

    def __init__(self, other):
        self.other = other
        self.sent = []

    def gather(self, obj, failure):
        self.sent.append(obj)
        return [obj, (1, self.other)]


def model_states():
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(40, 3000), torch.nn.Linear(3000, 5))
    return {"module": model.state_dict(), "buffer_names": [], "client": torch.arange(300)}


@pytest.fixture(autouse=True)
def torch_crc32_off():
    with torch_zip_crc32(False):
        yield


def test_the_leader_writes_all_but_the_other_member_s_share():
    state = model_states()
    sizes = [storage.nbytes() for storage in layout_save.parameter_storages(state)]
    made = []
    part = plan_share(state, WriterGroup((0, 1), ScriptedRanks(sizes)), made.append, "test")
    layout = layout_save.lay_out(state)
    assert made == [layout.file_size]
    assert 0.3 < part.storage_bytes / layout.storage_bytes < 0.7  # about half the parameters, plus the rest
    written = sum(piece.numel() if isinstance(piece, torch.Tensor) else len(piece) for _, piece in part.pieces)
    assert abs(written - layout.file_size / 2) < 8192


def test_a_member_with_other_parameter_sizes_leaves_the_whole_file_to_the_leader(caplog):
    state = model_states()
    with caplog.at_level(logging.WARNING):
        part = plan_share(state, WriterGroup((0, 1), ScriptedRanks([4, 4])), lambda size: None, "checkpoint 'x'")
    assert part.storage_bytes == layout_save.lay_out(state).storage_bytes
    assert "checkpoint 'x': the data-parallel ranks hold parameters of different sizes" in caplog.text


def test_a_member_whose_save_failed_leaves_the_whole_file_to_the_leader():
    state = model_states()
    part = plan_share(state, WriterGroup((0, 1), ScriptedRanks(None)), lambda size: None, "test")
    assert part.storage_bytes == layout_save.lay_out(state).storage_bytes


def test_the_leader_s_failure_to_make_the_file_is_raised_after_the_member_heard_of_it():
    ranks = ScriptedRanks([1])

    def make_file(size):
        raise OSError(errno.ENOSPC, "No space left on device", "/ckpt/f.pt")

    with pytest.raises(OSError) as raised:
        plan_share(model_states(), WriterGroup((0, 1), ranks), make_file, "test")
    assert raised.value.errno == errno.ENOSPC
    assert ranks.sent[0][1][1] is None  # it told the member: no ranges, write nothing


def test_with_torch_s_zip_crc_on_the_leader_saves_alone_the_usual_way():
    state = model_states()
    made = []
    with torch_zip_crc32(True):
        assert plan_share(state, WriterGroup((0, 1), ScriptedRanks([1])), made.append, "test") is state
    assert made == []


def test_a_member_writes_its_share_of_what_the_leader_laid_out():
    state = model_states()
    layout = layout_save.lay_out(state)
    ranges = layout.storage_ranges(layout_save.parameter_storages(state))
    # This process plays rank 0 as the second member; the scripted rank 1 is the leader.
    part = plan_share(state, WriterGroup((1, 0), ScriptedRanks((layout.file_size, ranges))), None, "test")
    assert part.pieces and all(offset % 4096 == 0 for offset, _ in part.pieces)
    assert part.file_size == layout.file_size
    assert plan_share(state, WriterGroup((1, 0), ScriptedRanks((0, None))), None, "test") is None


def test_shares_of_a_file_join_into_one_record():
    shares = [FileShare("f.pt", 8192, ((4096, 4096, 22),), rank=1, host="b"),
              FileShare("f.pt", 8192, ((0, 4096, 11),), rank=0, host="a")]
    other = FileRecord("g.pt", 5, 7, rank=1, host="b")
    records = join_shares(shares + [other])
    assert records[0] == other
    assert records[1].path == "f.pt" and records[1].bytes == 8192 and (records[1].rank, records[1].host) == (0, "a")
