"""safe_load on crafted files: the client_state types it admits, the attacks on them it refuses, its messages."""

import argparse
import datetime
import enum
import io
import pathlib
import pickle
import struct
import zipfile

import numpy as np
import pytest
import torch

from ds_fastckpt import UnsafeCheckpointError
from ds_fastckpt.format import safe_load
from ds_fastckpt.native.reader import MemoryFile


class Crafted:
    """Pickles as whatever ``__reduce__`` tuple it is given: the way to write a hand-made REDUCE (+ BUILD)."""

    def __init__(self, *reduced):
        self.reduced = reduced

    def __reduce__(self):
        return self.reduced


class StepRecord:
    """A class of the user's own, outside every allowlist."""

    def __init__(self, step):
        self.step = step


class OtherRecord:
    """A second one, to see that the message names all of them."""


class Color(enum.Enum):
    """An enum of the user's own."""

    RED = 1


def saved(obj) -> bytes:
    buffer = io.BytesIO()
    torch.save(obj, buffer)
    return buffer.getvalue()


def with_pickle(data_pkl: bytes) -> bytes:
    """A torch.save archive whose data.pkl is ``data_pkl``: for pickles no ``__reduce__`` can write."""
    archive = io.BytesIO()
    with zipfile.ZipFile(io.BytesIO(saved({}))) as source, zipfile.ZipFile(archive, "w") as target:
        for info in source.infolist():
            target.writestr(info.filename, data_pkl if info.filename.endswith("/data.pkl") else source.read(info))
    return archive.getvalue()


def build_on_global(module: str, name: str, state: dict) -> bytes:
    """A pickle that pushes the object ``module.name`` itself and BUILDs ``state`` (str to int) onto it."""
    items = b"".join(_unicode(key) + b"K" + bytes([value]) + b"s" for key, value in state.items())
    return b"\x80\x02c" + f"{module}\n{name}\n".encode() + b"}" + items + b"b."


def _unicode(text: str) -> bytes:
    data = text.encode()
    return b"X" + struct.pack("<I", len(data)) + data


def load(blob: bytes):
    return safe_load.load(MemoryFile(blob), path="crafted.pt")


# What is admitted --------------------------------------------------------------------------------------------------


def test_client_state_types_round_trip():
    state = {
        "floats": np.arange(6, dtype=np.float32).reshape(2, 3),
        "fortran": np.asfortranarray(np.arange(6.0).reshape(2, 3)),
        "zero_d": np.array(5, dtype=np.uint16),
        "bools": np.array([True, False]),
        "complex": np.array([1 + 2j], dtype=np.complex128),
        "half": np.float16(0.5),
        "scalar": np.float32(1.5),
        "int": np.int64(3),
        "bool": np.bool_(True),
        "rng": np.random.get_state(),
        "args": argparse.Namespace(lr=0.1, name="x", weights=np.ones(2)),
        "path": pathlib.Path("/a/b"),
        "windows": pathlib.PureWindowsPath("c:/x"),
        "when": datetime.datetime(2026, 1, 2, 3, 4, 5),
        "aware": datetime.datetime(2026, 1, 2, tzinfo=datetime.timezone(datetime.timedelta(hours=2), "X")),
        "utc": datetime.datetime(2026, 1, 2, tzinfo=datetime.timezone.utc),
        "day": datetime.date(2026, 1, 2),
        "time": datetime.time(3, 4),
        "delta": datetime.timedelta(seconds=3),
        "dtype": np.dtype("i2"),
    }
    state["same_twice"] = [state["floats"], state["floats"]]
    loaded = load(saved(state))
    for key in ("floats", "fortran", "zero_d", "bools", "complex"):
        assert type(loaded[key]) is np.ndarray and loaded[key].dtype == state[key].dtype, key
        assert np.array_equal(loaded[key], state[key]), key
    assert loaded["fortran"].flags.f_contiguous
    for key in ("half", "scalar", "int", "bool", "path", "windows", "when", "aware", "utc", "day", "time", "delta",
                "dtype"):
        assert type(loaded[key]) is type(state[key]) and loaded[key] == state[key], key
    assert loaded["utc"].tzinfo is datetime.timezone.utc
    assert loaded["rng"][0] == "MT19937" and np.array_equal(loaded["rng"][1], state["rng"][1])
    assert loaded["rng"][2:] == state["rng"][2:]
    assert vars(loaded["args"]).keys() == vars(state["args"]).keys() and type(loaded["args"].weights) is np.ndarray
    assert loaded["same_twice"][0] is loaded["same_twice"][1]


