"""The review loop's state: the session folder, the training data a session gives, and the
simulated user of the synthetic benchmarks."""
