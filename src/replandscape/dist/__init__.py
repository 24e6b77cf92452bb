"""Rank logic: ``torchdist`` for torch/DeepSpeed ranks, ``mpi`` for the mpi4py analysis layer."""