def test_non_native_byte_order_loads_as_numpy_loads_it():
    big_endian = np.arange(3, dtype=">i4")
    assert np.array_equal(load(saved(big_endian)), pickle.loads(pickle.dumps(big_endian, protocol=2)))
    assert load(saved(np.dtype(">f8"))) == np.dtype(">f8")


@pytest.mark.parametrize("value", [np.array(["text"]), np.array([object()], dtype=object), np.zeros(2, "i4,f8"),
                                   np.array(["2026-01-02"], dtype="datetime64[D]")])
def test_other_numpy_dtypes_are_refused(value):
    with pytest.raises(UnsafeCheckpointError, match="trusted_pickles=true") as raised:
        load(saved({"value": value}))
    assert "numpy" in str(raised.value)


# Attacks through REDUCE and BUILD: refused, or building only fresh objects ----------------------------------------


def test_enum_member_cannot_be_rewritten():
    from deepspeed.runtime.zero.config import ZeroStageEnum

    member = ZeroStageEnum.optimizer_states
    before = dict(vars(member))
    with pytest.raises(UnsafeCheckpointError, match="ZeroStageEnum enum member") as raised:
        load(saved({"stage": Crafted(ZeroStageEnum, (1, ), {"_value_": 7, "_name_": "rewritten"})}))
    assert "add_safe_globals([" not in str(raised.value)  # admitting the class is what would let this through
    assert vars(member) == before and ZeroStageEnum(1) is member and member.value == 1
    assert load(saved({"stage": member}))["stage"] is member  # the honest pickle: REDUCE only


def test_an_enum_member_pickled_by_name_loads_as_that_member():
    """Debian 12's Python 3.11.2 pickles ZeroStageEnum.optimizer_states as getattr(ZeroStageEnum, "optimizer_states")
    (later 3.11 releases pickle it by value): the checkpoints DeepSpeed saves there were refused as unsafe."""
    from deepspeed.runtime.zero.config import ZeroStageEnum

    by_name = saved({"zero_stage": Crafted(getattr, (ZeroStageEnum, "optimizer_states"))})
    assert b"getattr" in by_name
    assert load(by_name)["zero_stage"] is ZeroStageEnum.optimizer_states


@pytest.mark.parametrize("owner,name,why", [
    (None, "optimizer_states", "ZeroStageEnum"),  # None: ZeroStageEnum, filled in below
    (None, "__class__", "not a member of ZeroStageEnum"),
    (None, "_member_map_", "not a member of ZeroStageEnum"),
    (Color, "RED", "trusted_pickles=true"),  # the user's enum: not admitted, by value or by name
    (pathlib.PurePosixPath, "__init__", "trusted_pickles=true"),
])
def test_getattr_reaches_nothing_but_a_member_of_an_admitted_enum(owner, name, why):
    from deepspeed.runtime.zero.config import ZeroStageEnum

    if owner is None and name == "optimizer_states":
        owner, name = ZeroStageEnum, "optimizer_states"
        crafted = Crafted(getattr, (Crafted(getattr, (owner, name)), "__class__"))  # a member's attributes: refused
        why = "not an admitted enum"
    else:
        crafted = Crafted(getattr, (owner or ZeroStageEnum, name))
    with pytest.raises(UnsafeCheckpointError, match=why):
        load(saved({"x": crafted}))


def test_shared_dtype_is_never_given_a_state():
    # copy=False is numpy's own float64 dtype, which every float64 array shares; the BUILD asks it to turn big-endian.
    shared = np.dtype("f8")
    loaded = load(saved(Crafted(np.dtype, ("f8", False, False), (3, ">", None, None, None, -1, -1, 0))))
    assert loaded == np.dtype(">f8") and loaded is not shared
    assert shared.byteorder == "=" and np.zeros(1).dtype.str == "<f8" and np.dtype("f8") is shared


@pytest.mark.parametrize("state", [
    (3, "|", None, ("x", ), {"x": (np.dtype("O"), 0)}, 8, 8, 63),  # an object field: numpy would read a pointer
    (3, "<", None, None, None, -1, -1, 63),  # object flags on a float64
    (3, "<", (np.dtype("f8"), (2, )), None, None, -1, -1, 0),  # a sub-array
    (3, "<", None, None, None, 16, 16, 0),  # other sizes
    (4, "<", None, None, None, -1, -1, 0, {"note": 1}),  # metadata
    (3, "?", None, None, None, -1, -1, 0),
    (1, "<", None, None, -1, -1),  # an old format numpy no longer writes
])
def test_dtype_state_may_only_set_the_byte_order(state):
    with pytest.raises(UnsafeCheckpointError, match="numpy dtype"):
        load(saved(Crafted(np.dtype, ("f8", False, True), state)))


