"""What the weights_only unpickler admits beyond torch's own safe set, and why each admitted type is safe.

``ds_fastckpt.format.safe_load`` unpickles every checkpoint file with torch's
weights_only unpickler, which admits torch's own safe set and these:

* the classes DeepSpeed stores: ``LossScaler``, ``DynamicLossScaler``,
  ``fragment_address`` (ZeRO 1 and 2) and ``ZeroStageEnum``;
* the data-only types users put in ``client_state``: numpy arrays and scalars
  of bool, integer, float and complex dtypes (so ``np.random.get_state()``),
  ``argparse.Namespace``, pathlib paths, and ``datetime`` dates, times,
  datetimes, timedeltas and timezones.

An admitted type must not let a crafted pickle change what the process shares,
nor hand numpy a descriptor that numpy trusts blindly. Pickle's BUILD calls
``__setstate__`` (or updates ``__dict__``) of whatever REDUCE returned, and
torch allows it on every instance of an allowlisted class. So:

* enum members, ``timezone.utc``, paths and datetimes are admitted *by value*:
  the name in the pickle maps to a function that calls the class, and since
  the class itself is not on the list, BUILD on what it returns is refused
  (BUILD on an enum member would rewrite it for the whole process). Some
  Python 3.11 releases (Debian 12's 3.11.2) pickle an enum member by name,
  ``getattr(ZeroStageEnum, "optimizer_states")``: ``getattr`` maps to
  ``_member_by_name``, which looks up a member of an enum admitted by value
  and nothing else;
* numpy's ``dtype.__setstate__`` stores the flags, fields and sub-array the
  pickle gives, unchecked: a float64 given an object field makes numpy read
  8 bytes of the file as a pointer. So a numpy dtype is rebuilt here from its
  checked code and byte order (``_DtypeByValue``), an array from checked shape,
  dtype and bytes (``_ArrayBeingLoaded``), and numpy's own dtype
  ``__setstate__`` never runs. ``safe_load.load`` swaps these stand-ins for
  the dtypes and arrays they stand for once the file is loaded (``swapped_back``).
"""

import argparse
import datetime
import enum
import functools
import importlib
import math
import pathlib
import pickle
import threading

import numpy as np
import torch

DEEPSPEED_CHECKPOINT_GLOBALS = (
    ("deepspeed.runtime.fp16.loss_scaler", "LossScaler"),
    ("deepspeed.runtime.fp16.loss_scaler", "DynamicLossScaler"),
    ("deepspeed.runtime.zero.config", "ZeroStageEnum"),
    ("deepspeed.utils.tensor_fragment", "fragment_address"),
)

# Its members are shared by the whole process: admitted by value, so no BUILD can reach one.
DEEPSPEED_BY_VALUE = frozenset({("deepspeed.runtime.zero.config", "ZeroStageEnum")})

# Pickled as one REDUCE of the class with plain values, never with a BUILD; timezone(timedelta(0)) even returns
# the shared timezone.utc. type(pathlib.Path()) is this system's concrete path class.
CLIENT_STATE_BY_VALUE = (datetime.date, datetime.time, datetime.datetime, datetime.timedelta, datetime.timezone,
                          pathlib.PurePosixPath, pathlib.PureWindowsPath, type(pathlib.Path()))

# Pickled as NEWOBJ + BUILD: the BUILD only ever reaches the fresh instance NEWOBJ or REDUCE made.
_CLIENT_STATE_CLASSES = (argparse.Namespace, )

# bool, signed and unsigned integers, floats, complex: dtypes without fields, sub-arrays, objects or metadata.
_PLAIN_DTYPE_KINDS = "biufc"

# torch looks a GLOBAL up as "module.name", so a name without a "." cannot be reached from a pickle: classes
# entered under one are there only so that BUILD may fill in the objects this module's functions made.
_BUILD_ONLY_PREFIX = "ds_fastckpt-build-only-"

# The load in progress on this thread: `placeholders` counts the stand-ins it made, which safe_load swaps back.
loading = threading.local()


class RefusedState(pickle.UnpicklingError):
    """This module's checks refused a value of the pickle; the message is a clause saying which and why."""


