"""The code sandbox: runs model-written Python in a separate, resource-limited process, never in this one.

This module owns `run_python` and `SandboxResult`. Each run gets a fresh ``python -I -X utf8`` subprocess (isolated
mode: no user site, no PYTHON* environment variables, the script's directory not on sys.path) with

- a fresh temporary working directory, removed afterwards, and no stdin;
- a minimal environment (PATH and OMP_NUM_THREADS only; none of the caller's variables);
- limits on address space (`memory_bytes`, 1 GiB by default), CPU seconds (the timeout, rounded up, plus one),
  written file size (16 MiB) and core dumps (none);
- a wall-clock timeout, after which the whole process group is killed;
- output capped at `max_output_chars`.

The limits are set by a small driver script inside the child, before it compiles the untrusted code, rather than
by a ``preexec_fn``: Python documents ``preexec_fn`` as unsafe when the calling process has threads (it can
deadlock between fork and exec), and the engine's process has torch and Ray threads. The effect on the untrusted
code is the same: it starts under the limits.

This is isolation against accidents (endless loops, runaway memory, stray files), not a security boundary.
"""
from __future__ import annotations

import os
import signal
import subprocess
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path

DEFAULT_MEMORY_BYTES = 1 << 30
MAX_FILE_BYTES = 16 << 20
TRUNCATION_MARK = "...[truncated]"
PROGRAM_FILE = "program.py"
RESULT_FILE = "result.txt"

# Runs inside the child. argv: memory bytes, CPU seconds, file bytes, result variable name ("" for none).
DRIVER_SOURCE = r'''
import resource, sys, traceback
memory_bytes, cpu_seconds, file_bytes = (int(x) for x in sys.argv[1:4])
result_variable = sys.argv[4]
for limit, value in ((resource.RLIMIT_AS, memory_bytes), (resource.RLIMIT_CPU, cpu_seconds),
                     (resource.RLIMIT_FSIZE, file_bytes), (resource.RLIMIT_CORE, 0)):
    resource.setrlimit(limit, (value, value))
with open("program.py", encoding="utf-8") as handle:
    source = handle.read()
namespace = {"__name__": "__main__", "__builtins__": __builtins__}
try:
    exec(compile(source, "program.py", "exec"), namespace)
except SystemExit as exc:
    if exc.code not in (None, 0):
        sys.stdout.flush()
        sys.stderr.write(f"SystemExit: {exc.code}\n")
        sys.exit(1)
except BaseException as exc:
    sys.stdout.flush()
    lines = [f.lineno for f in traceback.extract_tb(exc.__traceback__) if f.filename == "program.py"]
    if isinstance(exc, SyntaxError) and exc.lineno:
        lines = [exc.lineno]
    where = f"line {lines[-1]}: " if lines else ""
    message = "".join(traceback.format_exception_only(type(exc), exc)).strip().splitlines()[-1]
    sys.stderr.write(where + message + "\n")
    sys.exit(1)
sys.stdout.flush()
if result_variable and result_variable in namespace:
    with open("result.txt", "w", encoding="utf-8") as handle:
        handle.write(str(namespace[result_variable]))
'''


@dataclass(frozen=True)
class SandboxResult:
    ok: bool            # ran to the end and produced a result (see run_python)
    stdout: str         # what the program printed, then the value of the result variable on its own line
    error: str          # why not ok: "line 3: ZeroDivisionError: division by zero", "timed out after 5 s", ...
    timed_out: bool = False


