"""Injects the fast_aio checkpoint engine into every DeepSpeed config of this process.

Put this folder on PYTHONPATH (run.sh does) and every Python process started with it,
including the multiprocessing forkserver/spawn workers of DeepSpeed's unit tests,
imports ``ds_fastckpt`` as soon as it imports ``deepspeed`` (not before: the many Python
subprocesses that never import DeepSpeed, such as py-cpuinfo's probe run by DeepSpeed's CPU op
builders, stay as fast as without this file) and wraps ``deepspeed.initialize`` so that the config it is given
(``config=``, ``config_params=``, ``args.deepspeed_config`` or ``args.deepscale_config``;
a dict, a JSON/HJSON file path or a base64 string) gets

    "checkpoint": {"engine": "fast_aio", "fast_aio": {"keep_last": 0}}

merged in; other keys of an existing ``checkpoint`` section are kept. The caller's
dict is never mutated (a shallow copy is passed on). A config is left alone when it
sets ``checkpoint.writer`` (DeepSpeed's FastCheckpointEngine, which fast_aio refuses),
``checkpoint.engine`` (any engine, fast_aio included) or enables ``datastates_ckpt``.

Every decision is appended as one line to the file named by ``DS_FASTCKPT_INJECT_LOG``
(when set): ``injected <pid> <source>`` or ``left-alone <pid> <source> <reason>``,
so a run can prove that injection happened. Set ``DS_FASTCKPT_INJECT_DISABLE=1`` to
turn everything off.
"""

import os
import sys

_LOG_ENV = "DS_FASTCKPT_INJECT_LOG"
_MARK = "_ds_fastckpt_injecting_wrapper"
INJECTED_SECTION = {"engine": "fast_aio", "fast_aio": {"keep_last": 0}}


def _log(line):
    path = os.environ.get(_LOG_ENV)
    if not path:
        return
    # One short write per line on an O_APPEND descriptor: lines of concurrent ranks do not interleave.
    fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
    try:
        os.write(fd, (line + "\n").encode())
    finally:
        os.close(fd)


def _leave_alone_reason(config):
    section = config.get("checkpoint")
    if section is not None and not isinstance(section, dict):
        return f"checkpoint section is a {type(section).__name__}"
    section = section or {}
    if section.get("writer") is not None:
        return "checkpoint.writer is set"
    if "engine" in section:
        return f"checkpoint.engine={section['engine']!r} is set"
    datastates = config.get("datastates_ckpt")
    if datastates is not None and datastates is not False:
        return "datastates_ckpt is set"
    return None


def inject(config, source):
    """A new config dict with fast_aio merged in, or ``config`` itself when it is left alone."""
    from deepspeed.runtime.tensor_parallel.init_utils import load_ds_config  # DeepSpeed's own loader

    loaded = load_ds_config(config)
    if not isinstance(loaded, dict):
        _log(f"left-alone {os.getpid()} {source} config is a {type(loaded).__name__}")
        return config
    reason = _leave_alone_reason(loaded)
    if reason is not None:
        _log(f"left-alone {os.getpid()} {source} {reason}")
        return config
    section = dict(loaded.get("checkpoint") or {})
    section["engine"] = INJECTED_SECTION["engine"]
    section["fast_aio"] = {**INJECTED_SECTION["fast_aio"], **(section.get("fast_aio") or {})}
    merged = dict(loaded)
    merged["checkpoint"] = section
    _log(f"injected {os.getpid()} {source}")
    return merged


def _wrap_initialize(original):
    import functools
    import inspect

    signature = inspect.signature(original)

    @functools.wraps(original)
    def initialize(*args, **kwargs):
        try:
            bound = signature.bind(*args, **kwargs)
        except TypeError:
            return original(*args, **kwargs)  # let DeepSpeed report the bad call
        arguments = bound.arguments
        ds_args = arguments.get("args")
        restore = None
        # The same precedence as deepspeed.initialize: config, then config_params, then
        # args.deepscale_config / args.deepspeed_config (DeepSpeed asserts if both kinds are given).
        if arguments.get("config") is not None:
            arguments["config"] = inject(arguments["config"], "config=")
        elif arguments.get("config_params") is not None:
            arguments["config_params"] = inject(arguments["config_params"], "config_params=")
        else:
            for attribute in ("deepscale_config", "deepspeed_config"):
                value = getattr(ds_args, attribute, None)
                if value is not None:
                    new_value = inject(value, f"args.{attribute}")
                    if new_value is not value:
                        setattr(ds_args, attribute, new_value)
                        restore = (attribute, value, new_value)
                    break
            else:
                _log(f"left-alone {os.getpid()} none no config given")
        try:
            return original(*bound.args, **bound.kwargs)
        finally:
            if restore is not None:
                # Give the caller its args back as it passed them (DeepSpeed may have moved
                # deepscale_config into deepspeed_config).
                attribute, value, new_value = restore
                for name in ("deepscale_config", "deepspeed_config"):
                    if getattr(ds_args, name, None) is new_value:
                        setattr(ds_args, name, None)
                setattr(ds_args, attribute, value)

    setattr(initialize, _MARK, True)
    return initialize


def _install():
    import deepspeed

    import ds_fastckpt  # noqa: F401  registers the fast_aio engine

    if not getattr(deepspeed.initialize, _MARK, False):
        deepspeed.initialize = _wrap_initialize(deepspeed.initialize)


def _chain_shadowed_sitecustomize():
    """Runs the sitecustomize this one shadows, if any, as Python would have without us."""
    import importlib.machinery
    import importlib.util

    here = os.path.dirname(os.path.abspath(__file__))
    rest = [p for p in sys.path if os.path.abspath(p or ".") != here]
    spec = importlib.machinery.PathFinder.find_spec("sitecustomize", rest)
    if spec is None or spec.loader is None:
        return
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)


def _install_guarded():
    try:
        _install()
    except Exception as error:  # never break the caller's import; the log shows it
        print(f"ds_fastckpt sitecustomize: not installed: {error!r}", file=sys.stderr)
        _log(f"install-failed {os.getpid()} {error!r}")


class _AfterDeepSpeedImport:
    """A meta path finder that runs ``_install`` right after ``deepspeed`` itself has been executed."""

    def find_spec(self, fullname, path=None, target=None):
        if fullname != "deepspeed":
            return None
        import importlib.util

        if self in sys.meta_path:
            sys.meta_path.remove(self)  # once; and find_spec below must not come back here
        spec = importlib.util.find_spec(fullname)
        if spec is None or spec.loader is None or not hasattr(spec.loader, "exec_module"):
            return spec
        exec_module = spec.loader.exec_module

        def exec_then_install(module):
            exec_module(module)
            _install_guarded()

        spec.loader.exec_module = exec_then_install
        return spec


if os.environ.get("DS_FASTCKPT_INJECT_DISABLE") != "1":
    if "deepspeed" in sys.modules:
        _install_guarded()
    else:
        sys.meta_path.insert(0, _AfterDeepSpeedImport())
_chain_shadowed_sitecustomize()
