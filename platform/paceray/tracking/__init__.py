"""The tracking layer, the only importer of MLflow: the client helpers (client.py), one owner of
a run's life (run.py), the run logger and its on-disk queue (runlog.py, spool.py), system metrics
(system_metrics.py), the embedded server and the tracking session (server.py), the model registry
and the MLflow UI's comparison view. No Ray. It may import `base`, `protocol` and `spec`."""
