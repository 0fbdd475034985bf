"""The error every layer raises for input a user can fix (the bottom layer, so that any package can raise it), and
the reader of user-given JSON files that turns their failures into it."""

import json
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
