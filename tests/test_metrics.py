"""Quality metrics on spike trains with known answers."""

import numpy as np

from rtsort.train.metrics import amplitude_cutoff, isi_violations, isolation, presence_ratio, unit_metrics


def test_isi_violations():
    t = np.arange(0, 100, 0.1)  # 10 Hz, regular: no violation
    assert isi_violations(t, 100.0) == (0, 0.0)
    t2 = np.sort(np.r_[t, t[:10] + 0.001])  # 10 pairs 1 ms apart
    count, ratio = isi_violations(t2, 100.0)
    assert count == 10
    assert np.isclose(ratio, 10 * 100.0 / (t2.size**2 * 2 * 0.0015))


def test_presence_ratio():
    assert presence_ratio(np.linspace(0, 599, 1000), 600.0) == 1.0
    assert presence_ratio(np.linspace(0, 299, 1000), 600.0) == 0.5


def test_amplitude_cutoff_sees_a_truncated_distribution():
    rng = np.random.default_rng(0)
    full = rng.normal(100, 15, 20000)
    assert amplitude_cutoff(full) < 0.02
    cut = full[full > 85]  # about 16 % lost below threshold
    assert 0.05 < amplitude_cutoff(cut) < 0.3


def test_isolation_separates_far_from_near_clusters():
    rng = np.random.default_rng(1)
    a = rng.normal(0, 1, (300, 3))
    far = np.r_[a, rng.normal(20, 1, (300, 3))]
    near = np.r_[a, rng.normal(0.5, 1, (300, 3))]
    lab = np.r_[np.zeros(300, int), np.ones(300, int)]
    iso_far, l_far = isolation(far, lab, 0)
    iso_near, l_near = isolation(near, lab, 0)
    assert iso_far > 10 * iso_near and l_far < l_near


def test_unit_table_flags_a_bad_unit():
    rng = np.random.default_rng(2)
    n = 2000
    t = np.sort(rng.uniform(0, 100, n))
    labels = np.where(np.arange(n) % 2 == 0, 0, 1)
    labels[t > 20] = np.where(labels[t > 20] == 1, 0, labels[t > 20])  # unit 1 only in the first 20 s
    feats = np.c_[labels * 10.0, np.zeros(n)] + rng.normal(0, 1, (n, 2))
    table = unit_metrics(labels, (t * 30000).astype(np.int64), rng.normal(-80, 5, n).astype(np.float32), feats,
                         np.array([8.0, 2.0]), 2, 30000.0, 100.0)
    assert [row["unit"] for row in table] == [0, 1]
    assert "presence_ratio" in table[1]["flags"] and "snr" in table[1]["flags"]
    assert table[0]["silhouette"] > 0.5
