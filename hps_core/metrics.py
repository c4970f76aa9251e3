"""Counters and histograms with labels, exported as Prometheus text (and readable in process).

Small on purpose: a ``Registry`` of named metrics; a metric has fixed label names and one
value (or bucket set) per label combination. ``REGISTRY`` is the process-wide default that the
storage tiers and the update ingestor report into; Triton metrics can mirror it.
"""

from __future__ import annotations

import bisect
import math
import random
import threading

DEFAULT_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)
RESERVOIR = 4096  # samples kept per label set for quantiles


class _Metric:
    kind = ""

    def __init__(self, name: str, help: str, labels: tuple[str, ...] = ()):
        self.name = name
        self.help = help
        self.label_names = tuple(labels)
        self._lock = threading.Lock()

    def _key(self, labels: dict[str, str]) -> tuple[str, ...]:
        if set(labels) != set(self.label_names):
            raise ValueError(
                f"metric {self.name}: labels {sorted(labels)}, expected {list(self.label_names)}"
            )
        return tuple(str(labels[n]) for n in self.label_names)

    def _fmt(self, key: tuple[str, ...], extra: str = "") -> str:
        parts = [f'{n}="{_escape(v)}"' for n, v in zip(self.label_names, key, strict=True)]
        if extra:
            parts.append(extra)
        return "{" + ",".join(parts) + "}" if parts else ""

    def export(self) -> list[str]:
        lines = [f"# HELP {self.name} {self.help}", f"# TYPE {self.name} {self.kind}"]
        return lines + self._samples()

    def _samples(self) -> list[str]:
        raise NotImplementedError


class Counter(_Metric):
    """A monotonically increasing count per label set."""

    kind = "counter"

    def __init__(self, name: str, help: str, labels: tuple[str, ...] = ()):
        super().__init__(name, help, labels)
        self._values: dict[tuple[str, ...], float] = {}

    def inc(self, amount: float = 1.0, **labels: str) -> None:
        """Add ``amount`` (>= 0)."""
        key = self._key(labels)
        with self._lock:
            self._values[key] = self._values.get(key, 0.0) + amount

    def value(self, **labels: str) -> float:
        """The current count of one label set (0 if never incremented)."""
        return self._values.get(self._key(labels), 0.0)

    def _samples(self) -> list[str]:
        with self._lock:
            items = sorted(self._values.items())
        return [f"{self.name}{self._fmt(k)} {_num(v)}" for k, v in items]


class _Series:
    def __init__(self, nbuckets: int):
        self.counts = [0] * (nbuckets + 1)  # the last one is +Inf
        self.sum = 0.0
        self.count = 0
        self.samples: list[float] = []


class Histogram(_Metric):
    """Observations in cumulative buckets, plus a bounded random sample for quantiles."""

    kind = "histogram"

    def __init__(
        self,
        name: str,
        help: str,
        labels: tuple[str, ...] = (),
        buckets: tuple[float, ...] = DEFAULT_BUCKETS,
    ):
        super().__init__(name, help, labels)
        self.buckets = tuple(sorted(buckets))
        self._series: dict[tuple[str, ...], _Series] = {}
        self._rng = random.Random(0)

    def observe(self, value: float, **labels: str) -> None:
        """Record one observation."""
        self.observe_many([value], **labels)

    def observe_many(self, values: list[float], **labels: str) -> None:
        """Record several observations of one label set."""
        key = self._key(labels)
        with self._lock:
            s = self._series.get(key)
            if s is None:
                s = self._series[key] = _Series(len(self.buckets))
            for v in values:
                v = float(v)
                s.counts[bisect.bisect_left(self.buckets, v)] += 1
                s.sum += v
                s.count += 1
                if len(s.samples) < RESERVOIR:
                    s.samples.append(v)
                else:  # reservoir sampling: every observation equally likely to be kept
                    j = self._rng.randrange(s.count)
                    if j < RESERVOIR:
                        s.samples[j] = v

    def count(self, **labels: str) -> int:
        """Number of observations of one label set."""
        s = self._series.get(self._key(labels))
        return s.count if s else 0

    def quantile(self, q: float, **labels: str) -> float:
        """The q-quantile (0..1) of the sampled observations (NaN when there are none)."""
        s = self._series.get(self._key(labels))
        if not s or not s.samples:
            return math.nan
        with self._lock:
            xs = sorted(s.samples)
        return xs[min(len(xs) - 1, max(0, math.ceil(q * len(xs)) - 1))]

    def reset(self) -> None:
        """Forget every observation (benchmarks measure one phase at a time)."""
        with self._lock:
            self._series.clear()

    def _samples(self) -> list[str]:
        out = []
        with self._lock:
            items = sorted(self._series.items())
            for k, s in items:
                acc = 0
                for b, c in zip((*self.buckets, math.inf), s.counts, strict=True):
                    acc += c
                    le = "+Inf" if math.isinf(b) else _num(b)
                    lab = self._fmt(k, 'le="' + le + '"')
                    out.append(f"{self.name}_bucket{lab} {acc}")
                out.append(f"{self.name}_sum{self._fmt(k)} {_num(s.sum)}")
                out.append(f"{self.name}_count{self._fmt(k)} {s.count}")
        return out


class Registry:
    """Named metrics; asking twice for the same name returns the same metric."""

    def __init__(self):
        self._metrics: dict[str, _Metric] = {}
        self._lock = threading.Lock()

    def counter(self, name: str, help: str, labels: tuple[str, ...] = ()) -> Counter:
        """The counter called ``name`` (created on first use)."""
        return self._get(Counter, name, help, labels)

    def histogram(
        self,
        name: str,
        help: str,
        labels: tuple[str, ...] = (),
        buckets: tuple[float, ...] = DEFAULT_BUCKETS,
    ) -> Histogram:
        """The histogram called ``name`` (created on first use)."""
        return self._get(Histogram, name, help, labels, buckets=buckets)

    def _get(self, cls: type, name: str, help: str, labels: tuple[str, ...], **kw) -> _Metric:
        with self._lock:
            m = self._metrics.get(name)
            if m is None:
                m = self._metrics[name] = cls(name, help, tuple(labels), **kw)
            elif not isinstance(m, cls) or m.label_names != tuple(labels):
                raise ValueError(f"metric {name} already exists as a {m.kind} {m.label_names}")
            return m

    def get(self, name: str) -> _Metric | None:
        """A metric by name, or None."""
        return self._metrics.get(name)

    def export_prometheus(self) -> str:
        """Every metric in the Prometheus text exposition format (version 0.0.4)."""
        with self._lock:
            metrics = sorted(self._metrics.values(), key=lambda m: m.name)
        lines: list[str] = []
        for m in metrics:
            lines += m.export()
        return "\n".join(lines) + "\n"


REGISTRY = Registry()


def _escape(v: str) -> str:
    return v.replace("\\", "\\\\").replace("\n", "\\n").replace('"', '\\"')


def _num(v: float) -> str:
    return repr(float(v)) if not float(v).is_integer() else str(int(v))
