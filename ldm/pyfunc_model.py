"""The MLflow pyfunc wrapper of a diffusers pipeline folder, logged as *model code*, not a pickle.

`ldm.registry.register_pipeline` logs this file by path (``python_model=<path of this file>``,
MLflow's "models from code"): MLflow copies it next to the model and runs it on load, so the registry
never holds a cloudpickled Python object and nothing loads a pickle from storage. The pipeline itself
is the ``pipeline`` artifact, a diffusers folder with safetensors weights. The ``ldm`` package is
logged with the model as ``code_paths`` and the requirements are pinned, so the model loads and
serves without this project installed (``mlflow models serve``, any env manager, a plain
model-serving image).

Our own code does not go through pyfunc (it downloads the artifacts and calls
`ldm.pipeline.load_pipeline`); the wrapper is for ``mlflow.pyfunc.load_model(uri).predict(...)`` and
``mlflow models serve``: the input is a list of `PromptRow` (``prompt`` required, the other fields of
`ldm.request.GenerationRequest` optional), i.e. ``{"inputs": [{"prompt": ...}]}`` over HTTP; the
output is one base64 PNG per row.
"""

from __future__ import annotations

import base64
import io

import mlflow
from mlflow.pyfunc import PythonModel
from pydantic import BaseModel

PIPELINE_ARTIFACT = "pipeline"


class PromptRow(BaseModel):
    """One row of the pyfunc's input; the type hint lets MLflow validate input and infer the signature.

    Plain types only (MLflow's signature inference does not take Literal or constrained types); the
    row becomes a `GenerationRequest`, which checks the limits and the scheduler name.
    """

    prompt: str
    negative_prompt: str | None = None
    seed: int | None = None
    num_inference_steps: int | None = None
    guidance_scale: float | None = None
    scheduler: str | None = None
    width: int | None = None
    height: int | None = None


class DiffusersPipelineModel(PythonModel):
    def load_context(self, context) -> None:
        from ldm.pipeline import load_pipeline

        self.model = load_pipeline(context.artifacts[PIPELINE_ARTIFACT])

    def predict(self, context, model_input: list[PromptRow], params=None) -> list[str]:
        from ldm.pipeline import generate
        from ldm.request import GenerationRequest

        encoded = []
        for row in model_input:
            # exclude_none: a field the caller left out takes GenerationRequest's default.
            request = GenerationRequest(**row.model_dump(exclude_none=True))
            image = generate(self.model.pipe, request).images[0]
            buffer = io.BytesIO()
            image.save(buffer, format="PNG")
            encoded.append(base64.b64encode(buffer.getvalue()).decode("ascii"))
        return encoded


mlflow.models.set_model(DiffusersPipelineModel())
