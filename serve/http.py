"""The HTTP ingress of the Serve app: validate, authenticate, translate, encode (no model code here).

- ``POST /v1/generate`` and ``POST /v1/img2img``: the project's own API; the bodies are
  `ldm.request.GenerationRequest` / `ImageToImageRequest` (bad input: 422 naming the field);
  fields left out take the server's defaults (``num_inference_steps``, ``guidance_scale``,
  ``scheduler`` in `ServeConfig`); ``width``/``height`` must be multiples of the model's factor.
- ``POST /v1/images/generations`` and ``POST /v1/images/edits`` (multipart, served as image to
  image): OpenAI's images API as its SDK calls it (`serve.openai_api`); errors there are
  400/401/413/503 in OpenAI's error shape.
- ``GET /healthz``: the loaded model's name and version, open without a key.

Oversized bodies are refused (413) before parsing. With ``LDM_API_KEY`` set on the server, every
route but ``/healthz`` needs ``Authorization: Bearer <key>``; only the key's SHA-256 digest reaches
the replicas.
"""

import base64
import hashlib
import hmac
import json
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response
from pydantic import ValidationError
from ray import serve
from ray.serve.exceptions import BackPressureError
from ray.serve.handle import DeploymentHandle

from ldm.request import GenerationRequest
from serve import openai_api
from serve.schemas import SERVER_DEFAULTS, Img2ImgRequest, OpenAIImageRequest, decode_image, read_image

api = FastAPI(
    title="ldm text-to-image",
    version="1",
    description="Text-to-image and image-to-image with a latent diffusion model served by Ray Serve, "
    "plus OpenAI's images API. With LDM_API_KEY set on the server, every route but /healthz needs "
    "`Authorization: Bearer <key>`.",
)


def _field_error(field: str, message: str) -> JSONResponse:
    """A 422 shaped like FastAPI's own validation errors, for checks that need the server's state."""
    detail = [{"type": "value_error", "loc": ["body", field], "msg": message}]
    return JSONResponse({"detail": detail}, status_code=422)


def _overloaded() -> JSONResponse:
    return JSONResponse(
        {"detail": "server overloaded, retry later"}, status_code=503, headers={"Retry-After": "1"}
    )


@api.exception_handler(RequestValidationError)
async def _validation_error(request: Request, error: RequestValidationError) -> Response:
    """FastAPI's 422 minus the echoed input, ASCII-escaped; OpenAI's 400 shape on its routes.

    The default handler echoes each bad value back (a 16 MiB init image, say) and encodes the body as
    UTF-8, which fails with a 500 on a lone surrogate ("\\ud800" is valid JSON but not valid UTF-8).
    """
    errors = error.errors()
    if openai_api.is_openai_route(request.url.path):
        return openai_api.validation_error(list(errors))
    detail = [{"type": item["type"], "loc": list(item["loc"]), "msg": item["msg"]} for item in errors]
    return Response(json.dumps({"detail": detail}), status_code=422, media_type="application/json")


@api.middleware("http")
async def _guard(request: Request, call_next):
    """413 for oversized bodies, then 401 unless the bearer token matches (/healthz stays open)."""
    openai_route = openai_api.is_openai_route(request.url.path)
    limit: int | None = getattr(request.app.state, "max_body_bytes", None)
    length = request.headers.get("content-length", "")
    if limit is not None and length.isdigit() and int(length) > limit:
        message = f"body larger than {limit} bytes"
        if openai_route:
            return openai_api.error(413, message, None, "request_too_large")
        return JSONResponse({"detail": message}, status_code=413)
    expected: str | None = getattr(request.app.state, "api_key_sha256", None)
    if expected is None or request.url.path.rstrip("/").endswith("/healthz"):
        return await call_next(request)
    scheme, _, token = request.headers.get("authorization", "").partition(" ")
    provided = hashlib.sha256(token.strip().encode()).hexdigest() if scheme.lower() == "bearer" else ""
    # Digests of equal length, compared in constant time: the response time says nothing about the key.
    if not hmac.compare_digest(provided, expected):
        if openai_route:
            return openai_api.error(401, "missing or wrong API key", None, "invalid_api_key")
        return JSONResponse(
            {"detail": "missing or wrong API key"}, status_code=401, headers={"WWW-Authenticate": "Bearer"}
        )
    return await call_next(request)


