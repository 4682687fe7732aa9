"""Settings: the `VQA_*` variables and flags of `serve` (and of `cluster`, for its workers), as small typed groups
by concern (groups.py) that one `Settings` object holds (settings.py). `python -m vqa_async.tools.docs settings`
prints docs/settings.md from them."""

from vqa_async.config.fields import ENV_PREFIX, parse_bool
from vqa_async.config.groups import (
    GROUPS,
    LOG_LEVELS,
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
from vqa_async.config.settings import (
    OTHER_ENV,
    AskedSettings,
    Settings,
    add_arguments,
    allow_env,
    check_env,
    settings_env,
    settings_from_args,
)

__all__ = ["ENV_PREFIX", "GROUPS", "LOG_LEVELS", "OTHER_ENV", "AskedSettings", "BatchingSettings", "HealthSettings",
           "ImageSettings", "LimitSettings", "LoggingSettings", "MediaSettings", "ModelSettings", "ServerSettings",
           "Settings", "TeamSettings", "add_arguments", "allow_env", "check_env", "parse_bool", "settings_env",
           "settings_from_args"]
