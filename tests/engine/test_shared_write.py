"""``plan_share`` on one rank, with the other member's side of the exchange scripted: what each rank writes
when the members agree, when they do not (other parameters, or the same sizes with other bytes), what is never
shared (extra state), and when the leader cannot lay out or make the file."""

import errno
import logging
import pickle

import pytest
import torch

from ds_fastckpt.engine.shared_write import FileShare, join_shares, plan_share
from ds_fastckpt.engine.writer_groups import WriterGroup
from ds_fastckpt.format.manifest import FileRecord
from ds_fastckpt.native import layout_save
from ds_fastckpt.native.device_copy import bytes_of
from ds_fastckpt.native.op import load_op
from ds_fastckpt.native.writer import torch_zip_crc32


class ScriptedRanks:
    """The member's half of the one all-gather: this process is rank 0, the scripted member rank 1."""

    def __init__(self, other):
        self.other = other
        self.sent = []

    def gather(self, obj, failure):
        self.sent.append(obj)
        return [obj, (1, self.other)]


def model_states(model=None):
    torch.manual_seed(0)
    if model is None:
        model = torch.nn.Sequential(torch.nn.Linear(40, 3000), torch.nn.Linear(3000, 5))
    return {"module": model.state_dict(), "buffer_names": [], "client": torch.arange(300)}


def digests(state):
    """What a member holding ``state`` sends: (bytes, CRC-32C) of each parameter storage."""
    return [(storage.nbytes(), load_op().crc32c(bytes_of(storage).numpy()))
            for storage in layout_save.parameter_storages(state)]


def leader_writes(part, start: int, end: int) -> bool:
    """Whether the leader's ``part`` covers every byte of ``[start, end)``."""
    covered = 0
    for offset, piece in part.pieces:
        length = piece.numel() if isinstance(piece, torch.Tensor) else len(piece)
        covered += max(0, min(end, offset + length) - max(start, offset))
    return covered == end - start


class WithExtraState(torch.nn.Module):
    """A module whose ``get_extra_state()`` is a tensor (running statistics, FP8 scaling metadata)."""

    def __init__(self, extra: torch.Tensor):
        super().__init__()
        self.linear = torch.nn.Linear(40, 3000)
        self.extra = extra

    def get_extra_state(self):
        return self.extra

    def set_extra_state(self, state):
        self.extra = state


@pytest.fixture(autouse=True)
def torch_crc32_off():
    with torch_zip_crc32(False):
        yield


def test_the_leader_writes_all_but_the_other_member_s_share():
    state = model_states()
    made = []
    part = plan_share(state, WriterGroup((0, 1), ScriptedRanks(digests(state))), made.append, "test")
    layout = layout_save.lay_out(state)
    assert made == [layout.file_size]
    assert 0.3 < part.storage_bytes / layout.storage_bytes < 0.7  # about half the parameters, plus the rest
    written = sum(piece.numel() if isinstance(piece, torch.Tensor) else len(piece) for _, piece in part.pieces)
    assert abs(written - layout.file_size / 2) < 8192


def test_a_member_with_other_parameters_leaves_the_whole_file_to_the_leader(caplog):
    state = model_states()
    with caplog.at_level(logging.WARNING):
        part = plan_share(state, WriterGroup((0, 1), ScriptedRanks([(4, 0), (4, 0)])), lambda size: None,
                          "checkpoint 'x'")
    assert part.storage_bytes == layout_save.lay_out(state).storage_bytes
    assert "checkpoint 'x': the data-parallel ranks hold different parameters" in caplog.text


def test_a_storage_of_the_same_size_with_other_bytes_is_the_leader_s_alone(caplog):
    """Sharded frozen weights (OptimizedLinear): the same sizes, other bytes on each rank."""
    state = model_states()
    other = digests(state)
    other[0] = (other[0][0], other[0][1] ^ 1)  # the first weight, 480 000 bytes, differs on the member
    layout = layout_save.lay_out(state)
    ranges = layout.storage_ranges(layout_save.parameter_storages(state))
    with caplog.at_level(logging.INFO):
        part = plan_share(state, WriterGroup((0, 1), ScriptedRanks(other)), lambda size: None, "checkpoint 'x'")
    assert leader_writes(part, *ranges[0])
    assert not leader_writes(part, *ranges[2])  # the identical second weight is shared still
    assert "checkpoint 'x': 1 of 4 parameter storages (480000 bytes) differ between the data-parallel ranks" \
        in caplog.text
    # The member sees the same: its share lies outside the storage that differs.
    member = plan_share(state, WriterGroup((1, 0), ScriptedRanks((layout.file_size, ranges, other))), None, "t")
    assert member.pieces and all(offset >= ranges[0][1] or offset + piece.numel() <= ranges[0][0]
                                 for offset, piece in member.pieces)


