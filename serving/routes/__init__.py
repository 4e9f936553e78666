"""The HTTP API, one module per endpoint group, each an `APIRouter` that create_app (serving/app.py) includes, as
vLLM lays out its OpenAI server. A route takes what it works on through serving/dependencies.py and refuses by
raising serving.errors.ApiError; a non-streamed answer is a typed `response_model` (serving/response_models.py).

Generation endpoints are plain functions, not coroutines, so FastAPI runs them in its thread pool: onnxruntime
sessions are thread-safe and release the GIL, so concurrent requests decode in parallel. Endpoints that only read
state (health, metrics, models) are coroutines, answered on the event loop even while generation holds every
thread of the pool.
"""
