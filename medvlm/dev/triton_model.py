"""The Triton dev server's model: a Triton Python-backend model (``TritonPythonModel``) that
speaks the tensors of Triton's vLLM backend and drafts with the project's real vLLM engine behind
the Serve application (issue 19).

``medvlm/dev/triton.py`` copies this file into the dev server's model repository as
``<model>/1/model.py`` and writes its ``config.pbtxt``; ``tritonserver`` (the binary of PyPI's
nvidia-pytriton, run directly) loads it in its Python backend's stub, an embedded Debian
Python 3.11 (scripts/install-triton.sh), so it imports nothing of the project: the standard
library, numpy and the backend's ``triton_python_backend_utils``.

The tensors are those of Triton's vLLM backend (serving/triton_drafter.py documents them:
``text_input``, ``image``, ``stream``, ``sampling_parameters``, ``exclude_input_in_output``,
``return_*`` in; ``text_output``, ``finish_reason``, ``num_input_tokens``,
``num_output_tokens`` out), and the model does with them what that backend does (the rendered
prompt and the decoded images to vLLM, ``SamplingParams`` with ``structured_outputs``), except
that vLLM runs in the Serve replica: each request is forwarded over loopback to its
``POST /v1/generate``. No answer is canned.

The Serve app's URL is the model's ``serve_url`` parameter (config.pbtxt); its bearer token comes
from the environment (MEDVLM_TRITON_SERVE_API_KEY), never from the repository.

Decoupled, as the vLLM backend is (``model_transaction_policy``): the client must speak to it
as to a real site's model (a gRPC stream, HTTP generate), and ``execute`` returns at once. A
model that blocked in ``execute`` for a whole draft failed now and then on this 2-core machine
under the engine's load: the Python backend gives a stub one second to show it is alive while
the server waits for its answer, then reports "Stub process ... is not healthy", and a stale
answer later crashed the next request (SIGSEGV in the stub; measured 2026-12-02 with Triton
2.51, newer python_backend releases fix such crashes). PyTriton's own model proxy is not used
for the same reason: it blocks likewise and crashed after 1-6 drafts.
"""

from __future__ import annotations

import json
import os
import urllib.error
import urllib.request
from typing import Any

import numpy as np

# The SamplingParams fields the Serve route takes; others are refused, not silently ignored.
_SAMPLING = {"max_tokens", "temperature", "seed", "structured_outputs"}
API_KEY_ENV = "MEDVLM_TRITON_SERVE_API_KEY"


def _first(inputs: dict[str, Any], name: str) -> Any:
    value = inputs.get(name)
    if value is None or np.asarray(value).size == 0:
        return None
    return np.asarray(value).reshape(-1)[0]


def _text(value: Any) -> str:
    return value.decode("utf-8") if isinstance(value, bytes) else str(value)


def to_generate_body(inputs: dict[str, Any]) -> dict[str, Any]:
    """A vLLM-backend request (tensor name -> array) as the Serve app's ``/v1/generate`` body."""
    raw_prompt = _first(inputs, "text_input")
    if raw_prompt is None:
        raise ValueError("text_input is required")
    if bool(_first(inputs, "stream") or False):
        raise ValueError("stream=true is not served by this model (decoupled mode is off)")
    exclude = _first(inputs, "exclude_input_in_output")
    if exclude is not None and not bool(exclude):
        raise ValueError("exclude_input_in_output=false is not served by this model")
    images = inputs.get("image")
    body: dict[str, Any] = {
        "prompt": _text(raw_prompt),
        "images_b64": [_text(i) for i in np.asarray(images).reshape(-1)]
        if images is not None
        else [],
    }
    raw = _first(inputs, "sampling_parameters")
    sampling: dict[str, Any] = json.loads(_text(raw)) if raw is not None else {}
    unknown = sorted(set(sampling) - _SAMPLING)
    if unknown:
        raise ValueError(f"sampling_parameters not served here: {unknown}")
    for name in ("max_tokens", "temperature", "seed"):
        if name in sampling:
            body[name] = sampling[name]
    if "structured_outputs" in sampling:
        structured = sampling["structured_outputs"]
        if isinstance(structured, str):  # the vLLM backend json.loads it
            structured = json.loads(structured)
        if set(structured) != {"json"}:
            raise ValueError("structured_outputs: only {'json': schema} is served here")
        schema = structured["json"]
        body["json_schema"] = json.loads(schema) if isinstance(schema, str) else schema
    return body


def from_generate_answer(answer: dict[str, Any]) -> dict[str, np.ndarray[Any, Any]]:
    """The Serve app's answer as the vLLM backend's output tensors."""
    return {
        "text_output": np.array([answer["text"].encode("utf-8")], dtype=np.object_),
        "finish_reason": np.array([str(answer["finish_reason"]).encode()], dtype=np.object_),
        "num_input_tokens": np.array([answer["prompt_tokens"]], dtype=np.uint32),
        "num_output_tokens": np.array([answer["completion_tokens"]], dtype=np.uint32),
    }


