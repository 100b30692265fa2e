"""Drive an OpenAI-compatible server with a fixed load and summarize what each request saw.

The load is `vllm bench serve --dataset-name random`'s: prompts of exactly `prompt_tokens` token ids drawn
with a seed (sent as token ids, so no tokenizer runs on either side), `output_tokens` new tokens per request
with `ignore_eos`, greedy, streamed so that the time to the first token is seen. At most `concurrency`
requests are in flight; the clock runs from the first request sent to the last one finished.
"""

from __future__ import annotations

import asyncio
import random
import time
from dataclasses import asdict, dataclass

LOW_TOKEN_ID = 1000  # skip the special and byte tokens at the start of the vocabulary


@dataclass(frozen=True)
class LoadSpec:
    """One load level: `requests` requests, at most `concurrency` in flight."""

    concurrency: int
    requests: int
    prompt_tokens: int = 256
    output_tokens: int = 128


@dataclass
class RequestRecord:
    """What one request saw (seconds from its send). `error` is None for a request that completed."""

    ttft: float | None = None
    latency: float | None = None
    output_tokens: int = 0
    finish_reason: str | None = None
    error: str | None = None

    @property
    def tpot(self) -> float | None:
        """Seconds per output token after the first."""
        if self.ttft is None or self.latency is None or self.output_tokens < 2:
            return None
        return (self.latency - self.ttft) / (self.output_tokens - 1)


def random_prompts(count: int, length: int, vocab_size: int, seed: int = 0) -> list[list[int]]:
    """`count` prompts of `length` token ids in `[LOW_TOKEN_ID, vocab_size)`, the same for the same seed."""
    rng = random.Random(seed)
    return [[rng.randrange(LOW_TOKEN_ID, vocab_size) for _ in range(length)] for _ in range(count)]


async def one_request(client, model: str, prompt: list[int], output_tokens: int) -> RequestRecord:
    """Send one streamed completion and time it; errors are recorded, never raised."""
    start = time.perf_counter()
    record = RequestRecord()
    try:
        stream = await client.completions.create(
            model=model, prompt=prompt, max_tokens=output_tokens, temperature=0, stream=True,
            stream_options={"include_usage": True}, extra_body={"ignore_eos": True})
        async for chunk in stream:
            if chunk.choices:
                choice = chunk.choices[0]
                if record.ttft is None and choice.text:
                    record.ttft = time.perf_counter() - start
                if choice.finish_reason:
                    record.finish_reason = choice.finish_reason
            if chunk.usage is not None:
                record.output_tokens = chunk.usage.completion_tokens
        record.latency = time.perf_counter() - start
        if record.output_tokens != output_tokens or record.finish_reason != "length":
            record.error = (f"incomplete: {record.output_tokens} of {output_tokens} tokens, "
                            f"finish_reason {record.finish_reason}")
    except Exception as exc:  # noqa: BLE001 - a failed request is a measurement, not a crash
        record.latency = time.perf_counter() - start
        record.error = f"{type(exc).__name__}: {str(exc)[:300]}"
    return record


async def drive(base_url: str, model: str, prompts: list[list[int]], spec: LoadSpec,
                timeout: float = 600) -> tuple[list[RequestRecord], float]:
    """Send `spec.requests` requests (prompts reused round-robin) with `spec.concurrency` in flight.

    Returns the records and the wall time in seconds. Gives up after `timeout` seconds (raises TimeoutError).
    """
    from openai import AsyncOpenAI

    limit = asyncio.Semaphore(spec.concurrency)
    async with AsyncOpenAI(base_url=base_url + "/v1", api_key="unused", max_retries=0, timeout=timeout) as client:
        async def limited(prompt):
            async with limit:
                return await one_request(client, model, prompt, spec.output_tokens)

        start = time.perf_counter()
        tasks = [limited(prompts[i % len(prompts)]) for i in range(spec.requests)]
        records = await asyncio.wait_for(asyncio.gather(*tasks), timeout)
        return list(records), time.perf_counter() - start


def percentile(values: list[float], q: float) -> float | None:
    """The q-th percentile (0-100) by linear interpolation; None for no values."""
    if not values:
        return None
    ordered = sorted(values)
    position = (len(ordered) - 1) * q / 100
    low = int(position)
    high = min(low + 1, len(ordered) - 1)
    return ordered[low] + (ordered[high] - ordered[low]) * (position - low)


def summarize(records: list[RequestRecord], wall_seconds: float, spec: LoadSpec) -> dict:
    """Output tokens/s, requests/s, TTFT and TPOT p50/p99 (ms) and the error count of one load level."""
    done = [r for r in records if r.error is None]
    ttft = [r.ttft for r in done if r.ttft is not None]
    tpot = [r.tpot for r in done if r.tpot is not None]
    ms = lambda v: None if v is None else round(v * 1000, 2)  # noqa: E731
    return {
        **asdict(spec),
        "completed": len(done),
        "errors": len(records) - len(done),
        "first_errors": sorted({r.error for r in records if r.error})[:3],
        "wall_s": round(wall_seconds, 3),
        "output_tokens_per_s": round(sum(r.output_tokens for r in done) / wall_seconds, 2),
        "requests_per_s": round(len(done) / wall_seconds, 3),
        "ttft_ms_p50": ms(percentile(ttft, 50)), "ttft_ms_p99": ms(percentile(ttft, 99)),
        "tpot_ms_p50": ms(percentile(tpot, 50)), "tpot_ms_p99": ms(percentile(tpot, 99)),
    }


def run_level(base_url: str, model: str, spec: LoadSpec, vocab_size: int, seed: int = 0,
              timeout: float = 600) -> dict:
    """Drive one load level synchronously and return its `summarize` dict."""
    prompts = random_prompts(min(spec.requests, 256), spec.prompt_tokens, vocab_size, seed)
    records, wall = asyncio.run(drive(base_url, model, prompts, spec, timeout))
    return summarize(records, wall, spec)
