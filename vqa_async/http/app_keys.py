"""Typed aiohttp application keys (the app's shared state), in one place. API keys are http/auth.py's."""

from __future__ import annotations

from aiohttp import web

from vqa_async.config import Settings
from vqa_async.core.service import VqaService
from vqa_async.http.accesslog import AccessLog
from vqa_async.http.auth import AUTH as AUTH  # defined beside Auth: auth.py reads it, and this module imports auth.py
from vqa_async.http.quota import InflightLimit
from vqa_async.metrics import Metrics

SETTINGS = web.AppKey("settings", Settings)
METRICS = web.AppKey("metrics", Metrics)
SERVICE = web.AppKey("service", VqaService)
ACCESS_LOG = web.AppKey("access_log", AccessLog)
INFLIGHT = web.AppKey("inflight", InflightLimit)
