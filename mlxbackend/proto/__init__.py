"""Stubs generated from proto/backend.proto by grpcio-tools (`make proto`)."""
