"""The async script: every file at once under a semaphore, each polled every second.

Usage (the API key and server come from the environment, as the SDK reads them):

    BEM_API_KEY=... BEM_BASE_URL=... python bench/baselines/async_gather.py \
        --input-dir inbox/invoices --workflow invoices --output-dir outbox --concurrency 50
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import json
import os
from pathlib import Path

import bem
from bem.types import InputType

POLL_SECONDS = 1.0
TERMINAL = ("completed", "failed")
INPUT_TYPES: dict[str, InputType] = {
    ".txt": "text",
    ".pdf": "pdf",
    ".png": "png",
    ".jpg": "jpeg",
    ".json": "json",
}


async def process(
    client: bem.AsyncBem, semaphore: asyncio.Semaphore, path: Path, workflow: str, out: Path
) -> bool:
    async with semaphore:
        content = base64.b64encode(await asyncio.to_thread(path.read_bytes)).decode("ascii")
        input_type = INPUT_TYPES.get(path.suffix.lower(), "text")
        try:
            response = await client.workflows.call(
                workflow,
                input={"single_file": {"input_content": content, "input_type": input_type}},
            )
            call = response.call
            assert call is not None
            assert call.call_id is not None
            while call.status not in TERMINAL:
                await asyncio.sleep(POLL_SECONDS)
                polled = (await client.calls.retrieve(call.call_id)).call
                assert polled is not None
                call = polled
        except bem.APIError as exc:
            error = json.dumps({"error": str(exc)})
            await asyncio.to_thread((out / f"{path.name}.error.json").write_text, error)
            return False
        result = call.model_dump_json(by_alias=True)
        await asyncio.to_thread((out / f"{path.name}.json").write_text, result)
        return call.status == "completed"


async def run(paths: list[Path], workflow: str, output_dir: Path, concurrency: int) -> int:
    semaphore = asyncio.Semaphore(concurrency)
    async with bem.AsyncBem(
        api_key=os.environ["BEM_API_KEY"], base_url=os.environ.get("BEM_BASE_URL")
    ) as client:
        done = await asyncio.gather(
            *(process(client, semaphore, path, workflow, output_dir) for path in paths)
        )
    failures = done.count(False)
    print(f"{len(done) - failures} completed, {failures} failed")
    return 1 if failures else 0


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--input-dir", type=Path, required=True)
    parser.add_argument("--workflow", required=True)
    parser.add_argument("--output-dir", type=Path, required=True)
    parser.add_argument("--concurrency", type=int, default=50)
    args = parser.parse_args()
    args.output_dir.mkdir(parents=True, exist_ok=True)
    paths = sorted(p for p in args.input_dir.iterdir() if p.is_file())
    return asyncio.run(run(paths, args.workflow, args.output_dir, args.concurrency))


if __name__ == "__main__":
    raise SystemExit(main())
