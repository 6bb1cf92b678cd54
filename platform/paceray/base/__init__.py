"""The base layer: what every other layer stands on and that knows nothing of trials, Ray or
MLflow. The one user error type, files written whole (atomic.py), lock files and the command lock
(locks.py), progress bars (console.py), dotted config paths (dotted.py), the run directory's
whole layout and the storage root (paths.py), and the process-group supervisor of the embedded
server (supervise.py). It imports nothing of paceray."""
