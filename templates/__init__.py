"""The page templates. They live at the repository's top level; the wheel ships them as `vqa_async.templates`
(pyproject.toml's package-dir), and `vqa_async.app` finds them through that package."""
