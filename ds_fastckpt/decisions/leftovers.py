"""Which leftovers of interrupted saves and deletions to clean up: a pure decision over records, no I/O.

Separate from the retention policies on purpose: leftovers never count as
checkpoints to keep, and no keep rule applies to them.
"""

from typing import Iterable, List

from ds_fastckpt.format.records import CheckpointRecord, complete_checkpoints


def leftovers_to_delete(records: Iterable[CheckpointRecord]) -> List[CheckpointRecord]:
    """The leftover directories among ``records`` that may go, in the order given.

    A trash directory (a deletion that was interrupted) always goes, and so
    does a spare (its save has taken what it could; rotation may retire a
    newer checkpoint into the spare's place). A
    pending directory goes once a checkpoint committed after it was started
    exists: its save can no longer be the one in progress. A pending
    directory whose start is unknown stays. Damaged directories and those
    that are not ours are never chosen.

    Args:
        records: from ``records.scan``, possibly with ``include_not_ours``.
    """
    records = list(records)
    complete = complete_checkpoints(records)
    newest = complete[-1].manifest.sequence if complete else None
    doomed = []
    for record in records:
        if record.not_ours is not None or record.damaged is not None:
            continue
        if record.leftover in ("trash", "spare"):
            doomed.append(record)
        elif (record.leftover == "pending" and newest is not None and record.after_sequence is not None
              and record.after_sequence < newest):
            doomed.append(record)
    return doomed
