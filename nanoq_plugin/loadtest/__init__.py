"""Serving load tests: start a real `vllm serve`, drive it with the OpenAI client, report against a baseline."""
