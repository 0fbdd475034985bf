"""The error every layer raises for input a user can fix, the one range rule every setting and script argument is
checked with (``check_range``, ``broken_rule``), and the reader of user-given JSON files. The bottom layer, so
that any package can use them: ``atmanrl.config``'s sections, ``SaliencyConfig`` and the scripts' arguments all
say a broken range the same way ("NAME=VALUE must be RULE (why)")."""

import json
import math
from pathlib import Path


class UserError(Exception):
    """Input a user can fix: the message names the file, key or limit and what to do. Scripts print it as one
    sentence and exit with code 2, without a traceback."""


def read_json(path, fix: str, label: str = ""):
    """The JSON value in the file at ``path``. A file that cannot be read, is not UTF-8 or is not valid JSON is a
    ``UserError``: one sentence naming the file (and line or byte), ``label`` (e.g. the flag that named it) in front,
    and ``fix``, what to pass instead."""
    head = f"{label}: " if label else ""
    try:
        return json.loads(Path(path).read_bytes().decode("utf-8"))
    except OSError as e:
        raise UserError(f"{head}cannot read {path} ({e.strerror}); {fix}") from None
    except UnicodeDecodeError as e:
        raise UserError(f"{head}{path}, byte {e.start}: not UTF-8 text; {fix}") from None
    except json.JSONDecodeError as e:
        raise UserError(f"{head}{path}, line {e.lineno}: not valid JSON ({e.msg}); {fix}") from None


def broken_rule(value, low=None, high=None, *, low_open=False, high_open=False) -> str | None:
    """The range rule ``value`` breaks ("must be > 0", "must be in (0, 1]", "must be a finite number"), or None."""
    if isinstance(value, float) and not math.isfinite(value):
        return "must be a finite number"
    if low is not None and high is not None:
        rule = f"must be in {'(' if low_open else '['}{low:g}, {high:g}{')' if high_open else ']'}"
    elif low is not None:
        rule = f"must be {'>' if low_open else '>='} {low:g}"
    else:
        rule = f"must be {'<' if high_open else '<='} {high:g}"
    too_low = low is not None and (value < low or (low_open and value == low))
    too_high = high is not None and (value > high or (high_open and value == high))
    return rule if too_low or too_high else None


def check_range(name: str, value, low=None, high=None, *, low_open=False, high_open=False, none_ok=False,
                why: str = "") -> None:
    """Raise ``ValueError("NAME=VALUE must be RULE (why)")`` when ``value`` is outside the range; ``none_ok``: None
    (YAML null) is allowed and the message says so."""
    if value is None and none_ok:
        return
    rule = "must be a number" if value is None else broken_rule(value, low, high, low_open=low_open,
                                                                 high_open=high_open)
    if rule is not None:
        raise ValueError(f"{name}={value!r} {rule}" + (", or null" if none_ok else "") + (f" ({why})" if why else ""))
