"""Test hooks that make a save fail on purpose: syscall faults in the op and named crash points in Python.

Inert unless a test arms them; they sit just above the op so that every layer above can name a point.
"""
