"""The DeepSpeed checkpoint engine: config, registration in DeepSpeed, the engine and its commit, the background
writer, the collectives between ranks and the verified load.
"""
