"""What each llama.cpp slot holds: a fingerprint of the prompt prefix it last processed.

Switchyard sends every request the local server sees, so it can remember, per slot, the chain of
hashes of the last prompt's messages (tools and system first: templates render them at the top) and
how many tokens that prompt was. A new request's cached tokens are predicted from the longest
matching chain — the tokens of the matching messages, scaled by their share of the last prompt's
bytes — and the prediction is checked against llama.cpp's own `timings.cache_n`.
"""

from __future__ import annotations

import hashlib
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from .. import wirejson
from .sizing import PromptSizer
from .speed import Speeds


@dataclass(frozen=True, slots=True)
class Prefix:
    hashes: tuple[bytes, ...]  # cumulative: hashes[i] covers tools + messages[0..i]
    sizes: tuple[int, ...]  # cumulative bytes up to each message
    tool_bytes: int = 0  # the tool schemas' JSON (templates that render them put them first)

    def common(self, other: Prefix) -> int:
        """How many leading messages the two prompts share."""
        n = 0
        for a, b in zip(self.hashes, other.hashes, strict=False):
            if a != b:
                break
            n += 1
        return n


def fingerprint(body: dict[str, Any]) -> Prefix:
    h = hashlib.blake2b(digest_size=16)
    tool_bytes = 0
    if body.get("tools"):
        tools = wirejson.dumps(body["tools"], sort_keys=True)
        h.update(tools)
        tool_bytes = len(tools)
    hashes, sizes, total = [], [], 0
    for m in body.get("messages") or ():
        piece = wirejson.dumps(m, sort_keys=True)
        h.update(piece)
        total += len(piece)
        hashes.append(h.copy().digest())
        sizes.append(total)
    return Prefix(tuple(hashes), tuple(sizes), tool_bytes)


@dataclass
class Held:
    prefix: Prefix
    tokens: int  # the prompt's tokens as the server counted them
    session: str | None
    at: float = field(default_factory=time.monotonic)
    conversation: bool = True  # a turn's prompt, which its next turn continues (a task's is never reused)

    def hot(self, now: float, hot_for: float) -> bool:
        """Worth keeping: a conversation used within `hot_for` (a task's prompt never is)."""
        return self.conversation and now - self.at <= hot_for


