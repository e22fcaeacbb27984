"""The sampler loop that drives engines through ClusCa cycles, and the embedded ``Pipeline``."""
