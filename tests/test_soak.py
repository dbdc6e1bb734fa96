"""The soak tool for two minutes: 384 channels over LSL at 1x, replay -> rtsort run -> a consumer."""

import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.lsl
@pytest.mark.slow
def test_soak_two_minutes_loses_no_sample_and_memory_stays_flat(tmp_path):
    """``tools/soak.py --minutes 2``: every sample sent is sorted, and the sorter's resident memory grows by less
    than 30 MB from the first minute to the last (the statistics take constant memory; nothing queues up)."""
    out = tmp_path / "soak"
    res = subprocess.run([sys.executable, str(ROOT / "tools" / "soak.py"), "--minutes", "2", "--out", str(out)],
                         capture_output=True, text=True, timeout=900)
    assert res.returncode == 0, res.stderr[-3000:]
    minutes = [json.loads(ln) for ln in (out / "minutes.jsonl").read_text().splitlines()]
    summary = json.loads((out / "summary.json").read_text())
    print(f"SOAK {json.dumps(summary)}")
    assert [m["minute"] for m in minutes] == [1, 2]
    assert all(m["rss_mb"] and m["spikes_received"] > 0 and m["latency_ms"]["p50"] > 0 for m in minutes)
    assert summary["samples_sent"] == 2 * 60 * 30000
    assert summary["lost_samples"] == 0 and summary["gap_samples"] == 0 and not summary["malformed"]
    assert summary["rss_mb"]["growth"] < 30.0
    assert summary["spikes_out"] > 0 and summary["spikes_received"] > 0.95 * summary["spikes_out"]
