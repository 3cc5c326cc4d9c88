"""`dgserve` command line: run the stack (`up`, `api`, `worker`) and use it (`generate`, `edit`, `status`,
`cancel`). Client commands read `--url` / `DGSERVE_URL` and `--api-key` / `DGSERVE_API_KEY`."""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

import httpx
from pydantic import ValidationError

from services.client import DEFAULT_URL, DgserveClient, DgserveError
from services.schemas import TERMINAL_STATUSES, JobPublic

EXIT_OK, EXIT_JOB_FAILED, EXIT_USAGE = 0, 1, 2
EXIT_INTERRUPTED = 130  # the shell's code for a command ended by Ctrl-C


class StillRunning(Exception):
    """The client stopped waiting (timeout or Ctrl-C) while the job goes on in the service."""

    def __init__(self, job_id: str, why: str) -> None:
        super().__init__(why)
        self.job_id, self.why = job_id, why


def _add_client_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--url", default=os.environ.get("DGSERVE_URL", DEFAULT_URL), help="API base URL")
    parser.add_argument("--api-key", default=os.environ.get("DGSERVE_API_KEY"), help="bearer key (or DGSERVE_API_KEY)")
    parser.add_argument("--json", action="store_true", help="print the job as JSON")


def _add_sampler_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--max-new-tokens", type=int)
    parser.add_argument("--steps", type=int, dest="max_denoising_steps", help="denoising step cap per canvas")
    parser.add_argument("--seed", type=int)
    parser.add_argument("--timeout", type=float, default=600.0, help="seconds to wait for the result (the job "
                        "keeps running after; cancel it with `dgserve cancel`)")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="dgserve", description="Job service for diffusion language models")
    commands = parser.add_subparsers(dest="command", required=True)
    up = commands.add_parser("up", help="Redis + one worker + the API on this machine (Ctrl-C stops all)")
    up.add_argument("--host", default="127.0.0.1", help="API address (a non-loopback one needs DGSERVE_API_KEYS)")
    up.add_argument("--port", type=int, help="API port (default: DGSERVE_API_PORT, else 8000)")
    up.add_argument("--cpu", action="store_true", help="run the worker on the CPU even if a GPU is present")
    up.add_argument("--stop-timeout", type=float, default=30.0, help="seconds each child gets to stop on "
                    "Ctrl-C before it is killed (the worker hands unfinished jobs back within it)")
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


def _progress_line(text: str) -> None:
    """One progress line on stderr: rewritten in place on a terminal, plain lines when piped or logged."""
    if sys.stderr.isatty():
        print(f"\r\x1b[2K{text}", end="", file=sys.stderr, flush=True)
    else:
        print(text, file=sys.stderr, flush=True)


def _follow(client: DgserveClient, job_id: str, show_drafts: bool, deadline: float) -> None:
    """Print progress on stderr while the job runs (drafts overwrite one line on a terminal)."""
    try:
        for event in client.events(job_id, timeout=max(0.0, deadline - time.monotonic())):
            if event.event == "draft" and show_drafts:
                text = str(event.data.get("text", "")).replace("\n", " ")[-100:]
                _progress_line(f"[canvas {event.data.get('canvas', 0)} step {event.data.get('step', '?')}] {text}")
            elif event.event in ("started", "canvas"):
                detail = f"canvas {event.data.get('canvas')}" if event.event == "canvas" else "running"
                _progress_line(f"{job_id}: {detail}")
    finally:
        if sys.stderr.isatty():
            print(file=sys.stderr)


def _wait_and_report(client: DgserveClient, job_id: str, args: argparse.Namespace, show_drafts: bool
                     ) -> tuple[int, JobPublic]:
    """Follow the job until it ends or `--timeout` passes; returns (exit code, the finished job).
    Raises StillRunning when the client stops waiting (the job goes on)."""
    deadline = time.monotonic() + args.timeout
    try:
        _follow(client, job_id, show_drafts, deadline)
        job = client.wait(job_id, timeout=max(0.0, deadline - time.monotonic()))
    except TimeoutError as exc:
        raise StillRunning(job_id, f"gave up waiting after --timeout {args.timeout:g} s") from exc
    except KeyboardInterrupt as exc:
        raise StillRunning(job_id, "interrupted") from exc
    if args.json:
        print(job.model_dump_json(indent=2))
    elif job.status != "succeeded":
        error = f": {job.error.code}: {job.error.message}" if job.error else ""
        print(f"job {job_id} {job.status}{error}", file=sys.stderr)
    return (EXIT_OK if job.status == "succeeded" else EXIT_JOB_FAILED), job


def cmd_generate(client: DgserveClient, args: argparse.Namespace) -> int:
    accepted = client.generate(args.prompt, stream_drafts=args.drafts, **_sampler_params(args))
    print(f"job {accepted.id} queued", file=sys.stderr)
    code, job = _wait_and_report(client, accepted.id, args, args.drafts)
    if code == EXIT_OK and not args.json:
        print((job.result or {}).get("text", ""))
    return code


def _read_utf8(path: Path) -> str:
    data = path.read_bytes()
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise DgserveError(0, "usage", f"{path} is not UTF-8 text (byte 0x{data[exc.start]:02x} at offset "
                                       f"{exc.start}); edit works on UTF-8 files only") from None


