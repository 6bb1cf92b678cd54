"""The report layer: a search read back from MLflow, never from Ray. The generic report, its
files and the parent run's copy (search.py), and `paceray report` (command.py); a trainable's
report hook builds the domain analysis. It may import `base`, `protocol`, `spec` and
`tracking`."""
