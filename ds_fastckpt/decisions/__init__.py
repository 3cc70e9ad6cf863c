"""Decisions over a save_dir's records: what to keep, what to delete and how, whether a save fits, what to resume,
whether descriptors leaked. Pure choices are separate from the small steps that act on them.
"""
