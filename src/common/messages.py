"""The fixes an error line prints: command-line overrides that work when pasted as printed.

Every package raises its mistakes as one line naming the option and the fix (src/run/cli.py turns
them into `error: ...`); these make the fix part.
"""

from __future__ import annotations

import shlex
from collections.abc import Sequence
from typing import Any

from hydra.core.override_parser.overrides_parser import OverridesParser
from hydra.errors import HydraException


def override(key: str, value: Any) -> str:
    """`key=value` as it is typed in a shell, so that a printed fix works when pasted: None is
    `null`, text that Hydra would read as something else (a number, true, a list) is quoted for
    Hydra, and spaces or quotes for the shell."""
    if value is None or isinstance(value, bool):
        text = {None: "null", True: "true", False: "false"}[value]
    else:
        text = str(value)
        if isinstance(value, str) and _parsed(key, text) != text:
            text = "'" + text.replace("'", "\\'") + "'"
    arg = f"{key}={text}"
    if shlex.quote(arg) == arg or any(c in arg for c in '"$`\\!'):
        return shlex.quote(arg)
    return f'"{arg}"'  # reads better than shlex's quoting of single quotes


def _parsed(key: str, text: str) -> Any:
    try:
        return OverridesParser.create().parse_override(f"{key}={text}").value()
    except HydraException:
        return None


def one_of(key: str, value: Any, choices: Sequence[Any], why: str = "") -> str:
    """The message for an option outside its few choices, each choice an override to paste:
    "data.fewshot_sampler='x': use data.fewshot_sampler=reference or data.fewshot_sampler=sorted"."""
    options = [override(key, choice) for choice in choices]
    listed = options[0] if len(options) == 1 else f"{', '.join(options[:-1])} or {options[-1]}"
    return f"{key}={value!r}: use {listed}{f' ({why})' if why else ''}"
