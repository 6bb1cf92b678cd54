"""The diffusion library both trainables share; not a trainable (no entry point, no train loop).

Data (prepared Parquet shards and their sources), the diffusion process and its samplers, the
model presets, FID and its feature network, the shared assets in the storage root, the timestep
curriculum and its distributions, the difficulty-file format the probe writes and the curriculum
reads, and the config sections both trainables use. Of the platform it imports only
`paceray.protocol`; the denoiser and the difficulty probe import it and never each other.
"""
