"""Import-path entry point of the model service on a Ray cluster (``serving.cluster_app:app``).

KubeRay's RayService names this in ``serveConfigV2`` (k8s/medvlm); Ray Serve imports it on the
cluster and deploys ``app``. Settings come from the pod environment (``MEDVLM_*``), read once
here. It must not build the tiny checkpoint or hash weights: a cluster always names its model
(``MEDVLM_MODEL__SOURCE``), and loading it is the replicas' job, not this import's.
"""

from __future__ import annotations

from medvlm.errors import ConfigurationError
from medvlm.settings import MedvlmSettings
from serving.app import build_app

settings = MedvlmSettings()
if settings.model.source is None:
    raise ConfigurationError(
        "MEDVLM_MODEL__SOURCE is unset: a cluster deployment needs a checkpoint path or hub id"
    )
app = build_app(settings, settings.model.source)
