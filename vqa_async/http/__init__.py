"""The HTTP layer: handlers, errors, the page, metrics and the OpenAPI description."""
