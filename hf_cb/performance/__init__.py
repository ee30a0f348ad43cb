"""The performance layer, apart from the plain path: CUDA graphs for decode steps,
`torch.compile` of the forward, and fused input projections."""
