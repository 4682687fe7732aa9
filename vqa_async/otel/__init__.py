"""OpenTelemetry traces (docs/tracing.md): off unless an OTLP endpoint is configured, and then through the SDK.

`hooks` is what the request path calls; it imports nothing of OpenTelemetry, so that with tracing off (the
default) the SDK is never imported and each hook costs a function call. `live` holds the SDK's side and is
imported only by `hooks.start_from_env()` when `OTEL_EXPORTER_OTLP_ENDPOINT` or
`OTEL_EXPORTER_OTLP_TRACES_ENDPOINT` is set.
"""
