"""Sampling: `SamplingParams` (what a request asks) and the vectorised sampler a step runs."""
