"""The A/B report rendered as rich tables, markdown and a PNG plot."""

from __future__ import annotations

from pathlib import Path

from serving.ab.render import plot_report, render_report
from serving.ab.report import compute_report

from .ab_fixtures import experiment, synthetic_log


def test_render_and_plot(tmp_path: Path) -> None:
    import matplotlib.image

    exp = experiment([(3, 50), (4, 50)], shadow=5)
    requests, outcomes = synthetic_log(exp, 300, {3: 0.5, 4: 0.6})
    report = compute_report(exp, requests, outcomes, min_samples=100)
    text = render_report(report)
    for needle in (
        "summarize@3",
        "control",
        "summarize@4",
        "treatment",
        "welch t",
        "Recommendation:",
        "Sample ratio",
    ):
        assert needle in text
    markdown = render_report(report, markdown=True)
    assert markdown.startswith("## A/B report") and "| Arm | Role |" in markdown
    png = plot_report(report, tmp_path / "plots" / "ab.png")
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    height, width, _ = matplotlib.image.imread(png).shape
    assert width > 800 and height > 300
