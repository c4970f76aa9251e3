"""Counters and histograms: values, quantiles against numpy, Prometheus text."""

from __future__ import annotations

import numpy as np
import pytest

from hps_core.metrics import Registry


def test_counter_histogram_and_export():
    reg = Registry()
    c = reg.counter("hps_test_total", "things", ("table",))
    c.inc(table="a")
    c.inc(2.5, table="a")
    c.inc(table='b"x')
    assert c.value(table="a") == 3.5 and c.value(table="zzz") == 0
    assert reg.counter("hps_test_total", "things", ("table",)) is c
    with pytest.raises(ValueError, match="labels"):
        c.inc(model="a")
    with pytest.raises(ValueError, match="already exists"):
        reg.histogram("hps_test_total", "x")
    h = reg.histogram("hps_lat_seconds", "latency", ("group",), buckets=(0.1, 1.0))
    xs = np.random.default_rng(0).exponential(0.3, 3000)
    h.observe_many(xs.tolist(), group="g")
    assert h.count(group="g") == 3000
    for q in (0.5, 0.99):  # under the reservoir size every sample is kept: exact quantiles
        assert h.quantile(q, group="g") == pytest.approx(np.quantile(xs, q, method="inverted_cdf"))
    assert np.isnan(h.quantile(0.5, group="none"))
    text = reg.export_prometheus()
    assert "# TYPE hps_lat_seconds histogram" in text
    below = int((xs <= 0.1).sum())
    assert f'hps_lat_seconds_bucket{{group="g",le="0.1"}} {below}' in text
    assert 'hps_lat_seconds_bucket{group="g",le="+Inf"} 3000' in text
    assert 'hps_test_total{table="a"} 3.5' in text
    assert 'hps_test_total{table="b\\"x"} 1' in text
