"""Fine-tuning: tokenise, pack, the training loop, checkpoints, sweeps and ensembles."""
