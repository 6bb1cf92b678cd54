"""paceray: search diffusion-training timestep curricula on Ray, tracked in MLflow."""

__version__ = "0.1.0"
