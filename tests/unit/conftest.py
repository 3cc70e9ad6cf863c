"""Pure unit tests: records, decisions and parsers on files in a tmp dir, without the op or a DeepSpeed engine."""