def test_array_with_forged_dtype_never_reaches_numpy():
    # Through numpy's own __setstate__ this array segfaults on a["x"]: its 8 bytes are read as a PyObject pointer.
    forged = Crafted(np.dtype, ("f8", False, True), (3, "|", None, ("x", ), {"x": (np.dtype("O"), 0)}, 8, 8, 63))
    pointer = struct.unpack("<d", (0x4141414141414141).to_bytes(8, "little"))[0]
    array = Crafted(np._core.multiarray._reconstruct, (np.ndarray, (0, ), b"b"), (1, (1, ), forged, False, [pointer]))
    with pytest.raises(UnsafeCheckpointError, match="numpy dtype"):
        load(saved({"array": array}))


@pytest.mark.parametrize("state", [
    (1, (1, ), np.dtype("f8"), False, [1.0]),  # an object array's list
    (1, (2, ), np.dtype("f8"), False, b"\0" * 8),  # too few bytes for the shape
    (1, (-1, ), np.dtype("f8"), False, b""),
    (1, (1, ), "f8", False, b"\0" * 8),  # a dtype that is not one
    (1, (1, ), np.dtype("f8"), 1, b"\0" * 8),
])
def test_array_state_is_checked(state):
    with pytest.raises(UnsafeCheckpointError):
        load(saved(Crafted(np._core.multiarray._reconstruct, (np.ndarray, (0, ), b"b"), state)))


def test_ndarray_cannot_be_called():
    # numpy.ndarray(shape, dtype, buffer, offset, strides) would make an array over another object's memory.
    with pytest.raises(UnsafeCheckpointError, match="numpy.ndarray"):
        load(saved(Crafted(np.ndarray, ((1, ), "f8", b"\0" * 8))))
    with pytest.raises(UnsafeCheckpointError, match="numpy.ndarray arrays only"):
        load(saved(Crafted(np._core.multiarray._reconstruct, (argparse.Namespace, (0, ), b"b"))))


def test_numpy_bool_singleton_cannot_be_given_a_state():
    # scalar(bool, b"\1") is numpy's one True_.
    with pytest.raises(UnsafeCheckpointError, match="numpy.bool"):
        load(saved(Crafted(np._core.multiarray.scalar, (np.dtype("?"), b"\x01"), {"rewritten": 1})))
    assert bool(np.True_) and not hasattr(np.True_, "rewritten")
    with pytest.raises(UnsafeCheckpointError, match="scalar"):
        load(saved(Crafted(np._core.multiarray.scalar, (np.dtype("f8"), b"\0" * 4))))


@pytest.mark.parametrize("reduced", [
    (datetime.timezone, (datetime.timedelta(0), )),  # returns the shared timezone.utc
    (datetime.datetime, (2026, 1, 2)),
    (datetime.date, (2026, 1, 2)),
    (datetime.time, (3, 4)),
    (datetime.timedelta, (3, )),
    (pathlib.PosixPath, ("/a", )),
    (pathlib.PurePosixPath, ("/a", )),
    (pathlib.PureWindowsPath, ("c:/a", )),
], ids=lambda reduced: reduced[0].__name__)
def test_types_admitted_by_value_refuse_build(reduced):
    utc_before = (datetime.timezone.utc.utcoffset(None), datetime.timezone.utc.tzname(None))
    with pytest.raises(UnsafeCheckpointError, match="sets the state of") as raised:
        load(saved({"value": Crafted(*reduced, (None, {"_str": "/etc/passwd", "_offset": 5}))}))
    assert f"{reduced[0].__module__}.{reduced[0].__qualname__}" in str(raised.value)
    assert "add_safe_globals([" not in str(raised.value)
    assert (datetime.timezone.utc.utcoffset(None), datetime.timezone.utc.tzname(None)) == utc_before
    assert load(saved({"value": Crafted(*reduced)}))["value"] == reduced[0](*reduced[1])


def test_namespace_build_reaches_only_fresh_instances():
    loaded = load(saved([Crafted(argparse.Namespace, (), {"lr": 1}), Crafted(argparse.Namespace, (), {"lr": 2})]))
    assert [vars(item) for item in loaded] == [{"lr": 1}, {"lr": 2}] and loaded[0] is not loaded[1]
    assert "lr" not in vars(argparse.Namespace) and vars(argparse.Namespace()) == {}


