"""The grounding service as a Ray Serve application (deployment classes: `timeexpert.serve`).

    serve run serve_apps/config.yaml          # or: serve deploy serve_apps/config.yaml
    serve run serve_apps.grounding:app model.checkpoint=models:/timeexpert-demo/latest \\
        model.tracking_uri=sqlite:///.cache/demo/mlflow.db video.allowed_roots=.cache/demo/data/small

`app` is a typed application builder: its argument IS the service's one config,
`timeexpert.serve.settings.ServiceConfig`. `serve run` validates the YAML's `args:` (or the
`key=value` words, dotted for a nested field; a list as a comma-separated string) into it, and
an unknown or out-of-range field fails there, naming the field. The bearer token comes from
`auth_token` or the TIMEEXPERT_API_TOKEN environment variable of the process that builds the app.
"""

# No `from __future__ import annotations`: Serve reads the builder's parameter annotation at
# runtime to validate the arguments into ServiceConfig.
from ray.serve import Application

from timeexpert.serve.app import build_application
from timeexpert.serve.settings import ServiceConfig


def app(config: ServiceConfig) -> Application:
    """The typed builder `serve run` / `serve deploy` call."""
    return build_application(config)
