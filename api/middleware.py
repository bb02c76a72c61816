"""ASGI middleware."""

from starlette.types import ASGIApp, Receive, Scope, Send

_FORM = b"application/x-www-form-urlencoded"


class FormBodyAsJSON:
    """Read `curl -d '{...}'` bodies as JSON.

    curl's `-d` labels the body as a form; this API has no form endpoints, so such a body is parsed as JSON
    (and a body that is not JSON gets the usual 400), the way Ollama and vLLM accept it.
    """

    def __init__(self, app: ASGIApp):
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http":
            headers = scope["headers"]
            if any(name == b"content-type" and value.startswith(_FORM) for name, value in headers):
                scope = dict(
                    scope,
                    headers=[
                        (name, b"application/json" if name == b"content-type" else value) for name, value in headers
                    ],
                )
        await self.app(scope, receive, send)
