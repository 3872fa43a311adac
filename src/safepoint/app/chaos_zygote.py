"""A warm start for ``safepoint chaos --file-events``: fork each run from a Python that
has imported torch and transformers already (runs in the command's own interpreter).

A training command spends most of a short run importing: ``safepoint train --max-steps
30`` takes 8 s from a fresh interpreter and 3.5 s forked from one that has imported its
libraries. A file-event sweep is hundreds of such runs, so ``chaos_process.Runner`` starts
this program once per parallel job, in the command's interpreter and environment, as

    python chaos_zygote.py HOOK_FILE MODULE...

It imports the MODULEs it can (the field's libraries and safepoint), then reads one JSON
request per line on stdin: ``{"run": [kind, target], "argv": [...], "log": path, "spec":
hook spec or null}``, where kind is ``path`` (a script, or a console script), ``module``
(``python -m``) or ``code`` (``python -c``). For each it forks; the child starts a
session of its own, sends its output to the log, installs the file-event hook of
HOOK_FILE (``chaos_hook``) with the spec, and runs the target as ``__main__`` with
``sys.argv`` set. It ends the way the interpreter ends any program (threads joined,
``atexit``, exit code of ``SystemExit``), because the child leaves this file's loop and
runs the target at top level. The zygote answers on its stdout: the child's pid, then,
once it has been reaped, its exit code (negative: the signal), one line each.

What a warm child shares with its zygote, and a fresh process would not: the modules
imported before it started, the hash seed (``PYTHONHASHSEED``), and the state of any
unseeded random generator other than ``random`` (which reseeds at fork). ``--cold``
runs every run as a fresh process.
"""

from __future__ import annotations

import importlib
import importlib.util
import json
import os
import runpy
import sys


def _preload(modules: list[str]) -> None:
    for name in modules:
        try:
            importlib.import_module(name)
        except Exception as e:  # a module the command may not use: note it, go on
            print(f"chaos zygote: not preloaded: {name} ({type(e).__name__}: {e})", file=sys.stderr)


def _serve(answer: int) -> dict[str, object]:
    """Fork a child per request; return the request in the child, never in the zygote."""
    for line in sys.stdin:
        request = json.loads(line)
        sys.stdout.flush()
        sys.stderr.flush()
        pid = os.fork()
        if pid == 0:
            return request  # type: ignore[no-any-return]
        os.write(answer, f"{pid}\n".encode())
        _, status = os.waitpid(pid, 0)
        os.write(answer, f"{os.waitstatus_to_exitcode(status)}\n".encode())
    sys.exit(0)  # the runner closed our stdin: it is done


def _child(request: dict[str, object], answer: int, hook_file: str) -> tuple[str, str]:
    """Become the command's process: session, output, hook, argv. Returns the target."""
    os.setsid()  # a session of its own, as Runner.start gives a fresh process
    log = os.open(str(request["log"]), os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o666)
    os.dup2(log, 1)
    os.dup2(log, 2)
    os.close(log)
    null = os.open(os.devnull, os.O_RDONLY)
    os.dup2(null, 0)
    os.close(null)
    os.close(answer)
    sys.stdin = open(0, closefd=False)  # noqa: SIM115 - fd 0 stays open for the program
    spec = request.get("spec")
    if spec:
        hook = importlib.util.spec_from_file_location("safepoint_chaos_hook", hook_file)
        assert hook is not None and hook.loader is not None
        module = importlib.util.module_from_spec(hook)
        hook.loader.exec_module(module)
        module._install(spec)
    sys.argv = [str(a) for a in request["argv"]]  # type: ignore[attr-defined]
    kind, target = request["run"]  # type: ignore[misc]
    return str(kind), str(target)


def main() -> None:
    hook_file, modules = sys.argv[1], sys.argv[2:]
    del sys.path[0]  # this file's folder (safepoint/app): its modules are not top-level ones
    answer = os.dup(1)  # answers go here; anything the imports print goes to the log
    os.dup2(2, 1)
    _preload(modules)
    request = _serve(answer)
    kind, target = _child(request, answer, hook_file)
    # sys.path[0] as the interpreter sets it: the script's folder, or the current one.
    first = {"path": os.path.dirname(os.path.abspath(target)), "module": os.getcwd(), "code": ""}
    sys.path.insert(0, first[kind])
    if kind == "path":
        runpy.run_path(target, run_name="__main__")
    elif kind == "module":
        runpy.run_module(target, run_name="__main__", alter_sys=True)
    else:
        exec(compile(target, "<string>", "exec"), {"__name__": "__main__"})


if __name__ == "__main__":
    main()  # an uncaught exception of the program ends it as the interpreter ends any
