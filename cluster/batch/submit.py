"""`kvcomm submit JOBS --out RESULTS.jsonl`: run a file of jobs on a cluster, resumably, one JSON line per job.

Owns batch submission, its progress bar and the results file (README "Batch jobs" says what users see). The jobs
go to a running deployment's jobs API with ``--url`` (429s retried after ``Retry-After``), else to worker actors
of its own (`cluster.batch.runner.ClusterRunner`) on a cluster it joins or starts; both use `cluster.driver.DagJob`.
A result line is `JobResult.to_dict()` plus ``"id"`` and ``"workers"``, or ``{"id", "error"}``; ids with a result
line are skipped on a rerun, a torn last line is ignored. Everything it started is shut down on exit, errors,
Ctrl-C and SIGTERM (`cluster.runtime`; `cluster.reaper` covers SIGKILL). Exit status: 0 all succeeded, 1 some
failed, 2 usage error, 130 interrupted. Not here: the job driver, the worker fleet, the HTTP service.
"""
from __future__ import annotations

import argparse
import json
import concurrent.futures
import math
import os
import sys
import time
from pathlib import Path
from typing import Any, Iterator

from kvcomm.harness.job_files import load_jobs
from kvcomm.harness.jobs import JobSpec, JobSpecError

from ..config import ClusterConfig
from ..runtime import RayRuntime


# ------------------------------------------------------------------------------------------------------------
# Job and result files
# ------------------------------------------------------------------------------------------------------------
def read_jobs(path: str | Path) -> tuple[list[JobSpec], list[dict[str, Any]]]:
    """(valid jobs, error records). A JSONL file is read line by line, so one bad line becomes that job's error
    record; JSON and YAML files are validated whole by `load_jobs` (a bad job raises `JobSpecError`)."""
    path = Path(path)
    if path.suffix.lower() != ".jsonl":
        return load_jobs(path), []
    if not path.is_file():
        raise FileNotFoundError(f"job file {path} does not exist")
    jobs: list[JobSpec] = []
    errors: list[dict[str, Any]] = []
    seen: dict[str, int] = {}
    for number, line in enumerate(path.read_text().splitlines(), start=1):
        if not line.strip():
            continue
        where = f"{path} line {number}"
        try:
            raw = json.loads(line)
        except json.JSONDecodeError as exc:
            errors.append({"id": f"line-{number}", "error": f"{where}: invalid JSON: {exc.msg}"})
            continue
        job_id = str(raw.get("id", f"line-{number}")) if isinstance(raw, dict) else f"line-{number}"
        try:
            job = JobSpec.from_dict(raw)
        except (JobSpecError, TypeError) as exc:
            errors.append({"id": job_id, "error": f"{where}: {exc}"})
            continue
        if job.id in seen:
            errors.append({"id": job.id, "error": f"{where}: duplicate job id {job.id!r} (first at line "
                                                  f"{seen[job.id]})"})
            continue
        seen[job.id] = number
        jobs.append(job)
    return jobs, errors


def finished_ids(out: Path) -> set[str]:
    """Ids with a result line (not an error line) in an existing results file; unreadable lines are ignored."""
    done: set[str] = set()
    if not out.exists():
        return done
    for line in out.read_text().splitlines():
        try:
            record = json.loads(line)
        except json.JSONDecodeError:
            continue            # a torn line from an interrupted run
        if isinstance(record, dict) and "id" in record and "error" not in record:
            done.add(str(record["id"]))
    return done


class ResultsFile:
    """Appends one JSON line per record, flushed at once; starts on a fresh line after a torn one."""

    def __init__(self, path: Path):
        path.parent.mkdir(parents=True, exist_ok=True)
        torn = path.exists() and path.stat().st_size > 0 and not path.read_bytes().endswith(b"\n")
        self._file = path.open("a", encoding="utf-8")
        if torn:
            self._file.write("\n")

    def write(self, record: dict[str, Any]) -> None:
        self._file.write(json.dumps(record, default=str) + "\n")
        self._file.flush()

    def close(self) -> None:
        self._file.close()


