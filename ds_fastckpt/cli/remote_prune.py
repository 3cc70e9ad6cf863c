"""``ds-fastckpt prune s3://...``: the remote tier's rotation, run offline.

What goes is chosen as the engine's remote rotation chooses it
(``remote.rotation.choose_remote``: the newest checkpoint and the one
``latest`` names always stay). The leftovers of interrupted uploads go too,
but only those untouched for ``--leftovers-older-than`` seconds: a job
outside this command may be uploading into a tag right now, and its reports
and files look the same as an interrupted upload's until its manifest lands.
"""

import time

from ds_fastckpt.cli.output import say
from ds_fastckpt.cli.remote_target import RemoteTier
from ds_fastckpt.cli.table import age_text
from ds_fastckpt.decisions.retention import RetentionPolicy
from ds_fastckpt.remote.catalog import read_catalog
from ds_fastckpt.remote.rotation import choose_remote, delete_remote, newest_change


def run(args, tier: RemoteTier, policy: RetentionPolicy) -> int:
    store = tier.open()
    try:
        catalog = read_catalog(store)
        choice = choose_remote(catalog, policy)
        leftovers, now = [], time.time()
        for tag in choice.leftovers:
            changed = newest_change(store, tag)
            if changed is None:
                say(f"left {tag} in {tier.url}: an unfinished upload whose age the store does not say")
            elif now - changed < args.leftovers_older_than:
                say(f"left {tag} in {tier.url}: an unfinished upload changed {age_text(now - changed)} ago may still "
                    f"be running (--leftovers-older-than {args.leftovers_older_than:g})")
            else:
                leftovers.append(tag)
        for tag in choice.doomed + leftovers:
            if not args.dry_run:  # one tag at a time, so that a failure leaves each line said true
                delete_remote(store, catalog, [tag] if tag in choice.doomed else [], [tag] if tag in leftovers else [])
            say(f"{'would delete' if args.dry_run else 'deleted'} {tier.url.rstrip('/')}/{tag}")
    finally:
        store.close()
    if not choice.doomed and not leftovers:
        say("nothing to delete")
    return 0
