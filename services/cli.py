"""`dgserve` command line: run the stack (`up`, `api`, `worker`) and use it (`generate`, `edit`, `status`,
`cancel`). Client commands read `--url` / `DGSERVE_URL` and `--api-key` / `DGSERVE_API_KEY`."""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

import httpx

from services.client import DEFAULT_URL, DgserveClient, DgserveError
from services.schemas import JobPublic

EXIT_OK, EXIT_JOB_FAILED, EXIT_USAGE = 0, 1, 2


def _add_client_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--url", default=os.environ.get("DGSERVE_URL", DEFAULT_URL), help="API base URL")
    parser.add_argument("--api-key", default=os.environ.get("DGSERVE_API_KEY"), help="bearer key (or DGSERVE_API_KEY)")
    parser.add_argument("--json", action="store_true", help="print the job as JSON")


def _add_sampler_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--max-new-tokens", type=int)
    parser.add_argument("--steps", type=int, dest="max_denoising_steps", help="denoising step cap per canvas")
    parser.add_argument("--seed", type=int)
    parser.add_argument("--timeout", type=float, default=600.0, help="seconds to wait for the result")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="dgserve", description="Job service for diffusion language models")
    commands = parser.add_subparsers(dest="command", required=True)
    up = commands.add_parser("up", help="Redis + one worker + the API on this machine (Ctrl-C stops all)")
    up.add_argument("--host", default="127.0.0.1")
    up.add_argument("--port", type=int, default=8000)
    up.add_argument("--cpu", action="store_true", help="run the worker on the CPU even if a GPU is present")
    api = commands.add_parser("api", help="serve the HTTP API (settings from DGSERVE_* variables)")
    api.add_argument("--host")
    api.add_argument("--port", type=int)
    commands.add_parser("worker", add_help=False, help="run a worker: python -m worker [--gpu N|--cpu] ...")
    generate = commands.add_parser("generate", help="submit a prompt, show progress, print the result")
    generate.add_argument("prompt")
    generate.add_argument("--drafts", action="store_true", help="show the draft of each denoising step")
    _add_client_options(generate)
    _add_sampler_options(generate)
    edit = commands.add_parser("edit", help="regenerate a span of a file in place")
    edit.add_argument("file", type=Path)
    target = edit.add_mutually_exclusive_group(required=True)
    target.add_argument("--span", help="START:END character offsets")
    target.add_argument("--find", help="exact text occurring once in the file")
    edit.add_argument("--instruction")
    edit.add_argument("--max-tokens", type=int, help="room for the replacement in tokens (default: the span's own "
                      "token length; the model may use fewer)")
    edit.add_argument("--write", action="store_true", help="write the edited file back (default: print a diff)")
    _add_client_options(edit)
    _add_sampler_options(edit)
    for name, text in (("status", "show a job"), ("cancel", "cancel a job")):
        sub = commands.add_parser(name, help=text)
        sub.add_argument("job_id")
        _add_client_options(sub)
    return parser


def _sampler_params(args: argparse.Namespace) -> dict:
    names = ("max_new_tokens", "max_denoising_steps", "seed")
    return {name: getattr(args, name) for name in names if getattr(args, name) is not None}


def _follow(client: DgserveClient, job_id: str, show_drafts: bool) -> None:
    """Print progress on stderr while the job runs (drafts overwrite one line)."""
    for event in client.events(job_id):
        if event.event == "draft" and show_drafts:
            text = str(event.data.get("text", "")).replace("\n", " ")[-100:]
            print(f"\r\x1b[2K[canvas {event.data.get('canvas', 0)} step {event.data.get('step', '?')}] {text}",
                  end="", file=sys.stderr, flush=True)
        elif event.event in ("started", "canvas"):
            detail = f"canvas {event.data.get('canvas')}" if event.event == "canvas" else "running"
            print(f"\r\x1b[2K{job_id}: {detail}", end="", file=sys.stderr, flush=True)
    print(file=sys.stderr)


