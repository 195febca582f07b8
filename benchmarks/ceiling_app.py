"""The ceiling of the HTTP stack: a FastAPI route that only reads the body and answers a constant."""
from fastapi import FastAPI, Request
from starlette.responses import Response

app = FastAPI()
ANSWER = b'{"model":"m","version":"1","outputs":[[0.0]]}'


@app.post("/v1/models/{name}/encode")
async def encode(request: Request, name: str) -> Response:
    await request.body()
    return Response(ANSWER, media_type="application/json")


@app.get("/health/ready")
async def ready() -> Response:
    return Response(b"{}", media_type="application/json")
