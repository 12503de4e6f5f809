"""What every dllm command line shares: bad input ends in one line, not a traceback.

    if __name__ == "__main__":
        cli.run(main)

A bad flag or config override (an unknown key, an ill-typed value, a missing config
file or variant) and every error dllm raises itself about its input (a bad value, a
missing file or run, malformed JSON, bad UTF-8, a locked run, an unreadable checkpoint:
a `raise` in a dllm module, whose message names the key, file, line or tensor) print
one line, `error: ...`, on stderr and exit 2 (a run that stops on a non-finite loss or
exhausted data: exit 1). Anything else is a bug and keeps its traceback. Ctrl-C
outside a training loop (which saves first: dllm.checkpoint) exits 130 with one line.
"""
from __future__ import annotations

import linecache
import os
import re
import sys

from absl import app, flags
from ml_collections import config_dict
from ml_collections.config_flags.config_flags import is_config_flag

_DLLM_DIR = os.path.dirname(os.path.abspath(__file__))
_INPUT_ERRORS = (ValueError, KeyError, OSError, RuntimeError, FloatingPointError)


def run(main) -> None:
    """absl's app.run(main), with flags parsed and errors reported as above."""
    try:
        app.run(main, flags_parser=_parse_flags)
    except KeyboardInterrupt:
        _exit("interrupted", 130)
    except _INPUT_ERRORS as e:
        if not raised_by_dllm(e):
            raise
        _exit(message(e), getattr(e, "exit_code", 2))


def raised_by_dllm(error: BaseException) -> bool:
    """Whether `error` comes from a `raise` statement in a dllm module (a message dllm
    wrote about its input), not from inside a library or an implicit failure (a bug)."""
    tb = error.__traceback__
    if tb is None:
        return False
    while tb.tb_next is not None:
        tb = tb.tb_next
    path = os.path.abspath(tb.tb_frame.f_code.co_filename)
    line = linecache.getline(path, tb.tb_lineno).strip()
    return path.startswith(_DLLM_DIR + os.sep) and line.startswith("raise")


def message(error: BaseException) -> str:
    """The error's message on one line (a KeyError's without its quotes; of a message
    holding a traceback, as ml_collections makes them, its last line)."""
    text = error.args[0] if isinstance(error, KeyError) and error.args else str(error)
    lines = [line.strip() for line in str(text).splitlines() if line.strip()]
    if any(line.startswith("Traceback (most recent call last)") for line in lines):
        lines = [re.sub(r"^[\w.]+: ", "", lines[-1])]   # "ValueError: message"
    return " ".join(lines) or type(error).__name__


def _exit(text: str, code: int):
    sys.stderr.write(f"error: {text}\n" if code != 130 else f"{text}\n")
    sys.stderr.flush()
    sys.exit(code)


def _parse_flags(argv: list[str]) -> list[str]:
    """flags.FLAGS(argv), with a missing config file, an unknown or ill-typed config key
    and any other flag error reported in one line."""
    config_args = _config_args(argv)
    for name, value, _ in config_args:
        path = value.split(":", 1)[0]
        if not os.path.isfile(path):
            _exit(f"--{name}={value}: no such config file {path!r}", 2)
    try:
        return flags.FLAGS(argv)
    except flags.Error as e:   # absl: unknown flag, bad value, a config file that raised
        _exit(message(e), 2)
    except Exception as e:  # noqa: BLE001 (ml_collections: an override it cannot apply)
        _exit(_unknown_key(config_args) or message(e), 2)


def _config_args(argv: list[str]) -> list[tuple[str, str, list[str]]]:
    """(flag name, value, override key paths) of each config-file flag given in argv."""
    found = []
    for name in [n for n, f in flags.FLAGS._flags().items() if is_config_flag(f)]:
        values = [a.split("=", 1)[1] for a in argv if a.startswith(f"--{name}=")]
        overrides = [m.group(1) for a in argv
                     if (m := re.match(rf"--(?:no)?{re.escape(name)}\.([^=]+)", a))]
        if values:
            found.append((name, values[-1], overrides))
    return found


def _unknown_key(config_args) -> str | None:
    """A message naming the first override whose key the config does not have."""
    for name, value, overrides in config_args:
        try:
            config = flags.FLAGS[name].parser.parse(value)
        except Exception:  # noqa: BLE001 (reported as it is by the caller)
            return None
        for key in overrides:
            node, parts = config, key.split(".")
            for i, part in enumerate(parts):
                if not isinstance(node, config_dict.ConfigDict) or part not in node:
                    where = ".".join([name, *parts[:i]])
                    keys = sorted(node) if isinstance(node, config_dict.ConfigDict) else []
                    return (f"--{name}.{key}: unknown config key {part!r} in {where}"
                            + (f" (its keys: {', '.join(keys)})" if keys else ""))
                node = node[part]
    return None
