"""The soak benchmark, short: 40 s of mixed load (streams, cancels, slow readers, bad bodies, bursts
past the queue) on the tiny model. The 30-minute run is a benchmark with a record
(``benchmarks/results/soak-smollm2-int4-cpu.txt``); this keeps its checks in CI: every request accounted
for in /metrics, no 5xx or broken stream, no growth of memory or file descriptors, a clean exit."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import quantdeploy as qd

REPO = Path(__file__).resolve().parents[2]


def test_a_short_soak_loses_nothing_and_grows_nothing(tiny_bundle, tmp_path):
    qd.save(qd.quantize(tiny_bundle, qd.RTNConfig(bits=8)), tmp_path / "q8")
    proc = subprocess.run([sys.executable, str(REPO / "benchmarks" / "soak.py"), str(tmp_path / "q8"), "--minutes",
                           "0.67", "--sample", "4", "--json", str(tmp_path / "soak.json")],
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    record = json.loads((tmp_path / "soak.json").read_text())
    assert record["passed"] and record["sent"] > 50
    outcomes = record["client_outcomes"]
    for kind in ("stream_ok", "ok", "dropped", "http_400", "http_413"):  # the mix really happened
        assert outcomes.get(kind, 0) > 0, outcomes
    assert sum(record["server_counts"].values()) == record["sent"]
