"""The application builder for ``serve deploy`` (see ``deploy/serve.yaml``).

Ray Serve calls :func:`build_flowray` with the ``args`` of the config file when it
(re)deploys the application. It starts the rest of flowray — the shard groups, the
processor and the ingest gateway — as detached named actors, or finds them when they
are already running (a redeploy, a config change), and returns the API deployment.
It is the alternative to ``flowray up`` on a Ray cluster that is managed with Serve's
config files; ``flowray down --named`` ends the actors after ``serve shutdown``.
"""

from __future__ import annotations

from typing import Any

from ray.serve import Application

from flowray.cluster import control as cluster
from flowray.config import Settings
from flowray.serve.deployment import api_application


def settings_from_args(args: dict[str, Any]) -> Settings:
    """Defaults, then FLOWRAY_* variables, then the config file's ``args``."""
    try:
        return Settings.from_env(**args).validate()
    except TypeError as exc:  # an unknown key in args
        raise ValueError(f"bad flowray args in the Serve config: {exc}") from None


def build_flowray(args: dict[str, Any]) -> Application:
    settings = settings_from_args(args)
    settings = cluster.resolved(cluster.settle_layout(settings))
    cluster.start_backend(settings, gateway=True, detached=True)
    return api_application(settings)
