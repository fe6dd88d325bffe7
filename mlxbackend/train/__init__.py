"""Fine-tuning jobs: datasets, the training loop, checkpoints and export."""