@dataclass
class SlotMemory:
    slots: int = 1
    held: dict[int, Held] = field(default_factory=dict)
    errors: list[float] = field(default_factory=list)  # |predicted - actual| / max(actual, 1), last 200
    busy: dict[int, int] = field(default_factory=dict)  # requests sent to a slot whose answer has not ended
    # Held slots by their prompt's last hash (a chained hash: equal means the same messages). Finds the
    # slots holding exactly a prompt, or one it continues, without a pass over every slot of a wide server.
    by_last: dict[bytes, set[int]] = field(default_factory=dict)

    def shared(self, prefix: Prefix, held: Held) -> int:
        """Tokens of `held` that a prompt with this prefix would find cached (the shared messages' share)."""
        n = prefix.common(held.prefix)
        if n == 0 or not held.prefix.sizes:
            return 0
        return int(held.tokens * held.prefix.sizes[n - 1] / held.prefix.sizes[-1])

    def choose(self, prefix: Prefix, hot_for: float) -> tuple[int, int, int]:
        """(slot, cached tokens predicted, hot tokens it would throw away) for the best slot. A slot whose
        conversation is still hot is only taken by that conversation's next turn while another slot is
        free or cold: a prompt that shares only a system prompt with a hot chat would otherwise alternate
        with it on one slot, each re-prefilling the other's turns forever. Then the most reused (minus,
        when every slot is hot, what its conversation would lose), a free slot, the least recently used."""
        if prefix.hashes:  # an idle slot holding exactly this prompt: nothing can beat it
            for slot in self.by_last.get(prefix.hashes[-1], ()):
                if slot not in self.busy:
                    return slot, self.held[slot].tokens, 0
        now = time.monotonic()
        best: tuple[tuple[bool, bool, int, bool, float], int, int, int] | None = None
        # The held slots, and the first free one (free slots are all alike): not every slot of a wide server.
        free = next((n for n in range(max(1, self.slots)) if n not in self.held), None)
        for slot in [*self.held, *(() if free is None else (free,))]:
            held = self.held.get(slot)
            gain = lost = 0
            own = True  # free, cold, or this conversation's own slot
            if held is not None:
                gain = self.shared(prefix, held)
                common = prefix.common(held.prefix)
                if common < len(held.prefix.hashes) and held.hot(now, hot_for):
                    lost = held.tokens - gain
                    # past the first message (the system prompt every chat of a client shares) it is the
                    # same conversation branching (an edited or regenerated turn): its own slot
                    own = common >= 2
            # A slot still answering another request is taken only when no idle one is as good: with
            # `id_slot` llama.cpp queues behind that answer (identical prompts sent together, a turn's
            # tags and follow-ups) while an idle slot waits.
            key = (own, slot not in self.busy, gain - lost, held is None, -(held.at if held else 0.0))
            if best is None or key > best[0]:
                best = (key, slot, gain, lost)
        assert best is not None
        return best[1], best[2], best[3]

    def base(self, prefix: Prefix) -> Held | None:
        """The longest prompt a slot holds that this one wholly continues (its next turn), or None."""
        for h in reversed(prefix.hashes):
            slots = self.by_last.get(h)
            if slots:  # several slots holding the same prompt hold the same tokens: any one will do
                return self.held[next(iter(slots))]
        return None

    def hot(self, slot: int, hot_for: float) -> Held | None:
        held = self.held.get(slot)
        return held if held is not None and held.hot(time.monotonic(), hot_for) else None

    def remember(self, slot: int, prefix: Prefix, tokens: int, session: str | None, conversation: bool = True) -> None:
        old = self.held.get(slot)
        if old is not None and old.prefix.hashes:
            same = self.by_last[old.prefix.hashes[-1]]
            same.discard(slot)
            if not same:
                del self.by_last[old.prefix.hashes[-1]]
        self.held[slot] = Held(prefix, tokens, session, conversation=conversation)
        if prefix.hashes:
            self.by_last.setdefault(prefix.hashes[-1], set()).add(slot)

    def score(self, predicted: int, actual: int) -> None:
        self.errors.append(abs(predicted - actual) / max(actual, 1))
        del self.errors[:-200]

    def forget(self) -> None:
        """The server restarted (a crash): every slot is empty."""
        self.held.clear()
        self.busy.clear()
        self.by_last.clear()


@dataclass(frozen=True, slots=True)
class Plan:
    """Where one request goes on the server and what we expect of it."""

    slot: int
    prefix: Prefix
    predicted_cached: int
    session: str | None
    pin: bool  # send `id_slot` (the server has several slots)
    base: Held | None = None  # the held prompt this one continues (sizes the new part)
    lost: int = 0  # cached tokens of a hot conversation this request would overwrite


