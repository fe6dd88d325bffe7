"""Quantization jobs (StartQuantization / QuantizationProgress / StopQuantization).

See `mlxbackend.quantize.config` for the accepted `quantization_type` names and
`extra_options`, `mlxbackend.quantize.run` for what a job does, and
`mlxbackend.quantize.service` for the job table."""
