"""Settings: the groups (groups.py) as one typed object, validated when built. Command-line flags override `VQA_*`
environment variables, which override the defaults; some defaults depend on the device ("auto").

`Settings(**values)` takes the flat names (`Settings(device="cpu", max_batch_size=8)`), as the flags and the
variables name them: what was asked becomes an `AskedSettings`, its "auto" values are resolved, and the Settings is
built from the resolved values, so that a Settings never holds a placeholder and nothing is patched after it is
built.
"""

from __future__ import annotations

import argparse
import dataclasses
import difflib
import os
from dataclasses import dataclass, fields
from typing import TYPE_CHECKING, Any, TypeVar

from vqa_async.config.fields import ENV_PREFIX, add_flags, check_types, env_name, from_text, group_title, to_text
from vqa_async.config.groups import (
    GROUPS,
    BatchingSettings,
    HealthSettings,
    ImageSettings,
    LimitSettings,
    LoggingSettings,
    MediaSettings,
    ModelSettings,
    ServerSettings,
    TeamSettings,
)

if TYPE_CHECKING:
    from _typeshed import DataclassInstance

GroupT = TypeVar("GroupT", bound="DataclassInstance")


def _default_device() -> str:
    from vqa_async.devices import default_device  # without torch: the cluster's supervisor resolves `auto` too

    return default_device()


@dataclass(frozen=True, kw_only=True)
class AskedSettings(LoggingSettings, TeamSettings, HealthSettings, MediaSettings, LimitSettings, ImageSettings,
                    BatchingSettings, ModelSettings, ServerSettings):
    """Every group's fields (listed last to first: a dataclass takes its bases' fields in reverse order), as the
    flags and the environment give them: "auto" values not yet resolved."""

    def group(self, cls: type[GroupT]) -> GroupT:
        """One concern's settings on their own (`settings.group(BatchingSettings)`)."""
        return cls(**{f.name: getattr(self, f.name) for f in fields(cls)})

    def resolved(self) -> dict[str, Any]:
        """The values with every "auto" replaced by what it means on this machine."""
        device = _default_device() if self.device == "auto" else self.device
        on_cuda = device.startswith("cuda")
        wait = self.max_wait_ms if self.max_wait_ms >= 0 else 2.0 if on_cuda else 5.0
        threads = self.preprocess_threads or min(8, os.cpu_count() or 1)
        return {**{f.name: getattr(self, f.name) for f in fields(self)},
                "device": device, "max_batch_size": self.max_batch_size or (64 if on_cuda else 16),
                "max_wait_ms": wait, "return_window_ms": self.return_window_ms if self.return_window_ms >= 0 else wait,
                "preprocess_threads": threads,
                "max_preprocess_backlog": self.max_preprocess_backlog or min(self.max_queue, 64 * threads),
                "log_level": self.log_level.upper()}


class Settings(AskedSettings):
    """The settings a process runs with: every group, resolved and checked. Frozen, compared by value."""

    def __init__(self, **values: Any) -> None:
        unknown = set(values) - NAMES
        if unknown:
            raise TypeError(f"unknown settings: {', '.join(sorted(unknown))}")
        asked = AskedSettings(**values)
        for group in GROUPS:  # before resolving, which compares numbers (a Literal may still be spelt in any case)
            check_types(asked.group(group), literals=False)
        super().__init__(**asked.resolved())
        for group in GROUPS:
            check_types(self.group(group))
            group.check(self)

    def replace(self, **changes: Any) -> Settings:
        return dataclasses.replace(self, **changes)

    @classmethod
    def from_env(cls, env: dict[str, str] | None = None, **overrides: Any) -> Settings:
        env = dict(os.environ if env is None else env)
        check_env(env)
        values: dict[str, Any] = {}
        for group in GROUPS:
            for f in fields(group):
                if env_name(f) in env:
                    values[f.name] = from_text(group, f, env[env_name(f)])
        values.update({k: v for k, v in overrides.items() if v is not None})
        return cls(**values)


NAMES = frozenset(f.name for group in GROUPS for f in fields(group))

# Variables of ours that are not settings: the key `vqa-async batch` sends, the bench's photo set. Any other VQA_*
# is a mistake, refused at start (a misspelled VQA_API_KEYS must not start a server without authentication).
# Programs around the server add their own with allow_env (the test suite's fault injection does).
# VQA_IMAGE_ID_SECRET: a secret, not a setting (core/image_ids.py); the cluster hands it to its workers.
OTHER_ENV = {"VQA_CLIENT_API_KEY", "VQA_PHOTOS_DIR", "VQA_IMAGE_ID_SECRET"}


def allow_env(*names: str) -> None:
    """Lets VQA_* variables that are not settings through check_env: those of a harness around the server."""
    OTHER_ENV.update(names)


def check_env(env: dict[str, str]) -> None:
    """Refuses a VQA_* variable that names no setting, with the closest setting's variable."""
    known = sorted(ENV_PREFIX + name.upper() for name in NAMES)
    for key in sorted(env):
        if key.startswith(ENV_PREFIX) and key not in known and key not in OTHER_ENV:
            close = difflib.get_close_matches(key, known, n=1)
            hint = f"did you mean {close[0]}? " if close else ""
            raise ValueError(f"unknown environment variable {key}: {hint}Every {ENV_PREFIX}* variable names a "
                             "setting (--help lists them); unset it or correct its name")


def settings_env(settings: Settings) -> dict[str, str]:
    """Every setting as its VQA_* variable (empty for None): how the cluster hands a worker, or its warm spare,
    its settings; `Settings.from_env` reads them back unchanged."""
    return {env_name(f): to_text(getattr(settings, f.name)) for f in fields(settings)}


def add_arguments(parser: argparse.ArgumentParser, exclude: tuple[str, ...] = ()) -> None:
    """One flag per setting (`--max-batch-size`), in one argument group per concern, defaulting to None so that
    the environment can fill in."""
    for group in GROUPS:
        title, about = group_title(group)
        add_flags(parser.add_argument_group(title, about or None), group, env=True, exclude=exclude)


def settings_from_args(args: argparse.Namespace, env: dict[str, str] | None = None) -> Settings:
    return Settings.from_env(env, **{k: v for k, v in vars(args).items() if k in NAMES})
