"""Layer 4: the training engine (loop, algorithms, configuration, data, models, checkpoints, distributed
runs, evaluation). It builds on ops, hooks, kernels, loaders and samplers; only the CLI sits above it."""