def allowed_globals() -> list:
    """What ``safe_load.load`` adds to torch's weights_only allowlist, in the form ``add_safe_globals`` takes.

    Classes stand for themselves; ``(function, "module.Name")`` entries admit
    a type by value or rebuild numpy objects from checked values.
    """
    return list(_allowlist())


@functools.cache
def _allowlist() -> tuple:
    # Built once: the safe_globals context adds and removes entries by identity, so they must stay the same objects.
    return tuple(_deepspeed_entries() + _client_state_entries() + _numpy_entries())


def _deepspeed_entries() -> list:
    entries, enums = [], {}
    for module, name in DEEPSPEED_CHECKPOINT_GLOBALS:
        cls = getattr(importlib.import_module(module), name)
        if (module, name) in DEEPSPEED_BY_VALUE:
            construct = _by_value(cls)
            entries.append((construct, f"{module}.{name}"))
            if issubclass(cls, enum.Enum):
                enums[construct] = cls
        else:
            entries.append(cls)
    member_by_name = _member_by_name(enums)
    return entries + [(member_by_name, f"{module}.getattr") for module in ("builtins", "__builtin__")]


def _member_by_name(enums: dict):
    """Stands for ``getattr`` in a pickle: ``getattr(E, name)`` for a member ``name`` of an enum ``E`` admitted by
    value (``enums`` maps what its name loads as to ``E``); anything else is refused."""

    def member(owner, name):
        cls = enums.get(owner)
        if cls is None:
            raise RefusedState(f"getattr{_short((owner, name))} is refused: getattr is admitted only to look up a "
                               "member of an admitted enum by name, and this is not an admitted enum")
        if not isinstance(name, str) or name not in cls.__members__:
            raise RefusedState(f"getattr{_short((cls.__name__, name))} is refused: {name!r} is not a member of "
                               f"{cls.__name__}")
        return cls[name]

    member.__name__ = member.__qualname__ = "getattr_of_an_enum_member"
    return member


def _client_state_entries() -> list:
    entries = list(_CLIENT_STATE_CLASSES)
    for cls in CLIENT_STATE_BY_VALUE:
        construct = _by_value(cls)
        entries += [(construct, name) for name in pickled_names(cls)]
    return entries


def pickled_names(cls) -> set:
    """The names a pickle may give ``cls``: Python 3.13 moved pathlib's classes to ``pathlib._local``."""
    names = {f"{cls.__module__}.{cls.__qualname__}"}
    if cls.__module__.startswith("pathlib"):
        names.add(f"pathlib.{cls.__qualname__}")
    return names


def _numpy_entries() -> list:
    entries = [(_checked_dtype, "numpy.dtype"), (_NdarrayName, "numpy.ndarray")]
    # numpy 2 names numpy._core in its pickles, numpy 1 numpy.core: checkpoints written with either load.
    for module in ("numpy._core.multiarray", "numpy.core.multiarray"):
        entries += [(_empty_array, f"{module}._reconstruct"), (_checked_scalar, f"{module}.scalar")]
    entries += [(cls, _BUILD_ONLY_PREFIX + cls.__name__) for cls in (_DtypeByValue, _ArrayBeingLoaded)]
    return entries


def _by_value(cls):
    """A function calling ``cls``: admitted under cls's name, REDUCE builds a ``cls`` while BUILD on it is refused."""

    def construct(*args):
        try:
            return cls(*args)
        except (TypeError, ValueError, OverflowError) as error:
            name = f"{cls.__module__}.{cls.__qualname__}"
            raise RefusedState(f"{name}{_short(args)} is not a valid {cls.__name__}: {error}") from None

    construct.__name__ = construct.__qualname__ = f"{cls.__name__}_by_value"
    return construct


# numpy -------------------------------------------------------------------------------------------------------------


def _checked_dtype(code, align=False, copy=True) -> "_DtypeByValue":
    """Stands for ``numpy.dtype(code, align, copy)`` in a pickle; align and copy change nothing for plain dtypes.

    The pickle may ask for copy=False, which is numpy's shared dtype, and the
    BUILD after it may carry any flags and fields: neither reaches numpy.
    """
    del align, copy
    loading.placeholders = getattr(loading, "placeholders", 0) + 1
    return _DtypeByValue(_plain_dtype(code))


