"""Unpickling checkpoints without running code: ``weights_only=True`` plus an allowlist of data-only types.

DeepSpeed's own engine loads with ``weights_only=False``: a checkpoint file
replaced by a pickle whose ``__reduce__`` runs a command runs it. Here every
file goes through torch's weights_only unpickler, which admits torch's own
safe set and the data-only types of ``ds_fastckpt.format.safe_globals`` (which says
what they are and why admitting each is safe).

``trusted_pickles`` in the config opts out, for trusted checkpoints holding
other objects; ``torch.serialization.add_safe_globals`` admits a class for
every load instead. ``UnsafeCheckpointError`` says which of the two a refused
file needs, and when the file is more likely damaged or tampered with.
"""

import contextlib
import enum
import functools
import pickle
import pickletools
import re
import sys

import numpy as np
import torch

from ds_fastckpt.format.safe_globals import (CLIENT_STATE_BY_VALUE, DEEPSPEED_BY_VALUE, RefusedState, allowed_globals,
                                             loading, pickled_names, swapped_back)


class UnsafeCheckpointError(pickle.UnpicklingError):
    """A checkpoint file wants to unpickle something outside the allowlist; nothing of it was run."""


def load(source, *, path, map_location=None, trusted: bool = False):
    """``torch.load`` of ``source`` (a path or file object read from ``path``), safely unless ``trusted``.

    Raises:
        UnsafeCheckpointError: naming the file, the global it asked for, and
            the line that admits it, or why the file looks damaged.
    """
    if trusted:
        return torch.load(source, map_location=map_location, weights_only=False)
    with _admitted(allowed_globals()):
        loading.placeholders = 0
        try:
            loaded = torch.load(source, map_location=map_location, weights_only=True)
        except pickle.UnpicklingError as error:
            # Built here, where the allowlist is still in place for the listing of what else the file wants.
            raise _refusal(source, path, error) from None
    return swapped_back(loaded, {}) if loading.placeholders else loaded


@contextlib.contextmanager
def _admitted(entries: list):
    """``torch.serialization.safe_globals`` of the entries not already there.

    Leaving out those present keeps the user's own add_safe_globals entries
    when the context removes what it added.
    """
    present = set(torch.serialization.get_safe_globals())
    with torch.serialization.safe_globals([entry for entry in entries if entry not in present]):
        yield


_REFUSED_GLOBAL = re.compile(r"GLOBAL (\S+) was not an allowed global by default")
_BLOCKED_GLOBAL = re.compile(r"GLOBAL (\S+) whose module \S+ is blocked")
# BUILD and NEWOBJ name the refused type by its repr: <class 'module.Name'>, <enum 'Name'>, <class 'type'>.
_REFUSED_TYPE = re.compile(r"Can only (?:build|create new object) .*?but got <(\w+) '([^']+)'>")
_UNSUPPORTED_OPCODE = re.compile(r"Unsupported operand (\d+)")
_TORCH_ADVICE = re.compile(r"\s*(Please use `torch\.serialization\.add_safe_globals|Please file an issue|Check the "
                           r"documentation of torch\.load).*", re.DOTALL)

_TRUSTED = ("set checkpoint.fast_aio.trusted_pickles=true to load checkpoints as full pickles (a tampered file then "
            "runs its code)")
_DAMAGE = "damaged or tampered with; checkpoint.fast_aio.verify='checksum' detects damage"


def _refusal(source, path, error: pickle.UnpicklingError) -> UnsafeCheckpointError:
    """The error for a refused file: what it asked for and the line that admits it, or why it looks forged."""
    original = _unpickler_error(error)
    message = str(original)
    if isinstance(original, RefusedState):
        return UnsafeCheckpointError(_refused_text(path, message))
    blocked = _BLOCKED_GLOBAL.search(message)
    if blocked:
        return UnsafeCheckpointError(_blocked_text(path, blocked.group(1)))
    refused = _REFUSED_GLOBAL.search(message)
    if refused:
        wanted = _unsafe_globals(source)
        hostile = [name for name in wanted if _in_blocked_module(name)]
        if hostile:  # admitting the global refused first would only lead to this one
            return UnsafeCheckpointError(_blocked_text(path, hostile[0]))
        return UnsafeCheckpointError(_admit_text(path, refused.group(1), wanted, f"asks for {refused.group(1)}"))
    built = _REFUSED_TYPE.search(message)
    if built and not _state_is_forged(*built.groups()):
        name = built.group(2)
        return UnsafeCheckpointError(_admit_text(path, name, [], f"sets the state of a {name} object"))
    return UnsafeCheckpointError(_refused_text(path, _reason(message)))


def _unpickler_error(error: pickle.UnpicklingError) -> BaseException:
    """The error of torch's unpickler or of safe_globals' checks, without torch.load's advice around it.

    torch.load re-raises the unpickler's error with advice for its own callers
    (re-run torch.load with weights_only=False) ``from None``, which keeps the
    original as ``__context__``.
    """
    return error.__context__ if isinstance(error.__context__, pickle.UnpicklingError) else error


