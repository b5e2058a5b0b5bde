"""The demo: a generator for the synthetic demo corpus and the end-to-end run on it (`python -m demo`)."""