def _finish(client: DgserveClient, job_id: str, args: argparse.Namespace) -> tuple[int, JobPublic]:
    """Wait for the job and report a failure; returns (exit code, the finished job)."""
    job = client.wait(job_id, timeout=args.timeout)
    if args.json:
        print(job.model_dump_json(indent=2))
    elif job.status != "succeeded":
        error = f": {job.error.code}: {job.error.message}" if job.error else ""
        print(f"job {job_id} {job.status}{error}", file=sys.stderr)
    return (EXIT_OK if job.status == "succeeded" else EXIT_JOB_FAILED), job


def cmd_generate(client: DgserveClient, args: argparse.Namespace) -> int:
    accepted = client.generate(args.prompt, stream_drafts=args.drafts, **_sampler_params(args))
    print(f"job {accepted.id} queued", file=sys.stderr)
    _follow(client, accepted.id, args.drafts)
    code, job = _finish(client, accepted.id, args)
    if code == EXIT_OK and not args.json:
        print((job.result or {}).get("text", ""))
    return code


def cmd_edit(client: DgserveClient, args: argparse.Namespace) -> int:
    document = args.file.read_bytes().decode("utf-8")
    if args.span is not None:
        start, sep, end = args.span.partition(":")
        if not sep or not start.strip().isdigit() or not end.strip().isdigit():
            raise DgserveError(0, "usage", f"--span must look like START:END, got {args.span!r}")
        spec: dict = {"start": int(start), "end": int(end)}
    else:
        spec = {"find": args.find}
    if args.instruction:
        spec["instruction"] = args.instruction
    if args.max_tokens is not None:
        spec["max_tokens"] = args.max_tokens
    accepted = client.edit(document, [spec], **_sampler_params(args))
    _follow(client, accepted.id, show_drafts=False)
    code, job = _finish(client, accepted.id, args)
    result = job.result or {}
    if code == EXIT_OK and not args.json:
        if args.write:
            args.file.write_bytes(str(result["document"]).encode("utf-8"))
            print(f"wrote {args.file}", file=sys.stderr)
        else:
            print(result.get("diff") or result.get("document", ""))
    return code


def cmd_status_or_cancel(client: DgserveClient, args: argparse.Namespace) -> int:
    job = client.get(args.job_id) if args.command == "status" else client.cancel(args.job_id)
    if args.json:
        print(job.model_dump_json(indent=2))
    else:
        progress = f" canvas {job.progress.canvas} step {job.progress.step}" if job.progress else ""
        print(f"{job.id} {job.kind} {job.status}{progress} attempts={job.attempts}")
        if job.error:
            print(f"error {job.error.code}: {job.error.message}")
    return EXIT_OK


def run_api(args: argparse.Namespace) -> int:
    import uvicorn

    from services.api.app import create_app
    from services.settings import Settings

    settings = Settings()
    uvicorn.run(create_app(settings), host=args.host or settings.api_host, port=args.port or settings.api_port)
    return EXIT_OK


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] == ["worker"]:  # everything after `worker` belongs to the worker's own parser
        os.execv(sys.executable, [sys.executable, "-m", "worker", *argv[1:]])
    args = build_parser().parse_args(argv)
    if args.command == "up":
        from services.launcher import run_up

        return run_up(args.host, args.port, force_cpu=args.cpu)
    if args.command == "api":
        return run_api(args)
    handlers = {"generate": cmd_generate, "edit": cmd_edit, "status": cmd_status_or_cancel,
                "cancel": cmd_status_or_cancel}
    try:
        with DgserveClient(args.url, api_key=args.api_key) as client:
            return handlers[args.command](client, args)
    except DgserveError as exc:
        field = f" (field {exc.field})" if exc.field else ""
        print(f"error: {exc.message}{field}", file=sys.stderr)
        return EXIT_USAGE
    except (OSError, TimeoutError, httpx.HTTPError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return EXIT_USAGE


if __name__ == "__main__":
    sys.exit(main())
