"""Which checkpoints rotation deletes: a pure decision over checkpoint records, no I/O."""

from typing import Iterable, List

from ds_fastckpt.format.records import CheckpointRecord, complete_checkpoints


def checkpoints_to_delete(records: List[CheckpointRecord], keep_last: int, keep_every: int,
                          protected_tags: Iterable[str] = ()) -> List[CheckpointRecord]:
    """The records rotation should delete.

    Complete checkpoints beyond the newest ``keep_last`` by commit order go,
    except those whose step is a multiple of ``keep_every``, the newest one,
    and any tag in ``protected_tags`` (the one just committed, the one
    ``latest`` names). ``keep_last`` 0 keeps every complete checkpoint.
    Leftovers do not count toward ``keep_last``: a pending one goes once a
    checkpoint committed after it was started exists; a trash one always goes.
    Damaged directories are never chosen.

    Args:
        records: from ``records.scan``.
        keep_last: complete checkpoints to keep; 0 keeps all.
        keep_every: keep steps that are multiples of this; 0 turns it off.
        protected_tags: tags never to delete.
    """
    protected = set(protected_tags)
    complete = complete_checkpoints(records)
    doomed = []
    if keep_last > 0 and complete:
        protected.add(complete[-1].tag)
        for record in complete[:-keep_last]:
            step = record.manifest.step
            milestone = keep_every > 0 and step is not None and step % keep_every == 0
            if not milestone and record.tag not in protected:
                doomed.append(record)
    newest = complete[-1].manifest.sequence if complete else None
    for record in records:
        if record.leftover == "trash":
            doomed.append(record)
        elif (record.leftover == "pending" and newest is not None and record.after_sequence is not None
              and record.after_sequence < newest):
            doomed.append(record)
    return doomed
