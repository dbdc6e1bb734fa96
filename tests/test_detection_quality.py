"""The gradient detector against SpikeInterface's locally_exclusive, on the same preprocessed data."""

import pytest

pytest.importorskip("spikeinterface")

from rtsort.config import Config  # noqa: E402
from rtsort.evaluate import compare_detectors  # noqa: E402


def test_gradient_detector_no_worse_than_locally_exclusive(small_sim, small_filtered):
    rec, truth, _ = small_sim
    x = small_filtered
    q = compare_detectors(x, truth["sample_index"], truth["unit"], rec.probe, rec.sampling_rate, Config().detect,
                          valid_stop=x.shape[0] - 60)
    q_ours, q_le = q["rtsort_gradient"], q["si_locally_exclusive"]
    for label in ("[5, 8)", "[8, 15)", ">= 15"):
        r_ours = q_ours["recall_by_snr"][label]["recall"]
        r_le = q_le["recall_by_snr"][label]["recall"]
        if r_le is None:
            continue
        assert r_ours >= r_le, (label, r_ours, r_le)
    assert q_ours["f1"] >= q_le["f1"]
    assert q_ours["false_positive_rate"] <= q_le["false_positive_rate"]
    # and it finds well-isolated spikes at all
    assert q_ours["recall_by_snr"][">= 15"]["recall"] > 0.95