class SlotCache:
    """The slot memory of one llama.cpp server plus what it is worth: predicted cached tokens, the
    time a miss costs (uncached tokens / learned prefill rate), and whether a request would evict a
    conversation that is still being used (`hot_for`)."""

    def __init__(self, hot_for: float, pin: bool = True, speeds: Speeds | None = None) -> None:
        self.hot_for = hot_for
        self.sizer = PromptSizer(speeds or Speeds())
        self.pin = pin  # send id_slot when the server has several slots (config `slot_affinity`)
        self.memory = SlotMemory()
        # decide (estimate, evicts) and open fingerprint the same request: hash it once. The body may
        # be a shallow copy by then (model id, clamp), but its messages list is the same object.
        self._last: tuple[Any, Any, Prefix] | None = None
        self.cached_tokens = 0  # served from cache, summed (for the hit ratio)
        self.prompt_tokens = 0

    def _fingerprint(self, body: dict[str, Any]) -> Prefix:
        messages, tools = body.get("messages"), body.get("tools")
        last = self._last
        if last is not None and last[0] is messages and last[1] is tools:
            return last[2]
        prefix = fingerprint(body)
        self._last = (messages, tools, prefix)
        return prefix

    def plan(self, body: dict[str, Any], session: str | None) -> Plan:
        prefix = self._fingerprint(body)
        slot, cached, lost = self.memory.choose(prefix, self.hot_for)
        return Plan(slot, prefix, cached, session, self.pin and self.memory.slots > 1, self.memory.base(prefix), lost)

    def tokens_of(self, body: dict[str, Any]) -> int | None:
        """The prompt's tokens as this server will count them (sizing.py), None before it answered."""
        prefix = self._fingerprint(body)
        return self.sizer.tokens(prefix, self.memory.base(prefix))

    def reserve(self, plan: Plan, conversation: bool = True) -> None:
        """The request is on its way to `plan.slot`: from now on the slot holds (is filling with) its prompt.
        Without this, two requests planned before either answered (a new chat's title and turn, a turn's
        tags and follow-ups) would both see the same free slot and queue there while the other idles."""
        tokens = self.sizer.tokens(plan.prefix, plan.base)
        if tokens is None:  # nothing learned yet: a typical 4 bytes per token is enough to compare slots
            tokens = (plan.prefix.tool_bytes + (plan.prefix.sizes[-1] if plan.prefix.sizes else 0)) // 4
        self.memory.remember(plan.slot, plan.prefix, max(1, tokens), plan.session, conversation)

    def occupy(self, plan: Plan, conversation: bool = True) -> Callable[[], None]:
        """`reserve`, and count the request on its slot until the returned callable (idempotent) says
        its answer ended."""
        self.reserve(plan, conversation)
        busy, slot = self.memory.busy, plan.slot
        busy[slot] = busy.get(slot, 0) + 1
        done = False

        def ended() -> None:
            nonlocal done
            if done:
                return
            done = True
            n = busy.get(slot, 0) - 1
            if n > 0:
                busy[slot] = n
            else:
                busy.pop(slot, None)  # also after forget() emptied it: never below zero

        return ended

    def evicts(self, body: dict[str, Any], session: str | None) -> str | None:
        """Why serving this request now would throw away a warm conversation's prefix, or None."""
        plan = self.plan(body, session)
        held = self.memory.hot(plan.slot, self.hot_for)
        # Nothing to lose, or it reuses more than it throws away (a regenerated last turn): not an eviction.
        if held is None or plan.lost <= plan.predicted_cached:
            return None
        # Even the same chat's own title would evict it: the title's prompt is not the conversation's.
        who = f"{held.session}'s" if held.session else "a conversation's"
        return f"keeps {who} {held.tokens:,} cached tokens warm"

    def settled(self, plan: Plan, usage: dict[str, Any] | None, timings: dict[str, Any] | None,
                conversation: bool = True) -> int | None:
        """Learn from the answer; returns llama.cpp's actual cached tokens when it said."""
        timings = timings or {}
        cache_n = timings.get("cache_n")
        prompt_n = timings.get("prompt_n")
        tokens = (usage or {}).get("prompt_tokens")
        if tokens is None and isinstance(cache_n, int) and isinstance(prompt_n, int):
            tokens = cache_n + prompt_n
        if isinstance(tokens, int) and tokens > 0:
            self.memory.remember(plan.slot, plan.prefix, tokens, plan.session, conversation)
            self.prompt_tokens += tokens
            self.sizer.learn(plan.prefix, plan.base, tokens)
        if isinstance(cache_n, int):
            self.memory.score(plan.predicted_cached, cache_n)
            self.cached_tokens += cache_n
            return cache_n
        return None

    def accuracy(self) -> float | None:
        """Median relative error of the cached-token predictions (None before any)."""
        errs = sorted(self.memory.errors)
        return errs[len(errs) // 2] if errs else None
