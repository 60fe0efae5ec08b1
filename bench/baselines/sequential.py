"""The plain script: one file at a time, submit, poll every second, write the result.

Usage (the API key and server come from the environment, as the SDK reads them):

    BEM_API_KEY=... BEM_BASE_URL=... python bench/baselines/sequential.py \
        --input-dir inbox/invoices --workflow invoices --output-dir outbox
"""

from __future__ import annotations

import argparse
import base64
import json
import os
import time
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


def process(client: bem.Bem, path: Path, workflow: str, output_dir: Path) -> bool:
    content = base64.b64encode(path.read_bytes()).decode("ascii")
    input_type = INPUT_TYPES.get(path.suffix.lower(), "text")
    try:
        response = client.workflows.call(
            workflow, input={"single_file": {"input_content": content, "input_type": input_type}}
        )
        call = response.call
        assert call is not None
        assert call.call_id is not None
        while call.status not in TERMINAL:
            time.sleep(POLL_SECONDS)
            polled = client.calls.retrieve(call.call_id).call
            assert polled is not None
            call = polled
    except bem.APIError as exc:
        (output_dir / f"{path.name}.error.json").write_text(json.dumps({"error": str(exc)}))
        return False
    (output_dir / f"{path.name}.json").write_text(call.model_dump_json(by_alias=True))
    return call.status == "completed"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--input-dir", type=Path, required=True)
    parser.add_argument("--workflow", required=True)
    parser.add_argument("--output-dir", type=Path, required=True)
    parser.add_argument("--limit", type=int, default=None, help="only the first N files")
    args = parser.parse_args()
    args.output_dir.mkdir(parents=True, exist_ok=True)
    client = bem.Bem(api_key=os.environ["BEM_API_KEY"], base_url=os.environ.get("BEM_BASE_URL"))
    paths = sorted(p for p in args.input_dir.iterdir() if p.is_file())[: args.limit]
    failures = sum(not process(client, path, args.workflow, args.output_dir) for path in paths)
    print(f"{len(paths) - failures} completed, {failures} failed")
    return 1 if failures else 0


if __name__ == "__main__":
    raise SystemExit(main())
