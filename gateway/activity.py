"""What the status page shows: requests per minute by backend and today's usage per team.

Fed by the decision recorder; bounded memory (the last 60 minutes, one day of team totals).
"""

from __future__ import annotations

import time
from collections import defaultdict, deque
from typing import Any

from .record import Decision

MINUTES = 60


class Activity:
    def __init__(self) -> None:
        self.minutes: deque[tuple[int, dict[str, int]]] = deque(maxlen=MINUTES)
        self.day = time.strftime("%Y-%m-%d")
        self.teams: dict[str, dict[str, float]] = defaultdict(lambda: defaultdict(float))

    def observe(self, d: Decision) -> None:
        minute = int(d.at // 60)
        if not self.minutes or self.minutes[-1][0] != minute:
            self.minutes.append((minute, defaultdict(int)))
        self.minutes[-1][1][d.backend or "rejected"] += 1
        today = time.strftime("%Y-%m-%d", time.localtime(d.at))
        if today != self.day:
            self.day, self.teams = today, defaultdict(lambda: defaultdict(float))
        team = self.teams[d.team]
        team["requests"] += 1
        team[f"requests_{d.backend or 'rejected'}"] += 1
        team["tokens_in"] += d.prompt_tokens or d.tokens_in
        team["tokens_out"] += d.tokens_out
        team["cost"] += d.cost
        if d.outcome != "ok":
            team["errors"] += 1

    def per_minute(self) -> list[dict[str, Any]]:
        return [{"minute": m * 60, **counts} for m, counts in self.minutes]

    def usage_today(self) -> dict[str, dict[str, float]]:
        return {team: dict(v) for team, v in self.teams.items()}
