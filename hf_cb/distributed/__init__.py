"""torch.distributed plumbing: the tensor-parallel group a model is sharded over, and rank 0's
decisions broadcast to the other ranks."""