def run_python(code: str, timeout: float = 5.0, max_output_chars: int = 2000, *,
               result_variable: str | None = "answer", memory_bytes: int = DEFAULT_MEMORY_BYTES) -> SandboxResult:
    """Run `code` in a sandboxed subprocess.

    `stdout` is what the program printed (cut to fit), followed, when `result_variable` is set and the program
    defined it, by ``str()`` of its value on a last line of its own. `ok` is False when the program raised,
    exited non-zero, hit a limit or the timeout, or (with `result_variable` set) printed nothing and defined no
    such variable; `error` then says which, truncated to `max_output_chars`."""
    if timeout <= 0:
        raise ValueError(f"timeout must be > 0 seconds, got {timeout}")
    if max_output_chars < 1:
        raise ValueError(f"max_output_chars must be >= 1, got {max_output_chars}")
    with tempfile.TemporaryDirectory(prefix="kvcomm-sandbox-") as workdir:
        work = Path(workdir)
        (work / PROGRAM_FILE).write_text(code, encoding="utf-8")
        driver = work / "_driver.py"
        driver.write_text(DRIVER_SOURCE, encoding="utf-8")
        cpu_seconds = int(timeout) + 2
        command = [sys.executable, "-I", "-X", "utf8", str(driver), str(memory_bytes), str(cpu_seconds),
                   str(MAX_FILE_BYTES), result_variable or ""]
        env = {"PATH": os.environ.get("PATH", "/usr/bin:/bin"), "OMP_NUM_THREADS": "1"}
        with open(work / "_stdout", "wb") as out, open(work / "_stderr", "wb") as err:
            process = subprocess.Popen(command, cwd=work, env=env, stdin=subprocess.DEVNULL, stdout=out, stderr=err,
                                       start_new_session=True)
            timed_out = False
            try:
                process.wait(timeout=timeout)
            except subprocess.TimeoutExpired:
                timed_out = True
                _kill_group(process)
        printed = _read_head(work / "_stdout", max_output_chars)
        errors = _read_tail(work / "_stderr", max_output_chars)
        result_path = work / RESULT_FILE
        result = _read_head(result_path, max_output_chars) if result_path.is_file() else None
    if timed_out:
        return SandboxResult(False, _fit(printed, None, max_output_chars), f"timed out after {timeout:g} s", True)
    stdout = _fit(printed, result, max_output_chars)
    if process.returncode != 0:
        return SandboxResult(False, stdout, _describe_failure(process.returncode, errors, max_output_chars))
    if result_variable and result is None and not printed.strip():
        return SandboxResult(False, stdout, f"the code printed nothing and defined no variable {result_variable!r}")
    return SandboxResult(True, stdout, "")


def _kill_group(process: subprocess.Popen) -> None:
    try:
        os.killpg(process.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass
    process.wait()


def _read_head(path: Path, max_chars: int) -> str:
    with open(path, "rb") as handle:
        raw = handle.read(max_chars * 4 + 4)
    text = raw.decode("utf-8", errors="replace")
    if len(text) > max_chars or path.stat().st_size > len(raw):
        return text[:max_chars] + TRUNCATION_MARK
    return text


def _read_tail(path: Path, max_chars: int) -> str:
    """The end of a file (the driver writes its error message last)."""
    size = path.stat().st_size
    with open(path, "rb") as handle:
        handle.seek(max(0, size - max_chars * 4))
        return handle.read().decode("utf-8", errors="replace")[-max_chars:]


def _fit(printed: str, result: str | None, max_chars: int) -> str:
    """The printed output and the result's line, within about `max_chars` (the result line is kept whole)."""
    if result is None:
        return printed
    budget = max(0, max_chars - len(result) - 1)
    if len(printed) > budget:
        printed = printed[:budget] + TRUNCATION_MARK
    if printed and not printed.endswith("\n"):
        printed += "\n"
    return printed + result


def _describe_failure(returncode: int, errors: str, max_chars: int) -> str:
    if returncode < 0:
        name = signal.Signals(-returncode).name if -returncode in signal.valid_signals() else str(-returncode)
        reason = {"SIGXCPU": " (CPU time limit)", "SIGKILL": " (killed; memory or CPU limit)",
                  "SIGXFSZ": " (file size limit)"}.get(name, "")
        return f"killed by {name}{reason}"
    message = errors.strip().splitlines()[-1] if errors.strip() else f"exited with status {returncode}"
    return message[:max_chars]
