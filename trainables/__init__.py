"""Trainables: what runs on Ray workers. Each sub-package exposes `Config` and `train_loop`."""
