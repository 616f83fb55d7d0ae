"""No phone-home: the third-party usage reporting this project's stack would otherwise do.

Prefect's server sends analytics, Ray and vLLM report usage statistics and the Hugging Face hub
client sends telemetry; inside a hospital network none of that may leave (and on these machines
it fails noisily). ``disable_third_party_telemetry`` sets each library's documented opt-out in
the environment of this process and of every process it starts (Ray workers, vLLM engines, the
Prefect server). Entry points call it once, before those libraries start anything; a value the
operator set explicitly is kept.
"""

from __future__ import annotations

import os

OPT_OUTS = {
    "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
    "RAY_USAGE_STATS_ENABLED": "0",
    "VLLM_NO_USAGE_STATS": "1",
    "HF_HUB_DISABLE_TELEMETRY": "1",
    "DO_NOT_TRACK": "1",
}


def disable_third_party_telemetry() -> None:
    for name, value in OPT_OUTS.items():
        os.environ.setdefault(name, value)
