"""What a backend has shown it can do, learned from its own answers.

llama.cpp reports per response `timings` (`prompt_n` tokens prefilled in `prompt_ms`,
`predicted_per_second`); providers show their time to first byte. Rates fall with prompt length
(attention grows with it), so prefill is learned per prompt-length band. Each figure is an
exponentially decayed average — recent answers count most, so the rates follow a machine that
gets busier or a provider that slows down — and the whole book is persisted under the data dir so
a restart starts informed.
"""

from __future__ import annotations

import json
import logging
import os
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

log = logging.getLogger("switchyard")

BANDS = (1024, 4096, 16384, 65536)  # upper bounds of prompt-length bands (tokens); the last is open
ALPHA = 0.3  # weight of the newest sample


def band_of(tokens: int) -> int:
    for i, top in enumerate(BANDS):
        if tokens <= top:
            return i
    return len(BANDS)


def _ewma(old: float | None, new: float) -> float:
    return new if old is None else old + ALPHA * (new - old)


@dataclass
class Speeds:
    prefill: dict[int, float] = field(default_factory=dict)  # band -> tokens/s
    decode: float | None = None  # tokens/s
    first_byte: float | None = None  # seconds (providers: the whole wait before the first byte)
    service: float | None = None  # seconds a request holds the backend, first byte to last
    samples: int = 0

    def observe_prefill(self, tokens: int, seconds: float) -> None:
        if tokens >= 16 and seconds > 0:  # a handful of tokens times overhead, not prefill
            b = band_of(tokens)
            self.prefill[b] = _ewma(self.prefill.get(b), tokens / seconds)
            self.samples += 1

    def observe_decode(self, per_second: float) -> None:
        if per_second > 0:
            self.decode = _ewma(self.decode, per_second)

    def observe_first_byte(self, seconds: float) -> None:
        if seconds >= 0:
            self.first_byte = _ewma(self.first_byte, seconds)
            self.samples += 1

    def observe_service(self, seconds: float) -> None:
        if seconds >= 0:
            self.service = _ewma(self.service, seconds)

    def prefill_rate(self, tokens: int) -> float | None:
        """tokens/s for a prompt of this length: its band's figure, else the nearest band's."""
        if not self.prefill:
            return None
        b = band_of(tokens)
        nearest = min(self.prefill, key=lambda k: (abs(k - b), -k))
        return self.prefill[nearest]

    def as_dict(self) -> dict[str, Any]:
        return {"prefill": {str(k): round(v, 3) for k, v in self.prefill.items()}, "decode": self.decode,
                "first_byte": self.first_byte, "service": self.service, "samples": self.samples}

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> Speeds:
        return cls({int(k): float(v) for k, v in (d.get("prefill") or {}).items()}, d.get("decode"),
                   d.get("first_byte"), d.get("service"), int(d.get("samples") or 0))


class SpeedBook:
    """Every backend's Speeds, persisted as one small JSON file (read at build, written by the runtime)."""

    def __init__(self, path: Path | None) -> None:
        self.path = path
        self.by_backend: dict[str, Speeds] = {}
        if path is not None:
            try:
                data = json.loads(path.read_text())
                self.by_backend = {k: Speeds.from_dict(v) for k, v in data.items() if isinstance(v, dict)}
            except FileNotFoundError:
                pass
            except (OSError, ValueError, TypeError) as e:
                log.warning("ignoring unreadable speeds file %s: %s", path, e)

    def of(self, backend: str) -> Speeds:
        return self.by_backend.setdefault(backend, Speeds())

    def save(self) -> None:
        if self.path is None or not self.by_backend:
            return
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            fd, tmp = tempfile.mkstemp(dir=self.path.parent, prefix=".speeds")
            with os.fdopen(fd, "w") as f:
                json.dump({k: v.as_dict() for k, v in self.by_backend.items()}, f)
            os.replace(tmp, self.path)
        except OSError as e:  # a full disk must not fail anything: the rates stay in memory
            log.warning("could not persist learned speeds to %s: %s", self.path, e)


def speeds_path(data_dir: str) -> Path:
    return Path(os.path.expanduser(data_dir)) / "speeds.json"
