"""The spec layer: a search spec read and checked (specfile.py), the search space it describes as
trials (space.py), and the trainables found by name (registry.py). No Ray, no MLflow: a spec is
checked, every search point included, before any cluster or tracking store is touched. It may
import `base` and `protocol`."""
