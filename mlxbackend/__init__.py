"""mlxbackend: LocalAI's gRPC backend.Backend service on MLX."""

__version__ = "0.1.0"
BACKEND_NAME = "mlx"
