"""What a backend has shown it can do, learned from its own answers.

llama.cpp reports per response `timings` (`prompt_n` tokens prefilled in `prompt_ms`,
`predicted_per_second`); providers show their time to first byte. Rates fall with prompt length
(attention grows with it), so prefill is learned per prompt-length band. Each figure is the median
of its last few samples — recent answers only, so the rates follow a machine that gets busier or a
provider that slows down within a few requests, and one answer slowed by a burst elsewhere on the box
does not move it (an average did: one 1.8 s outlier put the next three predictions 60-145 % off on
the replay) — and the whole book is persisted under the data dir so a restart starts informed.
"""

from __future__ import annotations

import json
import logging
import os
import statistics
import tempfile
from collections import deque
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

log = logging.getLogger("switchyard")

BANDS = (1024, 4096, 16384, 65536)  # upper bounds of prompt-length bands (tokens); the last is open
WINDOW = 7  # samples each figure is the median of
# A rate is learned from real prefills only: a turn that continues a cached prefix processes a few dozen
# tokens in one small batch against a long context, slower per token and mostly fixed cost (measured on
# SmolLM2 here: 66 new tokens after 1,100 cached took 1.6 s, 1,123 cold tokens 9.7 s). That fixed part is
# learned apart, as `overhead`, so `uncached / rate + overhead` fits both.
RATE_MIN_TOKENS = 256


def band_of(tokens: int) -> int:
    for i, top in enumerate(BANDS):
        if tokens <= top:
            return i
    return len(BANDS)


@dataclass
class Speeds:
    prefill: dict[int, float] = field(default_factory=dict)  # band -> tokens/s
    decode: float | None = None  # tokens/s
    first_byte: float | None = None  # seconds (providers: the whole wait before the first byte)
    service: float | None = None  # seconds a request holds the backend, first byte to last
    samples: int = 0
    overhead: float | None = None  # seconds a prefill takes beyond its tokens at the band's rate
    bytes_per_token: float | None = None  # message bytes per prompt token, as this server counts (sizing.py)
    tool_tokens: float | None = None  # tokens the tool schemas add to a prompt (0 where the template drops them)
    _recent: dict[str, deque[float]] = field(default_factory=dict, repr=False, compare=False)

    def _median(self, key: str, old: float | None, new: float) -> float:
        """The figure after this sample: the median of the last WINDOW (seeded with the persisted value)."""
        window = self._recent.get(key)
        if window is None:
            window = self._recent[key] = deque([] if old is None else [old], maxlen=WINDOW)
        window.append(new)
        return statistics.median(window)

    def observe_prefill(self, tokens: int, seconds: float) -> None:
        if seconds <= 0 or tokens <= 0:
            return
        if tokens >= RATE_MIN_TOKENS or (not self.prefill and tokens >= 16):  # bootstrap from what there is
            b = band_of(tokens)
            # the fixed part is counted once, in `overhead`: the rate is what the tokens themselves take
            work = max(seconds - (self.overhead or 0.0), seconds / 2)
            self.prefill[b] = self._median(f"prefill{b}", self.prefill.get(b), tokens / work)
            self.samples += 1
            return
        rate = self.prefill_rate(tokens)
        if rate:  # a small batch: what it took beyond its tokens at the rate is the fixed part
            self.overhead = self._median("overhead", self.overhead, max(0.0, seconds - tokens / rate))

    def prefill_seconds(self, uncached: int, total: int) -> float | None:
        """Time to prefill `uncached` new tokens of a `total`-token prompt (the rest from the cache)."""
        rate = self.prefill_rate(max(total, uncached))
        if not rate:
            return None
        return uncached / rate + (self.overhead or 0.0)

    def observe_decode(self, per_second: float) -> None:
        if per_second > 0:
            self.decode = self._median("decode", self.decode, per_second)

    def observe_first_byte(self, seconds: float) -> None:
        if seconds >= 0:
            self.first_byte = self._median("first_byte", self.first_byte, seconds)
            self.samples += 1

    def observe_service(self, seconds: float) -> None:
        if seconds >= 0:
            self.service = self._median("service", self.service, seconds)

    def prefill_rate(self, tokens: int) -> float | None:
        """tokens/s for a prompt of this length: its band's figure, else the nearest band's."""
        if not self.prefill:
            return None
        b = band_of(tokens)
        nearest = min(self.prefill, key=lambda k: (abs(k - b), -k))
        return self.prefill[nearest]

    def as_dict(self) -> dict[str, Any]:
        return {"prefill": {str(k): round(v, 3) for k, v in self.prefill.items()}, "decode": self.decode,
                "first_byte": self.first_byte, "service": self.service, "samples": self.samples,
                "overhead": self.overhead, "bytes_per_token": self.bytes_per_token, "tool_tokens": self.tool_tokens}

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> Speeds:
        return cls({int(k): float(v) for k, v in (d.get("prefill") or {}).items()}, d.get("decode"),
                   d.get("first_byte"), d.get("service"), int(d.get("samples") or 0), d.get("overhead"),
                   d.get("bytes_per_token"), d.get("tool_tokens"))


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
