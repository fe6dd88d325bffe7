"""Constants shared by the transport and capability code (no imports: any layer may use them)."""

MAX_MESSAGE = 50 * 1024 * 1024  # bytes; LocalAI's Go client limit, both directions