def _plain_dtype(code) -> np.dtype:
    """``numpy.dtype(code)`` if that is a plain dtype (see _PLAIN_DTYPE_KINDS).

    Raises:
        RefusedState: any other code.
    """
    try:
        dtype = np.dtype(code) if isinstance(code, str) else None
    except (TypeError, ValueError):
        dtype = None
    if dtype is None or dtype.kind not in _PLAIN_DTYPE_KINDS or dtype.fields is not None or dtype.subdtype is not None:
        raise RefusedState(
            f"numpy dtype {code!r} is not one ds_fastckpt loads: it admits numpy arrays and scalars of bool, "
            "integer, float and complex dtypes only")
    return dtype


class _DtypeByValue:
    """A numpy dtype as a pickle describes it, checked; ``safe_load.load`` swaps it for the dtype it stands for.

    numpy pickles a dtype as ``numpy.dtype(code, align, copy)`` followed by a
    BUILD with ``(3, byteorder, None, None, None, -1, -1, flags)`` (numpy adds
    metadata as a ninth item, version 4, when there is some). Of that only the
    byte order may differ for a plain dtype, so only the byte order is taken.
    """

    def __init__(self, dtype: np.dtype):
        self._as_named = dtype
        self.dtype = dtype

    def __setstate__(self, state):
        self.dtype = self._as_named.newbyteorder(_byteorder(state, self._as_named))


def _byteorder(state, dtype: np.dtype) -> str:
    """The byte order of a numpy dtype's pickled state, if the rest of it is what numpy writes for ``dtype``.

    Raises:
        RefusedState: anything else (sub-arrays, fields, flags, sizes, metadata).
    """
    fits = type(state) is tuple and len(state) in (8, 9)
    if fits:
        version, order, subarray, names, fields, size, alignment, flags, *metadata = state
        fits = (_is_int(version, 3 + len(metadata)) and type(order) is str and order in ("<", ">", "=", "|")
                and subarray is None and names is None and fields is None and _is_int(size, -1)
                and _is_int(alignment, -1) and _is_int(flags, dtype.flags) and metadata in ([], [None]))
    if not fits:
        raise RefusedState(f"the pickled state {_short(state)} of numpy dtype {dtype.str} is not one numpy writes for a "
                       "plain dtype (it may only set the byte order)")
    return order


def _is_int(value, expected: int) -> bool:
    """An exact int check: a pickle's values are compared without running their own ``__eq__``."""
    return type(value) is int and value == expected


def _dtype_of(described) -> np.dtype:
    """The checked dtype a pickle's array or scalar names.

    A ``numpy.dtype`` itself arrives here only where the user's own
    add_safe_globals entry for numpy.dtype took the name; it is rebuilt from
    its kind, size and byte order so nothing else of it reaches numpy.
    """
    if isinstance(described, _DtypeByValue):
        return described.dtype
    if isinstance(described, np.dtype) and described.fields is None and described.subdtype is None:
        return _plain_dtype(described.str)
    raise RefusedState(f"a numpy array or scalar names {described!r} as its dtype")


class _NdarrayName:
    """Stands for ``numpy.ndarray`` in a pickle, where only ``_reconstruct`` may use it: calling it makes nothing.

    The real class would let a pickle call ``numpy.ndarray(shape, dtype, buffer, offset, strides)``.
    """

    def __new__(cls, *args):
        raise RefusedState("a checkpoint may name numpy.ndarray only as the class of a pickled array")


def _empty_array(subtype, shape=None, typecode=None) -> "_ArrayBeingLoaded":
    """Stands for numpy's ``_reconstruct(ndarray, (0,), b'b')``: an empty array, which the BUILD after it fills."""
    del shape, typecode  # the BUILD gives shape and dtype again, checked there
    if subtype is not _NdarrayName:
        raise RefusedState(f"a checkpoint may hold numpy.ndarray arrays only, not {subtype!r}")
    loading.placeholders = getattr(loading, "placeholders", 0) + 1
    return np.ndarray.__new__(_ArrayBeingLoaded, (0, ), np.uint8)


