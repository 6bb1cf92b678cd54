"""The trial layer: one trial's life. A trial's TorchTrainer and its resume point (trainer.py),
what `paceray train` and `paceray tune` do before anything is written (prepare.py), the owner of a
trial's runs from open to end, the one place a run's final status is decided (runner.py), and
`paceray train` itself (standalone.py). It may import `base`, `protocol`, `spec`, `tracking` and
`cluster`; it imports Ray only as `ray.train`."""
