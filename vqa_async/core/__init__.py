"""The application core: admission, readiness and ask() (service), and the VQA adapter the batcher runs."""
