"""Fast paths behind the probe functions, each tested against the plain reference.

* :mod:`.delta_cpu` — blocked (max,min) products for Gromov δ on the CPU;
* :mod:`.delta_torch` — the same search in torch (CPU or CUDA), :mod:`.delta_triton` its one tiled
  Triton kernel on CUDA;
* :mod:`.knn_certified` — exact float64 k-nearest-neighbour distances from blocked matrix products,
  with a rounding-error certificate (the intrinsic-dimension estimators' neighbour search);
* :mod:`.spread` — one computation's parts on several devices (threads) or on the processes of a
  ``torch.distributed`` group: exact δ's base points, the kNN's candidate strips and query rows.
"""
