"""Reliability under load: many well-formed requests and a few malformed ones against one server.

Every well-formed request must complete with exactly the tokens it asked for; every malformed one (a body
that is not JSON, a negative `max_tokens`, a prompt longer than the context) must get a 4xx answer while
the load runs, and the server must still answer `/health` and a fresh request afterwards.
"""

from __future__ import annotations

import asyncio
import time

from .load_client import LoadSpec, drive, random_prompts, summarize


def malformed_requests(model: str, max_model_len: int) -> dict[str, dict]:
    """Name -> keyword arguments of an `httpx` POST to `/v1/completions` that a server must refuse with 4xx."""
    too_long = list(range(1000, 1000 + max_model_len + 16))
    return {
        "body is not JSON": {"content": b'{"model": "x", "prompt": [1, 2', "headers": {"content-type": "application/json"}},
        "negative max_tokens": {"json": {"model": model, "prompt": [1000, 1001], "max_tokens": -1}},
        "prompt longer than the context": {"json": {"model": model, "prompt": too_long, "max_tokens": 4}},
        "unknown model": {"json": {"model": "no-such-model", "prompt": [1000], "max_tokens": 4}},
    }


async def _send_malformed(base_url: str, model: str, max_model_len: int, delay: float) -> list[dict]:
    import httpx

    answers = []
    async with httpx.AsyncClient(base_url=base_url, timeout=60) as client:
        for name, request in malformed_requests(model, max_model_len).items():
            await asyncio.sleep(delay)  # spread them over the load
            response = await client.post("/v1/completions", **request)
            answers.append({"request": name, "status": response.status_code,
                            "refused_4xx": 400 <= response.status_code < 500, "body": response.text[:200]})
    return answers


async def _after_load(base_url: str, model: str) -> bool:
    import httpx

    async with httpx.AsyncClient(base_url=base_url, timeout=60) as client:
        health = await client.get("/health")
        fresh = await client.post("/v1/completions", json={"model": model, "prompt": [1000, 1001, 1002],
                                                           "max_tokens": 4, "temperature": 0})
    return health.status_code == 200 and fresh.status_code == 200 and fresh.json()["usage"]["completion_tokens"] == 4


async def _reliability(base_url: str, model: str, spec: LoadSpec, vocab_size: int, max_model_len: int,
                       timeout: float) -> dict:
    prompts = random_prompts(64, spec.prompt_tokens, vocab_size, seed=1)
    load = asyncio.ensure_future(drive(base_url, model, prompts, spec, timeout))
    malformed = await _send_malformed(base_url, model, max_model_len, delay=1.0)
    records, wall = await load
    serving_after = await _after_load(base_url, model)
    return {"load": summarize(records, wall, spec), "malformed": malformed, "serving_after": serving_after}


def reliability_check(base_url: str, model: str, vocab_size: int, max_model_len: int, requests: int = 1000,
                      concurrency: int = 32, prompt_tokens: int = 8, output_tokens: int = 8,
                      timeout: float = 900) -> dict:
    """Run the check; returns the load summary, each malformed request's status, whether the server still
    serves, and `passed` (zero failed or incomplete requests, every malformed one refused with 4xx, serving
    after). Raises TimeoutError if the whole check takes longer than `timeout` seconds."""
    spec = LoadSpec(concurrency=concurrency, requests=requests, prompt_tokens=prompt_tokens,
                    output_tokens=output_tokens)
    start = time.perf_counter()
    result = asyncio.run(asyncio.wait_for(_reliability(base_url, model, spec, vocab_size, max_model_len, timeout),
                                          timeout))
    result["seconds"] = round(time.perf_counter() - start, 1)
    result["passed"] = (result["load"]["errors"] == 0 and result["load"]["completed"] == requests
                        and all(m["refused_4xx"] for m in result["malformed"]) and result["serving_after"])
    return result