def test_a_parameter_deepspeed_marks_as_each_rank_s_own_is_the_leader_s_alone_and_not_digested():
    state = model_states()
    marked = state["module"]["0.weight"]  # what the save hook finds marked ds_optim_param
    layout = layout_save.lay_out(state)
    ranges = layout.storage_ranges(layout_save.parameter_storages(state))
    ranks = ScriptedRanks(digests(state)[1:])
    part = plan_share(state, WriterGroup((0, 1), ranks), lambda size: None, "test", per_rank=[marked])
    assert ranks.sent[0][1][2] == digests(state)[1:]  # three storages digested, not four
    assert leader_writes(part, *ranges[0])
    assert not leader_writes(part, *ranges[2])


def test_extra_state_is_never_shared_whatever_the_digests_say():
    state = model_states(WithExtraState(torch.arange(200_000, dtype=torch.float32)))
    assert "linear.weight" in state["module"] and "_extra_state" in state["module"]
    extra = state["module"]["_extra_state"].untyped_storage()
    assert all(storage._cdata != extra._cdata for storage in layout_save.parameter_storages(state))
    layout = layout_save.lay_out(state)
    extra_range = layout.storage_ranges([extra])[0]
    # A member holding the same extra state, byte for byte: it is still the leader's alone.
    part = plan_share(state, WriterGroup((0, 1), ScriptedRanks(digests(state))), lambda size: None, "test")
    assert leader_writes(part, *extra_range)
    assert part.storage_bytes < layout.storage_bytes  # the parameters are shared


def test_the_leader_s_pickling_error_is_raised_after_the_member_heard_of_it():
    state = model_states()
    state["client_state"] = {"f": lambda: 0}
    ranks = ScriptedRanks(digests(model_states()))
    with pytest.raises((AttributeError, TypeError, pickle.PicklingError)) as raised:
        plan_share(state, WriterGroup((0, 1), ranks), lambda size: None, "test")
    assert "pickle" in str(raised.value)
    assert ranks.sent == [(0, None)]  # it told the member: nothing to share, write nothing


def test_a_member_whose_save_failed_leaves_the_whole_file_to_the_leader():
    state = model_states()
    part = plan_share(state, WriterGroup((0, 1), ScriptedRanks(None)), lambda size: None, "test")
    assert part.storage_bytes == layout_save.lay_out(state).storage_bytes


def test_the_leader_s_failure_to_make_the_file_is_raised_after_the_member_heard_of_it():
    ranks = ScriptedRanks([(1, 0)])

    def make_file(size):
        raise OSError(errno.ENOSPC, "No space left on device", "/ckpt/f.pt")

    with pytest.raises(OSError) as raised:
        plan_share(model_states(), WriterGroup((0, 1), ranks), make_file, "test")
    assert raised.value.errno == errno.ENOSPC
    assert ranks.sent[0][1] is None  # it told the member: nothing to share, write nothing


def test_with_torch_s_zip_crc_on_the_leader_saves_alone_the_usual_way():
    state = model_states()
    made = []
    with torch_zip_crc32(True):
        assert plan_share(state, WriterGroup((0, 1), ScriptedRanks(None)), made.append, "test") is state
    assert made == []


def test_a_member_writes_its_share_of_what_the_leader_laid_out():
    state = model_states()
    layout = layout_save.lay_out(state)
    ranges = layout.storage_ranges(layout_save.parameter_storages(state))
    # This process plays rank 0 as the second member; the scripted rank 1 is the leader.
    leader = (layout.file_size, ranges, digests(state))
    part = plan_share(state, WriterGroup((1, 0), ScriptedRanks(leader)), None, "test")
    assert part.pieces and all(offset % 4096 == 0 for offset, _ in part.pieces)
    assert part.file_size == layout.file_size
    assert plan_share(state, WriterGroup((1, 0), ScriptedRanks(None)), None, "test") is None


def test_shares_of_a_file_join_into_one_record():
    shares = [FileShare("f.pt", 8192, ((4096, 4096, 22),), rank=1, host="b"),
              FileShare("f.pt", 8192, ((0, 4096, 11),), rank=0, host="a")]
    other = FileRecord("g.pt", 5, 7, rank=1, host="b")
    records = join_shares(shares + [other])
    assert records[0] == other
    assert records[1].path == "f.pt" and records[1].bytes == 8192 and (records[1].rank, records[1].host) == (0, "a")
