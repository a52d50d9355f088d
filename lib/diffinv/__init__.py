"""diffinv: diffusion priors for inverse problems on faces, and a look inside the score network."""

__version__ = "0.1.0"
