"""`execute --steps 2` times nothing (step 0 warms up, step 1 tracks memory): the report says so instead of
printing `nan` medians."""

from __future__ import annotations

from runtime.report import MIB, RunReport
from runtime.train import RankResult, median_step_time_s


def test_two_steps_report_too_few_steps_not_nan():
    ranks = [RankResult(rank=r, losses=[2.0, 1.9], step_times_s=[], peak_memory_bytes=3 * MIB,
                        every_step_time_s=[0.2, 0.3], tracked_step=1) for r in range(2)]
    report = RunReport(world_size=2, mesh={"pp": 1, "dp": 2, "tp": 1}, steps=2, losses=[2.0, 1.9],
                       predicted_step_time_ms=5.0, measured_step_time_ms=max(map(median_step_time_s, ranks)) * 1e3,
                       predicted_peak_memory_mib=3.0, measured_peak_memory_mib=3.0, ranks=ranks)
    text = report.format()
    assert "nan" not in text.lower(), text
    assert "too few steps to time" in text and "--steps 3" in text
    assert text.count("too few steps") == 3  # the step-time row and each rank's median
