"""The native libaio + O_DIRECT op and its Python face: builder, staging memory, writer, reader, fd accounting.

The lowest layer: nothing here imports from the rest of ds_fastckpt.
"""