def _labelled_diff(diff: str, path: Path) -> str:
    """The service labels its diff a/document, b/document; name the file instead."""
    lines = diff.split("\n")
    for index, line in enumerate(lines[:2]):
        if line.startswith("--- "):
            lines[index] = f"--- a/{path}"
        elif line.startswith("+++ "):
            lines[index] = f"+++ b/{path}"
    return "\n".join(lines)


def _edit_spec(args: argparse.Namespace) -> dict:
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
    return spec


def cmd_edit(client: DgserveClient, args: argparse.Namespace) -> int:
    document = _read_utf8(args.file)
    accepted = client.edit(document, [_edit_spec(args)], **_sampler_params(args))
    print(f"job {accepted.id} queued", file=sys.stderr)
    code, job = _wait_and_report(client, accepted.id, args, show_drafts=False)
    result = job.result or {}
    if code == EXIT_OK and not args.json:
        if args.write:
            args.file.write_bytes(str(result["document"]).encode("utf-8"))
            print(f"wrote {args.file}", file=sys.stderr)
        elif result.get("diff"):
            print(_labelled_diff(str(result["diff"]), args.file))
        else:
            print(result.get("document", ""))
    return code


def cmd_status(client: DgserveClient, args: argparse.Namespace) -> int:
    """Show a job; exit 1 when it ended failed, cancelled or expired (as documented)."""
    job = client.get(args.job_id)
    _print_job(job, args)
    return EXIT_JOB_FAILED if job.status in TERMINAL_STATUSES and job.status != "succeeded" else EXIT_OK


def cmd_cancel(client: DgserveClient, args: argparse.Namespace) -> int:
    job = client.cancel(args.job_id)
    if args.json:
        print(job.model_dump_json(indent=2))
    elif job.status == "cancelled":
        print(f"job {job.id} cancelled")
    else:
        print(f"cancel requested for job {job.id} ({job.status}): it stops at the worker's next step; "
              f"see `dgserve status {job.id}`")
    return EXIT_OK


def _print_job(job: JobPublic, args: argparse.Namespace) -> None:
    if args.json:
        print(job.model_dump_json(indent=2))
        return
    progress = f" canvas {job.progress.canvas} step {job.progress.step}" if job.progress else ""
    print(f"{job.id} {job.kind} {job.status}{progress} attempts={job.attempts}")
    if job.error:
        print(f"error {job.error.code}: {job.error.message}")


def run_api(args: argparse.Namespace) -> int:
    import uvicorn

    from services.api.app import create_app
    from services.settings import Settings

    settings = Settings()
    uvicorn.run(create_app(settings), host=args.host or settings.api_host, port=args.port or settings.api_port)
    return EXIT_OK


def settings_error_line(exc: ValidationError) -> str:
    """A settings error in one line, naming the environment variable (DGSERVE_<FIELD>)."""
    parts = []
    for error in exc.errors():
        name = "DGSERVE_" + "_".join(str(part) for part in error["loc"]).upper() if error["loc"] else "settings"
        parts.append(f"{name}: {error['msg'].removeprefix('Value error, ')}")
    return "invalid setting " + "; ".join(parts)


def _connection_error_line(exc: Exception, url: str) -> str:
    if isinstance(exc, httpx.ConnectError):
        return (f"cannot connect to the dgserve API at {url} ({exc}); is it running? Start one with "
                "`dgserve up`, or pass --url / set DGSERVE_URL")
    if isinstance(exc, httpx.TimeoutException):
        return f"the dgserve API at {url} did not answer in time ({type(exc).__name__})"
    return f"{exc}"


def run_client_command(args: argparse.Namespace) -> int:
    handlers = {"generate": cmd_generate, "edit": cmd_edit, "status": cmd_status, "cancel": cmd_cancel}
    try:
        with DgserveClient(args.url, api_key=args.api_key) as client:
            return handlers[args.command](client, args)
    except StillRunning as stopped:
        print(f"\n{stopped.why}: job {stopped.job_id} keeps running in the service; follow it with "
              f"`dgserve status {stopped.job_id}`, cancel it with `dgserve cancel {stopped.job_id}`", file=sys.stderr)
        return EXIT_INTERRUPTED if stopped.why == "interrupted" else EXIT_USAGE
    except KeyboardInterrupt:
        print("\ninterrupted", file=sys.stderr)
        return EXIT_INTERRUPTED
    except DgserveError as exc:
        field = f" (field {exc.field})" if exc.field else ""
        print(f"error: {exc.message}{field}", file=sys.stderr)
        return EXIT_USAGE
    except (OSError, TimeoutError, httpx.HTTPError) as exc:
        print(f"error: {_connection_error_line(exc, args.url)}", file=sys.stderr)
        return EXIT_USAGE


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] == ["worker"]:  # everything after `worker` belongs to the worker's own parser
        os.execv(sys.executable, [sys.executable, "-m", "worker", *argv[1:]])
    args = build_parser().parse_args(argv)
    try:
        if args.command == "up":
            from services.launcher import UpOptions, run_up

            return run_up(UpOptions(args.host, args.port, force_cpu=args.cpu, stop_timeout_s=args.stop_timeout))
        if args.command == "api":
            return run_api(args)
    except ValidationError as exc:
        print(f"error: {settings_error_line(exc)}", file=sys.stderr)
        return EXIT_USAGE
    return run_client_command(args)


if __name__ == "__main__":
    sys.exit(main())