def _wants_one_png(accept: str, num_images: int) -> bool | None:
    """True: answer PNG bytes; False: JSON; None: PNG only, but several images (a 406)."""
    if "image/png" not in accept:
        return False
    if num_images == 1:
        return True
    return False if ("json" in accept or "*/*" in accept) else None


@serve.deployment(ray_actor_options={"num_cpus": 0}, max_ongoing_requests=256, max_queued_requests=64)
@serve.ingress(api)
class Ingress:
    def __init__(
        self,
        generator: DeploymentHandle,
        api_key_sha256: str | None = None,
        max_body_bytes: int | None = None,
        max_init_image_pixels: int | None = None,
    ):
        self.generator = generator
        api.state.api_key_sha256 = api_key_sha256
        api.state.max_body_bytes = max_body_bytes
        self.max_init_image_pixels = max_init_image_pixels
        self.defaults: dict[str, Any] = {}
        self.model: dict[str, Any] | None = None  # the last answer of Generator.info

    def reconfigure(self, defaults: dict[str, Any]) -> None:
        """Defaults for omitted request fields: num_inference_steps, guidance_scale, scheduler."""
        self.defaults = dict(defaults)

    def _with_defaults(self, body: GenerationRequest) -> GenerationRequest:
        # model_copy does not validate: the defaults were validated as ServeConfig fields.
        missing = {key: self.defaults[key] for key in SERVER_DEFAULTS if key not in body.model_fields_set}
        return body.model_copy(update={key: value for key, value in missing.items() if key in self.defaults})

    async def _model_info(self) -> dict[str, Any]:
        if self.model is None:
            self.model = await self.generator.info.remote()
        return self.model

    async def _size_error(self, body: GenerationRequest) -> JSONResponse | None:
        if body.width is None and body.height is None:
            return None
        multiple = (await self._model_info())["size_multiple"]
        for field in ("width", "height"):
            side = getattr(body, field)
            if side is not None and side % multiple:
                return _field_error(field, f"{field} must be a multiple of {multiple} for this model")
        return None

    @api.get("/healthz")
    async def healthz(self) -> JSONResponse:
        """200 with the loaded model's name and version; 503 when no model replica answers."""
        try:
            self.model = await self.generator.info.remote()
        except BackPressureError:
            if self.model is None:  # never reached the model yet: not healthy
                return _overloaded()
        except Exception as error:  # a dead or failing model deployment: report it, do not 500
            return JSONResponse({"status": "unavailable", "detail": type(error).__name__}, status_code=503)
        assert self.model is not None
        model = {key: self.model[key] for key in ("name", "version", "uri", "dtype", "device")}
        return JSONResponse({"status": "ok", "model": model})

    @api.post("/v1/generate", response_model=None)
    async def generate(self, body: GenerationRequest, request: Request) -> Response:
        """Text to image. JSON: {images: [base64 PNG], seed, model, batch, ...}; or PNG bytes (Accept)."""
        png = _wants_one_png(request.headers.get("accept", ""), body.num_images)
        if png is None:
            return JSONResponse(
                {"detail": "Accept: image/png returns one image; ask for num_images=1 or accept JSON"},
                status_code=406,
            )
        try:
            if (refused := await self._size_error(body)) is not None:
                return refused
        except BackPressureError:
            return _overloaded()
        return await self._call(self.generator.generate.remote(self._with_defaults(body)), png)

    @api.post("/v1/img2img", response_model=None)
    async def img2img(self, body: Img2ImgRequest, request: Request) -> Response:
        """Image to image: the init image noised to `strength`, then denoised toward the prompt."""
        try:
            decode_image(body.init_image, self.max_init_image_pixels)
        except ValueError as error:
            return _field_error("init_image", str(error))
        request_body = self._with_defaults(body)
        assert isinstance(request_body, Img2ImgRequest)
        if request_body.denoising_steps() < 1:
            return _field_error("strength", "strength x num_inference_steps leaves no denoising step")
        png = _wants_one_png(request.headers.get("accept", ""), body.num_images)
        if png is None:
            return JSONResponse({"detail": "Accept: image/png returns one image"}, status_code=406)
        try:
            if (refused := await self._size_error(body)) is not None:
                return refused
        except BackPressureError:
            return _overloaded()
        return await self._call(self.generator.img2img.remote(request_body), png)

    async def _call(self, pending, png: bool) -> Response:
        try:
            result = await pending
        except BackPressureError:
            return _overloaded()
        except ValueError as error:  # the pipeline refused an argument the schema let through
            return JSONResponse({"detail": str(error)}, status_code=422)
        if png:
            headers = {
                "X-Seed": str(result["seed"]),
                "X-Model-Name": str(result["model"]["name"]),
                "X-Model-Version": str(result["model"]["version"]),
                "X-Batch-Size": str(result["batch"]["requests"]),
            }
            return Response(result["images"][0], media_type="image/png", headers=headers)
        images = [base64.b64encode(png_bytes).decode("ascii") for png_bytes in result.pop("images")]
        return JSONResponse({"images": images, **result})

    @api.post("/v1/images/generations", response_model=None)
    async def images_generations(self, body: OpenAIImageRequest) -> Response:
        """OpenAI's images API: {created, data: [{b64_json}]}; errors in OpenAI's shape."""
        try:
            model = await self._model_info()
            try:
                width, height = openai_api.parse_size(body.size, model)
            except ValueError as error:
                return openai_api.error(400, str(error), "size", "invalid_size")
            request = openai_api.to_request(body, width, height, self.defaults)
            result = await self.generator.generate.remote(request)
        except BackPressureError:
            return openai_api.error(503, "server overloaded, retry later", None, "overloaded")
        except ValueError as error:
            return openai_api.error(400, str(error), None, "invalid_value")
        images = [base64.b64encode(png_bytes).decode("ascii") for png_bytes in result["images"]]
        return JSONResponse(openai_api.answer(result, images))

    @api.post("/v1/images/edits", response_model=None)
    async def images_edits(self, request: Request) -> Response:
        """OpenAI's image edits (multipart ``image`` + fields) as image to image; OpenAI's shapes."""
        try:
            form = await request.form(max_files=4, max_fields=64)
            raw, body = await openai_api.read_edit_form(form)
            read_image(raw, self.max_init_image_pixels)  # checked here, decoded again by the replica
        except ValidationError as error:
            return openai_api.validation_error(error.errors())
        except openai_api.FormError as error:
            return openai_api.error(400, str(error), error.param, "invalid_value")
        except ValueError as error:  # read_image, or a form starlette could not parse
            return openai_api.error(400, f"image: {error}", "image", "invalid_image")
        # The image travels to the model replica as the /v1/img2img body carries it: base64.
        init_image = base64.b64encode(raw).decode("ascii")
        try:
            model = await self._model_info()
            width, height = openai_api.parse_size(body.size, model)
        except BackPressureError:
            return openai_api.error(503, "server overloaded, retry later", None, "overloaded")
        except ValueError as error:
            return openai_api.error(400, str(error), "size", "invalid_size")
        try:
            edit = openai_api.to_edit_request(body, init_image, width, height, self.defaults)
        except ValidationError as error:
            return openai_api.validation_error(error.errors())
        if edit.denoising_steps() < 1:
            message = "strength x num_inference_steps leaves no denoising step"
            return openai_api.error(400, message, "strength", "invalid_value")
        try:
            result = await self.generator.img2img.remote(edit)
        except BackPressureError:
            return openai_api.error(503, "server overloaded, retry later", None, "overloaded")
        except ValueError as error:
            return openai_api.error(400, str(error), None, "invalid_value")
        images = [base64.b64encode(png_bytes).decode("ascii") for png_bytes in result["images"]]
        return JSONResponse(openai_api.answer(result, images))
