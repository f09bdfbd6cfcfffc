"""A/B experiments between versions of one expert.

The package is split by who needs what, so the request path stays light:

- :mod:`serving.ab.assign`: sticky weighted assignment (stdlib only; the gateway imports this per request).
- :mod:`serving.ab.stats`: the tests (two-proportion z, Welch t), confidence intervals, sample-ratio check.
- :mod:`serving.ab.sequential`: the always-valid mSPRT (p-value, confidence sequence) and the MDE.
- :mod:`serving.ab.samples`: outcomes grouped into analysis units (users; a request without a user alone).
- :mod:`serving.ab.compare`: one treatment against the control (fixed and sequential tests, MDEs).
- :mod:`serving.ab.simulation`: the Monte-Carlo check of false-positive rates and power.
- :mod:`serving.ab.report`: joins logged requests with outcomes per arm into an :class:`ABReport`.
- :mod:`serving.ab.render`: the report as rich tables, markdown and a matplotlib plot.
- :mod:`serving.ab.cli`: ``moea ab …``.

Nothing is imported here: importing :mod:`serving.ab.assign` must not pull in scipy, numpy, rich or
matplotlib.
"""