class Generator:
    """Forwards one request body to the Serve app (no proxy: it is on loopback)."""

    def __init__(self, serve_url: str, api_key: str | None, timeout_s: float) -> None:
        self._url = serve_url.rstrip("/") + "/v1/generate"
        self._headers = {"Content-Type": "application/json"}
        if api_key:
            self._headers["Authorization"] = f"Bearer {api_key}"
        self._timeout_s = timeout_s
        self._opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))

    def __call__(self, body: dict[str, Any]) -> dict[str, Any]:
        request = urllib.request.Request(
            self._url, data=json.dumps(body).encode(), headers=self._headers, method="POST"
        )
        try:
            with self._opener.open(request, timeout=self._timeout_s) as response:
                answer: dict[str, Any] = json.loads(response.read())
                return answer
        except urllib.error.HTTPError as exc:
            # The detail is the engine's; it names no patient.
            detail = exc.read()[:300].decode("utf-8", "replace")
            raise RuntimeError(f"model: {exc.code} {detail}") from None


class TritonPythonModel:
    """The Python backend's entry points. Decoupled, as Triton's vLLM backend is: ``execute``
    hands each request to a worker thread and returns at once; the thread sends the one
    response (and the final flag) with the request's response sender when the Serve app has
    answered. So one instance has many drafts in flight, and the backend never waits in
    ``execute`` for a draft (a minute on CPU)."""

    def initialize(self, args: dict[str, str]) -> None:
        from concurrent.futures import ThreadPoolExecutor

        config = json.loads(args["model_config"])
        parameters = {k: v["string_value"] for k, v in config.get("parameters", {}).items()}
        self._generate = Generator(
            parameters["serve_url"],
            os.environ.get(API_KEY_ENV) or None,
            float(parameters.get("timeout_s", "600")),
        )
        self._pool = ThreadPoolExecutor(
            max_workers=int(parameters.get("max_in_flight", "16")),
            thread_name_prefix="medvlm-triton",
        )

    def execute(self, requests: list[Any]) -> None:
        import triton_python_backend_utils as pb_utils  # only inside the backend's stub

        for request in requests:
            inputs = {}
            for name in (
                "text_input",
                "image",
                "stream",
                "sampling_parameters",
                "exclude_input_in_output",
            ):
                tensor = pb_utils.get_input_tensor_by_name(request, name)
                if tensor is not None:
                    inputs[name] = tensor.as_numpy()
            self._pool.submit(self._answer, request.get_response_sender(), inputs)

    def _answer(self, sender: Any, inputs: dict[str, Any]) -> None:
        import triton_python_backend_utils as pb_utils

        final = pb_utils.TRITONSERVER_RESPONSE_COMPLETE_FINAL
        try:
            outputs = from_generate_answer(self._generate(to_generate_body(inputs)))
        except Exception as exc:  # the request's error, not the model's end
            sender.send(pb_utils.InferenceResponse(error=pb_utils.TritonError(str(exc))), final)
            return
        response = pb_utils.InferenceResponse(
            output_tensors=[pb_utils.Tensor(n, v) for n, v in outputs.items()]
        )
        sender.send(response, flags=final)

    def finalize(self) -> None:
        self._pool.shutdown(wait=False, cancel_futures=True)


# The model's configuration: the tensors of Triton's vLLM backend (no batch dimension).
CONFIG_TEMPLATE = """\
# Written by medvlm/dev/triton.py: the Triton dev server's model (medvlm/dev/triton_model.py).
backend: "python"
max_batch_size: 0
input [
  {{ name: "text_input" data_type: TYPE_STRING dims: [ 1 ] }},
  {{ name: "image" data_type: TYPE_STRING dims: [ -1 ] optional: true }},
  {{ name: "stream" data_type: TYPE_BOOL dims: [ 1 ] optional: true }},
  {{ name: "sampling_parameters" data_type: TYPE_STRING dims: [ 1 ] optional: true }},
  {{ name: "exclude_input_in_output" data_type: TYPE_BOOL dims: [ 1 ] optional: true }},
  {{ name: "return_finish_reason" data_type: TYPE_BOOL dims: [ 1 ] optional: true }},
  {{ name: "return_num_input_tokens" data_type: TYPE_BOOL dims: [ 1 ] optional: true }},
  {{ name: "return_num_output_tokens" data_type: TYPE_BOOL dims: [ 1 ] optional: true }}
]
output [
  {{ name: "text_output" data_type: TYPE_STRING dims: [ -1 ] }},
  {{ name: "finish_reason" data_type: TYPE_STRING dims: [ -1 ] }},
  {{ name: "num_input_tokens" data_type: TYPE_UINT32 dims: [ 1 ] }},
  {{ name: "num_output_tokens" data_type: TYPE_UINT32 dims: [ -1 ] }}
]
model_transaction_policy {{ decoupled: true }}
instance_group [ {{ count: {instances} kind: KIND_CPU }} ]
parameters [
  {{ key: "max_in_flight" value: {{ string_value: "{max_in_flight}" }} }},
  {{ key: "serve_url" value: {{ string_value: {serve_url} }} }},
  {{ key: "timeout_s" value: {{ string_value: "{timeout_s:g}" }} }}
]
"""


def model_config(
    serve_url: str, *, instances: int, timeout_s: float, max_in_flight: int = 16
) -> str:
    """The ``config.pbtxt`` of the dev server's model."""
    return CONFIG_TEMPLATE.format(
        serve_url=json.dumps(serve_url),
        instances=instances,
        timeout_s=timeout_s,
        max_in_flight=max_in_flight,
    )
