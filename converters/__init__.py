"""Model format converters: GGUF and Hugging Face checkpoints to MLX folders."""
