"""`switchyard key add/revoke`: edit a team's `keys:` list in its policy file, structurally.

A round-trip YAML parser (ruamel.yaml) keeps the file's comments, quoting and order, so a `keys:`
line that carries a comment, a flow list `[a, b]` or an empty `keys:` are all edited as the list
they are — never by appending a second `keys:` block (which YAML reads as "last one wins" and so
silently revokes every existing key). The result is validated as a policy before it replaces the
file, atomically (the hot reload never sees half a file).
"""

from __future__ import annotations

import dataclasses
import io
import os
from pathlib import Path
from typing import Any

from ruamel.yaml import YAML
from ruamel.yaml.comments import CommentedMap, CommentedSeq

from .config import ConfigError, GatewayConfig
from .policies import load_file


def _yaml() -> YAML:
    y = YAML()  # round-trip mode
    y.preserve_quotes = True
    y.width = 4096  # never re-wrap a long line
    y.indent(mapping=2, sequence=4, offset=2)  # the shipped files' "keys:\n  - <hash>" layout
    return y


def _load(path: Path, gateway: GatewayConfig) -> tuple[YAML, CommentedMap]:
    load_file(path, gateway)  # a file that is not a valid policy now is reported, not edited
    y = _yaml()
    data = y.load(path.read_text())
    assert isinstance(data, CommentedMap)  # a valid policy is a mapping
    return y, data


def _save(path: Path, y: YAML, data: Any, gateway: GatewayConfig) -> None:
    out = io.StringIO()
    y.dump(data, out)
    # Not *.yaml: the hot reload only reads *.yaml / *.yml, so it never sees the temporary file.
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(out.getvalue())
    try:
        load_file(tmp, gateway)
    except ConfigError as e:
        tmp.unlink()
        raise ConfigError(dataclasses.replace(i, file=str(path)) for i in e.issues) from e
    os.replace(tmp, path)


def add_key(path: Path, digest: str, gateway: GatewayConfig) -> None:
    """Append `digest` to the file's `keys:` list (creating the list after `team:` if there is none)."""
    y, data = _load(path, gateway)
    keys = data.get("keys")
    if isinstance(keys, list):
        keys.append(digest)
    elif "keys" in data:  # `keys:` with nothing under it (every key revoked)
        data["keys"] = CommentedSeq([digest])
    else:
        at = list(data).index("team") + 1 if "team" in data else 0
        data.insert(at, "keys", CommentedSeq([digest]))
    _save(path, y, data, gateway)


def revoke_keys(path: Path, digest_prefix: str, gateway: GatewayConfig) -> int:
    """Remove every stored hash that starts with `digest_prefix`; returns how many were removed."""
    y, data = _load(path, gateway)
    keys = data.get("keys")
    if not isinstance(keys, list):
        return 0
    doomed = [i for i, h in enumerate(keys) if str(h).lower().startswith(digest_prefix.lower())]
    for i in reversed(doomed):
        del keys[i]
    if doomed:
        _save(path, y, data, gateway)
    return len(doomed)
