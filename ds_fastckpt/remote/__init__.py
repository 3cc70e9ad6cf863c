"""The remote tier: checkpoints replicated to object storage (or a shared filesystem), and restored from it.

``store`` names the object operations and errors; ``open_store`` (``url``)
picks the implementation from the url: ``s3://bucket/prefix`` (``s3_store``,
boto3) or an absolute path (``fs_store``).
"""
