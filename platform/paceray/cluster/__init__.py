"""The cluster layer, the only importer of Ray's core: connecting to (or starting) a cluster and
sizing it (connect.py), the Ray internals paceray relies on, each in one function
(ray_internals.py), and where a trial's ranks ran (placement.py). It may import `base`,
`protocol` and `spec`."""
