"""GPU smoke test: serve a nano checkpoint with SGLang, send one OpenAI chat completion, print the answer.

    python benchmarks/sglang_smoke.py DIR [--port 30000] [--timeout 600] [-- extra launch_server args]

Needs a CUDA GPU, SGLang 0.5.23 and nanoq installed in the same environment (`pip install -e .[sglang]`).
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import time
import urllib.error
import urllib.request

from openai import OpenAI

from nanoq_plugin.loadtest.vllm_process import stop_process_group


def wait_until_healthy(server: subprocess.Popen, base: str, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if server.poll() is not None:
            sys.exit(f"sglang.launch_server exited with code {server.returncode} before it was ready")
        try:
            with urllib.request.urlopen(f"{base}/health", timeout=5) as response:
                if response.status == 200:
                    return
        except (urllib.error.URLError, ConnectionError):
            pass
        time.sleep(2)
    sys.exit(f"sglang.launch_server was not healthy after {timeout:.0f} s")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("model_dir")
    parser.add_argument("--port", type=int, default=30000)
    parser.add_argument("--timeout", type=float, default=600, help="seconds to wait for the server")
    parser.add_argument("--prompt", default="What is the capital of France? Answer in one sentence.")
    argv = sys.argv[1:]
    split = argv.index("--") if "--" in argv else len(argv)
    args, extra = parser.parse_args(argv[:split]), argv[split + 1:]  # after `--`: more launch_server arguments

    command = [sys.executable, "-m", "sglang.launch_server", "--model-path", args.model_dir,
               "--quantization", "nano", "--dtype", "bfloat16", "--host", "127.0.0.1", "--port", str(args.port),
               *extra]
    print(" ".join(command), flush=True)
    base = f"http://127.0.0.1:{args.port}"
    server = subprocess.Popen(command, start_new_session=True)  # its own group: the scheduler processes too
    try:
        wait_until_healthy(server, base, args.timeout)
        client = OpenAI(base_url=f"{base}/v1", api_key="unused")
        model = client.models.list().data[0].id
        reply = client.chat.completions.create(
            model=model, messages=[{"role": "user", "content": args.prompt}], max_tokens=64, temperature=0
        )
        print(f"{model}: {reply.choices[0].message.content}")
    finally:
        stop_process_group(server, grace_seconds=60)


if __name__ == "__main__":
    main()