class _ArrayBeingLoaded(np.ndarray):
    """An array a pickle is filling in; ``safe_load.load`` swaps it for a plain ``numpy.ndarray`` copy.

    A subclass so that BUILD calls this ``__setstate__``, which checks the
    state and gives numpy a dtype rebuilt by value; an instance the swap does
    not reach (an argument of a class the user admitted) still works as an array.
    """

    def __setstate__(self, state):
        super().__setstate__(_array_state(state))


def _array_state(state) -> tuple:
    """numpy's ``(1, shape, dtype, fortran_order, data)`` with a checked dtype, and data that fits shape and dtype.

    Raises:
        RefusedState: any other state, e.g. an object array's list.
    """
    if not (type(state) is tuple and len(state) == 5 and _is_int(state[0], 1)):
        raise RefusedState(f"the pickled state of a numpy array is {_short(state)}, not numpy's")
    _, shape, described, fortran_order, data = state
    dtype = _dtype_of(described)
    if not (isinstance(shape, tuple) and all(type(size) is int and size >= 0 for size in shape)):
        raise RefusedState(f"a pickled numpy array has shape {_short(shape)}")
    if type(fortran_order) is not bool or type(data) is not bytes or len(data) != math.prod(shape) * dtype.itemsize:
        raise RefusedState(
            f"a pickled numpy array of shape {shape} and dtype {dtype.str} comes with {_short(data)} as its data")
    return 1, shape, dtype, fortran_order, data


def _checked_scalar(described, data):
    """Stands for numpy's ``scalar(dtype, data)``: the numpy scalar of a checked dtype held in ``data``."""
    dtype = _dtype_of(described)
    if type(data) is not bytes or len(data) != dtype.itemsize:
        raise RefusedState(f"a pickled numpy {dtype.str} scalar comes with {_short(data)} as its data")
    return np.frombuffer(data, dtype=dtype)[0]


def _short(value) -> str:
    """``repr(value)``, cut to fit in a message."""
    text = repr(value)
    return text if len(text) <= 80 else f"{text[:77]}..."


def swapped_back(obj, done: dict):
    """``obj`` with each placeholder in it swapped for its value: containers change in place, tuples are rebuilt.

    Only what changes is written, so objects without placeholders (shared
    ones included) are left untouched. ``done`` maps the id of each object
    seen to it and its result: shared references stay shared, cycles end, and
    holding the originals keeps their ids from being reused meanwhile.
    """
    key = id(obj)
    if key not in done:
        done[key] = (obj, obj)  # a cycle back to obj before it is finished sees obj itself
        done[key] = (obj, _swap(obj, done))
    return done[key][1]


def _swap(obj, done: dict):
    """What ``obj`` becomes: a placeholder's value, a rebuilt tuple, or obj itself with its contents swapped."""
    if isinstance(obj, _DtypeByValue):
        return obj.dtype
    if isinstance(obj, _ArrayBeingLoaded):
        return np.array(obj, subok=False)
    if type(obj) is tuple:
        items = [swapped_back(item, done) for item in obj]
        return tuple(items) if any(new is not old for new, old in zip(items, obj)) else obj
    _swap_inside(obj, done)
    return obj


def _swap_inside(obj, done: dict) -> None:
    """Swaps placeholders held by a list, set, dict or object attributes, in place; tensors hold none."""
    if isinstance(obj, list):
        for index, item in enumerate(obj):
            new = swapped_back(item, done)
            if new is not item:
                obj[index] = new
    elif isinstance(obj, set):
        items = [(item, swapped_back(item, done)) for item in obj]
        if any(new is not old for old, new in items):
            obj.clear()
            obj.update(new for _, new in items)
    elif isinstance(obj, dict):
        _swap_in_dict(obj, done)
    elif not isinstance(obj, (torch.Tensor, type)) and isinstance(getattr(obj, "__dict__", None), dict):
        _swap_in_dict(obj.__dict__, done)  # instances of admitted classes: argparse.Namespace, user classes


def _swap_in_dict(mapping: dict, done: dict) -> None:
    """Swaps placeholders among the keys and values of ``mapping``, keeping their order."""
    items = [(key, value, swapped_back(key, done), swapped_back(value, done)) for key, value in mapping.items()]
    if any(new_key is not key or new_value is not value for key, value, new_key, new_value in items):
        mapping.clear()  # rebuilt so that swapped keys keep their place
        mapping.update((new_key, new_value) for _, _, new_key, new_value in items)
