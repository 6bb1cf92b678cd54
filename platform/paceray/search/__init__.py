"""The search layer: Ray Tune over trials. The Tuner, its search algorithm, scheduler and
concurrency (tuner.py), the function each Tune trial runs (trial_fn.py), the live view
(live_view.py) and `paceray tune` from its start to its report (driver.py). It may import every
layer below it: `base`, `protocol`, `spec`, `tracking`, `cluster`, `trial` and `report`."""