@pytest.mark.parametrize("module, name", [
    ("argparse", "Namespace"),
    ("deepspeed.runtime.fp16.loss_scaler", "LossScaler"),
    ("deepspeed.runtime.fp16.loss_scaler", "DynamicLossScaler"),
    ("deepspeed.utils.tensor_fragment", "fragment_address"),
])
def test_admitted_classes_themselves_cannot_be_given_a_state(module, name):
    import importlib

    cls = getattr(importlib.import_module(module), name)
    before = dict(vars(cls))
    with pytest.raises(UnsafeCheckpointError, match="class object") as raised:
        load(with_pickle(build_on_global(module, name, {"cur_scale": 1, "rewritten": 2})))
    assert dict(vars(cls)) == before and "add_safe_globals([" not in str(raised.value)


def test_placeholder_classes_cannot_be_named_in_a_pickle():
    for name in ("_DtypeByValue", "_ArrayBeingLoaded"):
        with pytest.raises(UnsafeCheckpointError, match=f"ds_fastckpt.format.safe_globals.{name}"):
            load(with_pickle(b"\x80\x02cds_fastckpt.format.safe_globals\n" + name.encode() + b"\n)R."))


# The message ------------------------------------------------------------------------------------------------------


def test_refusal_names_the_global_and_the_line_that_admits_it():
    with pytest.raises(UnsafeCheckpointError) as raised:
        load(saved({"record": StepRecord(3)}))
    message = str(raised.value)
    assert "crafted.pt" in message and "asks for tests.unit.test_safe_load.StepRecord" in message
    assert "torch.serialization.add_safe_globals([tests.unit.test_safe_load.StepRecord])" in message
    assert "checkpoint.fast_aio.trusted_pickles=true" in message and "verify='checksum'" in message
    assert "weights_only=False" not in message and "Re-running" not in message


def test_refusal_names_every_global_outside_the_allowlist():
    with pytest.raises(UnsafeCheckpointError) as raised:
        load(saved({"record": StepRecord(3), "other": OtherRecord(), "fine": np.ones(2)}))
    assert ("torch.serialization.add_safe_globals([tests.unit.test_safe_load.StepRecord, "
            "tests.unit.test_safe_load.OtherRecord])") in str(raised.value)


def test_admitted_class_loads_and_the_users_allowlist_survives(restore_safe_globals):
    torch.serialization.add_safe_globals([StepRecord, argparse.Namespace])
    assert load(saved({"record": StepRecord(3)}))["record"].step == 3
    load(saved({"args": argparse.Namespace(lr=1)}))  # ds_fastckpt admits it too: leaving must not remove the user's
    assert {StepRecord, argparse.Namespace} <= set(torch.serialization.get_safe_globals())


def test_enum_admitted_by_value_as_the_readme_says(restore_safe_globals):
    torch.serialization.add_safe_globals([(lambda value: Color(value), "tests.unit.test_safe_load.Color")])
    assert load(saved({"color": Color.RED}))["color"] is Color.RED
    with pytest.raises(UnsafeCheckpointError, match="Color enum member"):
        load(saved({"color": Crafted(Color, (1, ), {"_value_": 5})}))
    assert Color.RED.value == 1 and Color(1) is Color.RED


def test_refused_build_names_the_type_to_admit():
    # A factory the user admitted returns an object whose class is not admitted: BUILD on it is what is refused.
    with pytest.raises(UnsafeCheckpointError) as raised:
        with torch.serialization.safe_globals([make_record]):
            load(saved(Crafted(make_record, (), {"step": 4})))
    assert "torch.serialization.add_safe_globals([tests.unit.test_safe_load.StepRecord])" in str(raised.value)


def make_record():
    return StepRecord(0)


def test_blocked_global_is_called_what_it_is():
    import os

    with pytest.raises(UnsafeCheckpointError) as raised:
        load(saved({"record": StepRecord(1), "run": Crafted(os.system, ("true", ))}))
    message = str(raised.value)
    assert "posix.system" in message and "add_safe_globals cannot admit it" in message and "tampered" in message


def test_other_pickles_are_called_damaged():
    with pytest.raises(UnsafeCheckpointError) as raised:
        safe_load.load(io.BytesIO(pickle.dumps({"a": 1}, protocol=4)), path="not_torch.pt")
    message = str(raised.value)
    assert "not_torch.pt" in message and "opcode 149 (FRAME)" in message and "verify='checksum'" in message
    assert "trusted_pickles=true" in message


def test_refusal_is_an_unpickling_error():
    assert issubclass(UnsafeCheckpointError, pickle.UnpicklingError)
