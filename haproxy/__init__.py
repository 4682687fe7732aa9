"""HAProxy's configuration template. It lives at the repository's top level; the wheel ships it as
`vqa_async.haproxy_templates` (pyproject.toml's package-dir), and `vqa_async.cluster.haproxy` finds it there."""
