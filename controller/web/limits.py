"""Login attempts, rate-limited: a password guesser gets a few tries, then one now and then.

Failed logins spend from two token buckets: one per source address and one per
principal name (a guesser spreading over addresses still meets the name's). A
bucket refills at a steady rate; while either is empty, logins from that address
or as that name are refused without looking at the password, with the seconds
until the next try. A success costs nothing. Per controller process, in memory:
an attacker facing several replicas gets each one's allowance, which the
Service's session affinity (or the small number of replicas) keeps small.

Pure: the clock is passed in.
"""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass
class _Bucket:
    tokens: float
    at: float


@dataclass
class Budget:
    """``burst`` failures at once, then one per ``every`` seconds."""

    burst: int
    every: float
    _buckets: dict[str, _Bucket] = field(default_factory=dict)

    MAX_KEYS = 10_000  # beyond, refilled buckets are forgotten (they hold no state)

    def wait(self, key: str, now: float) -> float:
        """Seconds until ``key`` may try again (0: now)."""
        b = self._refilled(key, now)
        return 0.0 if b is None or b.tokens >= 1 else (1 - b.tokens) * self.every

    def spend(self, key: str, now: float) -> None:
        b = self._refilled(key, now) or _Bucket(float(self.burst), now)
        b.tokens = max(0.0, b.tokens - 1)
        self._buckets[key] = b
        if len(self._buckets) > self.MAX_KEYS:
            self._forget_full(now)

    def _refilled(self, key: str, now: float) -> _Bucket | None:
        b = self._buckets.get(key)
        if b is not None:
            b.tokens = min(float(self.burst), b.tokens + (now - b.at) / self.every)
            b.at = now
        return b

    def _forget_full(self, now: float) -> None:
        for key in list(self._buckets):
            b = self._refilled(key, now)
            if b is not None and b.tokens >= self.burst:
                del self._buckets[key]


@dataclass
class LoginLimiter:
    by_address: Budget = field(default_factory=lambda: Budget(burst=5, every=12.0))
    by_name: Budget = field(default_factory=lambda: Budget(burst=10, every=30.0))

    def wait(self, address: str, name: str, now: float) -> float:
        """Seconds until a login from ``address`` as ``name`` is looked at (0: now)."""
        return max(self.by_address.wait(address, now), self.by_name.wait(name, now))

    def failed(self, address: str, name: str, now: float) -> None:
        self.by_address.spend(address, now)
        self.by_name.spend(name, now)
