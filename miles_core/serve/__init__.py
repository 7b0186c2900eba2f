"""`miles serve`: the native engine behind SGLang's native HTTP API and the OpenAI API.

app.py (the FastAPI app: auth, limits, error shapes), native_routes.py (SGLang `/generate` and
control routes), memory_routes.py (release / resume memory for colocation), readback_routes.py
(`/get_weights_by_name`), openai_routes.py (`/v1/...`), schemas.py (strict request bodies),
state.py (what routes share, request conversion and checks), worker.py (batches concurrent requests
into one `RolloutEngine.generate` call), weights.py (weight updates), server.py (build, run, test
thread).
"""

from miles_core.serve.server import ServerThread, build_state, serve
from miles_core.serve.state import ServeOptions, ServeState

__all__ = ["ServeOptions", "ServeState", "ServerThread", "build_state", "serve"]
