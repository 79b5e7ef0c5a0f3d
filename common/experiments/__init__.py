"""The paper's experiments: baselines, training profiles, reports."""
