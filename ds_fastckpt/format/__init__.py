"""The on-disk format: names, manifest, records, atomic commit, integrity checks, safe loading, tags, the lock.

Everything a tool needs to read or judge a save_dir, without DeepSpeed or the op.
"""
