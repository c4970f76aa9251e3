"""What lookups did: keys served per level and seconds per stage."""

from __future__ import annotations

from dataclasses import dataclass, field

LEVELS = ("l1", "vdb", "pdb", "default")


@dataclass
class LookupStats:
    """What one lookup (or a sum of lookups) did: keys served per level and seconds per stage."""

    requests: int = 0
    keys: int = 0
    unique_keys: int = 0
    hits: dict[str, int] = field(default_factory=lambda: dict.fromkeys(LEVELS, 0))
    # Failed tier reads (a Redis node down...): the keys fell through to the next level.
    errors: dict[str, int] = field(default_factory=lambda: {"vdb": 0, "pdb": 0})
    seconds: dict[str, float] = field(
        default_factory=lambda: dict.fromkeys(
            ("dedupe", *LEVELS, "insert", "expand", "fused", "total"), 0.0
        )
    )

    def hit_rate(self, level: str) -> float:
        """Fraction of unique keys answered by ``level`` (l1, vdb, pdb or default)."""
        return self.hits[level] / self.unique_keys if self.unique_keys else 0.0

    def add(self, other: LookupStats) -> None:
        """Accumulate another lookup's statistics into this one."""
        self.requests += other.requests
        self.keys += other.keys
        self.unique_keys += other.unique_keys
        for k, v in other.hits.items():
            self.hits[k] += v
        for k, v in other.seconds.items():
            self.seconds[k] += v
        for k, v in other.errors.items():
            self.errors[k] += v
