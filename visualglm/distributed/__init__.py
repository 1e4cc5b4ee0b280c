"""Tensor-parallel inference over torch.distributed: ``tp`` splits a model following its plan, ``launch``
sets up the process group under torchrun and keeps the ranks in lockstep (rank 0 does the I/O)."""
