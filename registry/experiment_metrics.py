"""The outcome metrics an A/B experiment can be judged on.

A module of its own, with no imports, because `serving.ab` (loaded by every `moea` command) shares this
tuple and must not pull in SQLAlchemy with it.
"""

EXPERIMENT_METRICS = ("reward", "thumbs")
"""`reward`: a float score per request (compared as means); `thumbs`: up/down feedback (compared as rates)."""
