"""Read a Triton server's Prometheus ``/metrics`` page: the hps backend's metrics by label."""

from __future__ import annotations

import re
import urllib.request


def scrape(url: str, timeout: float = 10) -> str:
    """The metrics page as text (``url``: e.g. ``TritonServer.metrics_url``)."""
    with urllib.request.urlopen(url, timeout=timeout) as r:
        return r.read().decode()


def samples(text: str, name: str, **labels: str) -> list[tuple[dict[str, str], float]]:
    """(labels, value) of every sample of metric ``name`` whose labels include ``labels``."""
    out = []
    for line in text.splitlines():
        if not line.startswith(name + "{"):
            continue
        got = dict(re.findall(r'(\w+)="([^"]*)"', line.split("}", 1)[0]))
        if all(got.get(k) == v for k, v in labels.items()):
            out.append((got, float(line.rsplit(" ", 1)[1])))
    return out


def total(text: str, name: str, **labels: str) -> float:
    """Sum of the matching samples of metric ``name`` (0 if none)."""
    return sum(v for _, v in samples(text, name, **labels))
