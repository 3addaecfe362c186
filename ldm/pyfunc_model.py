"""The MLflow pyfunc wrapper of a diffusers pipeline folder, logged as *model code*, not a pickle.

`ldm.registry.register_pipeline` logs this file with ``python_model=<path of this file>`` (MLflow's
"models from code"): MLflow copies the file next to the model and runs it on load, so the registry
never holds a cloudpickled Python object and nothing loads a pickle from storage. The pipeline itself
is the ``pipeline`` artifact, a diffusers folder with safetensors weights.

Our own code does not go through pyfunc (it downloads the artifacts and calls
`ldm.pipeline.load_pipeline`); the wrapper is there so that ``mlflow.pyfunc.load_model(uri)`` and
``mlflow models serve`` also work: input is a list of `PromptRow` dicts (``prompt`` required)
and optional ``seed``/``num_inference_steps``/``guidance_scale``/``scheduler``; output is one
base64 PNG per row.
"""

from __future__ import annotations

import base64
import io

import mlflow
from mlflow.pyfunc import PythonModel
from pydantic import BaseModel

PIPELINE_ARTIFACT = "pipeline"


class PromptRow(BaseModel):
    """One generation request; the type hint lets MLflow validate input and infer the signature."""

    prompt: str
    seed: int | None = None
    num_inference_steps: int = 25
    guidance_scale: float = 4.0
    scheduler: str = "dpmpp"


class DiffusersPipelineModel(PythonModel):
    def load_context(self, context) -> None:
        from ldm.pipeline import load_pipeline

        self.model = load_pipeline(context.artifacts[PIPELINE_ARTIFACT])

    def predict(self, context, model_input: list[PromptRow], params=None) -> list[str]:
        from ldm.pipeline import generate

        encoded = []
        for row in model_input:
            options = row.model_dump(exclude={"prompt"})
            image = generate(self.model.pipe, row.prompt, **options).images[0]
            buffer = io.BytesIO()
            image.save(buffer, format="PNG")
            encoded.append(base64.b64encode(buffer.getvalue()).decode("ascii"))
        return encoded


mlflow.models.set_model(DiffusersPipelineModel())
