"""Text generation on mlx-lm: model loading, chat templating, sampling, output parsing, engine."""