# ------------------------------------------------------------------------------------------------------------
# Progress
# ------------------------------------------------------------------------------------------------------------
class Progress:
    """Running totals of a submit run and the progress bar that shows them."""

    def __init__(self, total: int, enabled: bool):
        self.started = time.perf_counter()
        self.done = self.failed = self.turns = self.reused_turns = self.tokens = 0
        self._bar = None
        if enabled:
            from tqdm import tqdm
            self._bar = tqdm(total=total, unit="job", dynamic_ncols=True, file=sys.stderr)

    def update(self, record: dict[str, Any]) -> None:
        if "error" in record:
            self.failed += 1
        else:
            self.done += 1
            for turn in record.get("turns", []):
                self.turns += 1
                self.reused_turns += bool(turn.get("reused"))
                self.tokens += len(turn.get("token_ids", []))
        if self._bar is not None:
            self._bar.update(1)
            self._bar.set_postfix(self.summary(), refresh=False)

    def summary(self) -> dict[str, str]:
        minutes = max(time.perf_counter() - self.started, 1e-9) / 60
        return {"ok": str(self.done), "failed": str(self.failed),
                "reuse": f"{self.reused_turns / self.turns:.0%}" if self.turns else "-",
                "jobs/min": f"{self.done / minutes:.1f}", "tok/s": f"{self.tokens / (minutes * 60):.1f}"}

    def close(self) -> None:
        if self._bar is not None:
            self._bar.close()


# ------------------------------------------------------------------------------------------------------------
# The command
# ------------------------------------------------------------------------------------------------------------
def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("jobs", help="job file: .jsonl (one job per line), .json or .yaml")
    parser.add_argument("--out", required=True, help="results file (JSONL); an existing one is resumed")
    parser.add_argument("--url", default=None,
                        help="a running deployment's base URL (http://host:port): the jobs go to its jobs API")
    parser.add_argument("--api-key", default=None, help="with --url: the API key (default: $KVCOMM_API_KEY)")
    parser.add_argument("--address", default=None,
                        help="Ray cluster to join: 'auto' or 'ray://host:10001' (default: start a local cluster)")
    parser.add_argument("--config", default=None, help="cluster config YAML (cluster.config.ClusterConfig)")
    parser.add_argument("--workers", type=int, default=None, help="number of agent workers (overrides the config)")
    parser.add_argument("--model", default=None, help="model to serve (overrides the config)")
    parser.add_argument("--random-weights", action="store_true", default=None,
                        help="random weights for a preset architecture (overrides the config)")
    parser.add_argument("--mode", default=None, help="run every job in this mode instead of its own")
    parser.add_argument("--concurrency", type=int, default=None,
                        help="jobs in flight (default: workers x max_batch_size; with --url 16)")
    parser.add_argument("--num-cpus", type=int, default=None,
                        help="CPUs of a local cluster (default: this machine's, at least what the workers need)")
    parser.add_argument("--object-store-mb", type=int, default=2560,
                        help="object store of a local cluster (holds the anchor pool: >= kvcomm.pool_byte_budget)")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")


def add_submit_parser(subparsers: Any) -> argparse.ArgumentParser:
    """Add ``submit`` to an argparse subparsers object; the parsed args' ``func`` is `cli_main`."""
    parser = subparsers.add_parser("submit", help="run a file of jobs on a Ray cluster (resumable JSONL results)",
                                   description=__doc__.split("\n\n")[0])
    add_arguments(parser)
    parser.set_defaults(func=cli_main)
    return parser


def build_config(args: argparse.Namespace) -> ClusterConfig:
    config = ClusterConfig.from_yaml(args.config) if args.config else ClusterConfig()
    overrides: dict[str, Any] = {}
    if args.workers is not None:
        overrides["num_workers"] = args.workers
    if args.model is not None:
        overrides["model"] = args.model
    if args.random_weights:
        overrides["random_weights"] = True
    return config.with_(**overrides) if overrides else config


