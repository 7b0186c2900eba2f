"""`miles serve`: the native engine behind SGLang's native API and the OpenAI API (FastAPI)."""

from __future__ import annotations

from typing import Annotated, Optional

import typer

from miles_cli.common import DebugOption, SetOption, cli_errors, console

app = typer.Typer(no_args_is_help=True, help="Serve a model with SGLang's native and the OpenAI HTTP API.")


# Usage shows the options, not `COMMAND [ARGS]...`: the sub-app has no subcommands.
@app.callback(invoke_without_command=True, subcommand_metavar="")
def serve(
    model: Annotated[str, typer.Option("--model", help="Model to serve: HF dir, .gguf or built-in name.")],
    host: Annotated[str, typer.Option(help="Interface to bind (0.0.0.0 exposes it to the network).")] = "127.0.0.1",
    port: Annotated[int, typer.Option(help="Port (0 picks a free one).")] = 30000,
    api_key: Annotated[str, typer.Option(help="Require `Authorization: Bearer KEY` on every route but /health.")] = "",
    allow_unauthenticated_weight_updates: Annotated[bool, typer.Option(
        help="Serve weight-update and memory routes without --api-key (trusted networks only).")] = False,
    allowed_model_root: Annotated[Optional[list[str]], typer.Option(
        help="Folder /update_weights_from_disk may load from (repeatable; the served model's folder always).")] = None,
    max_request_bytes: Annotated[int, typer.Option(help="Largest request body; larger gets 413.")] = 8 << 20,
    batch_window_ms: Annotated[float, typer.Option(help="How long concurrent requests are gathered into one batch.")] = 5.0,
    served_model_name: Annotated[str, typer.Option(help="Model name reported by /v1/models (default: its path).")] = "",
    recipe: Annotated[Optional[str], typer.Option("--recipe", "-r", help="Recipe whose [model]/[engine] to use (optional).")] = None,
    overrides: SetOption = None,
    _debug: DebugOption = False,
) -> None:
    """Serve `--model` until Ctrl-C: SGLang's /generate and control routes, OpenAI /v1 routes."""
    with cli_errors():
        _require_serve_extra()
        from miles_core.serve import ServeOptions, build_state, serve as run_server
        from miles_core.serve.server import serve_config

        options = ServeOptions(host=host, port=port, api_key=api_key,
                               allow_unauthenticated_weight_updates=allow_unauthenticated_weight_updates,
                               allowed_model_roots=tuple(allowed_model_root or ()), max_request_bytes=max_request_bytes,
                               batch_window_ms=batch_window_ms, served_model_name=served_model_name)
        state = build_state(serve_config(model, recipe, overrides or []), options)
        run_server(state, on_ready=lambda url: console.print(f"miles serve: {state.model_name} at {url}", highlight=False))


def _require_serve_extra() -> None:
    """fastapi and uvicorn come with `pip install 'miles[serve]'`, not with the base install."""
    import importlib.util

    from miles_core.errors import MilesError

    missing = [name for name in ("fastapi", "uvicorn") if importlib.util.find_spec(name) is None]
    if missing:
        raise MilesError(f"miles serve needs {', '.join(missing)}: pip install -e '.[serve]' (or 'miles[serve]')")
