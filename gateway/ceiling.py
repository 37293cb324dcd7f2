"""The learned crash ceiling: one crash of the local server on an N-token request teaches us N.

Later requests at or above `fraction * N` skip that backend, so one segfault becomes zero. Kept in
a small JSON file under the data dir so it survives restarts; `switchyard ceiling show|reset`.
Small requests never teach a ceiling (`learn_min_tokens`): a crash on a 30-token chat is a killed
or broken server, not a size limit, and must not push all traffic away from local.
"""

from __future__ import annotations

import json
import logging
import os
import tempfile
import time
from pathlib import Path
from typing import Any

log = logging.getLogger("switchyard")


class CrashCeilings:
    def __init__(self, path: Path) -> None:
        self.path = path
        self.entries: dict[str, dict[str, Any]] = {}
        self.load()

    def load(self) -> None:
        try:
            data = json.loads(self.path.read_text())
            self.entries = {k: v for k, v in data.items() if isinstance(v, dict) and "tokens" in v}
        except FileNotFoundError:
            self.entries = {}
        except (OSError, ValueError) as e:
            log.warning("ignoring unreadable crash-ceiling file %s: %s", self.path, e)
            self.entries = {}

    def get(self, backend: str) -> int | None:
        entry = self.entries.get(backend)
        return int(entry["tokens"]) if entry else None

    def learn(self, backend: str, tokens: int) -> bool:
        current = self.get(backend)
        if current is not None and current <= tokens:
            return False
        self.entries[backend] = {"tokens": tokens, "at": time.time()}
        self._save()
        log.warning("learned crash ceiling for %s: %d tokens", backend, tokens)
        return True

    def reset(self, backend: str | None = None) -> None:
        if backend is None:
            self.entries.clear()
        else:
            self.entries.pop(backend, None)
        self._save()

    def _save(self) -> None:
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            fd, tmp = tempfile.mkstemp(dir=self.path.parent, prefix=".ceiling")
            with os.fdopen(fd, "w") as f:
                json.dump(self.entries, f)
            os.replace(tmp, self.path)
        except OSError as e:  # a full disk must not fail a request; we keep it in memory
            log.warning("could not persist crash ceiling to %s: %s", self.path, e)


def state_path(data_dir: str) -> Path:
    return Path(os.path.expanduser(data_dir)) / "crash-ceilings.json"