def _admit_text(path, name: str, others: list, what: str) -> str:
    names = [name] + sorted(set(others) - {name})
    also = f" (and {', '.join(names[1:])})" if len(names) > 1 else ""
    return (f"refused to load {path}: its pickle {what}{also}, which is outside what ds_fastckpt loads (DeepSpeed's "
            "checkpoint classes, common data-only client_state types, torch's weights_only set); loading stopped "
            f"there and nothing of it ran. If you trust this file, admit {name} before load_checkpoint with\n"
            f"    torch.serialization.add_safe_globals([{', '.join(names)}])\nor {_TRUSTED}. If the checkpoint "
            f"should not hold {name}, the file may be {_DAMAGE}.")


def _blocked_text(path, name: str) -> str:
    return (f"refused to load {path}: its pickle asks for {name}, which torch never lets a weights_only load call "
            "(add_safe_globals cannot admit it); loading stopped there and it did not run. A checkpoint has no "
            f"reason to call {name}: the file is {_DAMAGE}. Only checkpoint.fast_aio.trusted_pickles=true would "
            "load it, and that would run the call.")


def _refused_text(path, reason: str) -> str:
    return (f"refused to load {path}: {reason}; loading stopped there and nothing outside the allowlist ran. If "
            f"the checkpoint is intact and you trust it, {_TRUSTED}. Otherwise the file may be {_DAMAGE}.")


def _reason(message: str) -> str:
    """What torch's unpickler refused, as a clause."""
    opcode = _UNSUPPORTED_OPCODE.search(message)
    if opcode:
        number = int(opcode.group(1))
        name = getattr(pickletools.code2op.get(chr(number)), "name", "unknown")
        return (f"its pickle holds opcode {number} ({name}), which torch.save does not write and weights_only "
                "loading does not read")
    built = _REFUSED_TYPE.search(message)
    if built:
        return f"its pickle sets the state of {_refused_object(*built.groups())}, which no honest pickle does"
    lines = _TORCH_ADVICE.sub("", message).strip().splitlines()
    return f"torch's weights_only unpickler refused its pickle ({lines[0] if lines else 'no reason given'})"


def _refused_object(kind: str, name: str) -> str:
    """What a refused BUILD or NEWOBJ was applied to, in words."""
    if kind == "enum":
        return f"a {name} enum member (members are shared by the whole process)"
    cls = _loaded_class(name)
    if isinstance(cls, type) and issubclass(cls, type):
        return f"a class object (of type {name})"
    return f"a {name} object"


def _state_is_forged(kind: str, name: str) -> bool:
    """Whether a refused BUILD or NEWOBJ on a ``kind`` (class, enum) named ``name`` can only come from a forged file.

    Honest pickles never set the state of a class object, an enum member, a
    numpy scalar, or the types safe_globals admits by value (built from their arguments):
    admitting their class would only open it to that (an enum's members, and
    numpy's True_ and False_, are shared by the whole process).
    """
    by_value = {f"{module}.{cls}" for module, cls in DEEPSPEED_BY_VALUE}
    by_value.update(pickled for cls in CLIENT_STATE_BY_VALUE for pickled in pickled_names(cls))
    if kind != "class" or name in by_value:
        return True
    cls = _loaded_class(name)
    return isinstance(cls, type) and issubclass(cls, (type, enum.Enum, np.generic))


def _loaded_class(name: str):
    """The object ``name`` ("module.Qual.Name", or a builtin's bare name) names in a loaded module; None if none.

    Nothing is imported: the object of a refused BUILD existed, so its class's module is loaded.
    """
    parts = name.split(".") if "." in name else ["builtins", name]
    for split in range(len(parts) - 1, 0, -1):
        module = sys.modules.get(".".join(parts[:split]))
        if module is not None:
            return functools.reduce(lambda obj, attribute: getattr(obj, attribute, None), parts[split:], module)
    return None


def _in_blocked_module(name: str) -> bool:
    """Whether torch refuses ``name`` whatever the allowlist says (its modules sys, os, posix, nt)."""
    from torch import _weights_only_unpickler  # private: only to tell such names apart in the message

    return name.rpartition(".")[0] in getattr(_weights_only_unpickler, "_blocklisted_modules", ())


def _unsafe_globals(source) -> list:
    """Every global of the checkpoint outside the allowlist, to name them all at once; [] where torch cannot tell.

    ``get_unsafe_globals_in_checkpoint`` reads the pickle without running it.
    """
    try:
        if hasattr(source, "seek"):
            source.seek(0)
        return torch.serialization.get_unsafe_globals_in_checkpoint(source)
    except Exception:  # only a listing for the message: a file torch's scanner cannot read just lists nothing
        return []