def submit(args: argparse.Namespace) -> int:
    """Run the `submit` command on parsed arguments; the exit status."""
    try:
        config = build_config(args)
        jobs, bad = read_jobs(args.jobs)
    except (ValueError, FileNotFoundError) as exc:       # JobSpecError is a ValueError
        print(f"kvcomm submit: {exc}", file=sys.stderr)
        return 2
    out = Path(args.out)
    done = finished_ids(out)
    todo = [job for job in jobs if job.id not in done]
    bad = [record for record in bad if record["id"] not in done]
    skipped = len(jobs) - len(todo)
    print(f"kvcomm submit: {len(todo)} job(s) to run, {skipped} already in {out}, {len(bad)} invalid",
          file=sys.stderr)
    results = ResultsFile(out)
    progress = Progress(len(todo) + len(bad), enabled=not args.no_progress)
    connection = None
    runner = None
    records: Iterator[dict[str, Any]] = iter(())
    interrupted = False
    try:
        for record in bad:
            results.write(record)
            progress.update(record)
        if todo and args.url:
            api_key = args.api_key or os.environ.get("KVCOMM_API_KEY", "").split(",")[0].strip() or None
            records = run_over_http(args.url, todo, mode=args.mode, concurrency=args.concurrency or 16,
                                    api_key=api_key)
        elif todo:
            from .runner import ClusterRunner
            needed = math.ceil(config.num_workers * config.cpus_per_worker)
            connection = RayRuntime(args.address, num_cpus=args.num_cpus or max(os.cpu_count() or 1, needed),
                                    object_store_mb=args.object_store_mb)
            runner = ClusterRunner(config).start()
            records = runner.run_jobs(todo, mode=args.mode, concurrency=args.concurrency)
        for record in _with_ids(records):
            results.write(record)
            progress.update(record)
    except KeyboardInterrupt:
        interrupted = True                   # every line written so far is complete: a rerun resumes after it
    finally:
        progress.close()
        results.close()
        if runner is not None:
            runner.shutdown()
        if connection is not None:
            connection.close()
    summary = progress.summary()
    print(f"kvcomm submit: {summary['ok']} ok, {summary['failed']} failed, reuse {summary['reuse']}, "
          f"{summary['jobs/min']} jobs/min, {summary['tok/s']} tok/s -> {out}", file=sys.stderr)
    if interrupted:
        print(f"kvcomm submit: interrupted; run the same command again to resume ({out} keeps every finished job)",
              file=sys.stderr)
        return 130
    return 1 if progress.failed else 0


def run_over_http(url: str, jobs: list[JobSpec], *, mode: str | None, concurrency: int,
                  api_key: str | None = None, timeout_s: float = 3600.0) -> Iterator[dict[str, Any]]:
    """Run `jobs` on a deployment's jobs API, `concurrency` at a time; yield each one's result record (or error
    record) as it finishes. A 429 is retried after its Retry-After; a job still running when this generator is
    closed is cancelled by the server (its client went away)."""
    import httpx
    headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
    params = {"wait": "true", **({"mode": mode} if mode else {})}
    base = url.rstrip("/")

    def one(client: httpx.Client, job: JobSpec) -> dict[str, Any]:
        while True:
            try:
                response = client.post(f"{base}/v1/jobs", params=params, json=job.to_dict(), headers=headers)
            except httpx.HTTPError as exc:
                return {"id": job.id, "error": f"{type(exc).__name__}: {exc}"}
            if response.status_code == 429:
                time.sleep(float(response.headers.get("retry-after", "1")))
                continue
            body = _json_or_text(response)
            if response.status_code == 200 and isinstance(body, dict) and "result" in body:
                return {"id": job.id, **body["result"], "http_job": body["id"]}
            message = body.get("error", {}).get("message") if isinstance(body, dict) else str(body)
            return {"id": job.id, "error": f"HTTP {response.status_code}: {message}"}

    with httpx.Client(timeout=httpx.Timeout(timeout_s, connect=30.0),
                      limits=httpx.Limits(max_connections=concurrency)) as client, \
            concurrent.futures.ThreadPoolExecutor(max_workers=concurrency) as pool:
        queue = iter(jobs)
        running: set[concurrent.futures.Future] = set()
        try:
            while True:
                while len(running) < concurrency:
                    job = next(queue, None)
                    if job is None:
                        break
                    running.add(pool.submit(one, client, job))
                if not running:
                    return
                done, running = concurrent.futures.wait(running, return_when=concurrent.futures.FIRST_COMPLETED)
                for future in done:
                    yield future.result()
        finally:
            for future in running:
                future.cancel()
            client.close()             # in-flight requests end; the server cancels their jobs


def _json_or_text(response: Any) -> Any:
    try:
        return response.json()
    except ValueError:
        return response.text[:300]


def _with_ids(records: Iterator[dict[str, Any]]) -> Iterator[dict[str, Any]]:
    for record in records:
        if "id" not in record:
            record = {"id": record.get("job_id"), **record}
        yield record


def cli_main(args: argparse.Namespace) -> int:
    return submit(args)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="kvcomm submit", description=__doc__.split("\n\n")[0])
    add_arguments(parser)
    return cli_main(parser.parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
