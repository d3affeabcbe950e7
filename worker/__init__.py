"""GPU workers: run one pruning job at a time (load, calibrate, prune, verify, publish)."""
