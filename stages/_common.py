"""Shared entry-point wrapper for stages: params loading, the model-files guard, one-line errors and warnings,
exit codes."""
from __future__ import annotations

import argparse
import contextlib
import logging
import os
import re
import shlex
import signal
import subprocess
import sys
import threading
import time
import traceback
import warnings
from pathlib import Path
from typing import Callable, Mapping

from clipprune.errors import ClipPruneError
from clipprune.model_files import check_model_files
from clipprune.config import parse_params
from clipprune.params import load_params

DVC_YAML = Path(__file__).resolve().parents[1] / "dvc.yaml"
MODEL_FILES_DEP = "${model_files}"
# stages read every path relative to the repository root they run in: the fixtures too, so that a copy of
# the repo (a `dvc exp run` temp dir, a test's scratch copy) reads its own data/fixtures, the files it hashes
FIXTURES = "data/fixtures"


class Terminated(KeyboardInterrupt):
    """SIGTERM turned into an exception, so that atomic writes in progress remove their temporaries."""


def _raise_terminated(signum, frame):
    raise Terminated()


def _stage_body(name: str, dvc_yaml: Path = DVC_YAML) -> dict | None:
    """The mapping of stage ``name`` in dvc.yaml holding its cmd / deps (a foreach stage's ``do:``); None if absent."""
    from ruamel.yaml import YAML

    if not dvc_yaml.is_file():
        return None
    spec = (YAML(typ="safe", pure=True).load(dvc_yaml.read_text()).get("stages") or {}).get(name)
    if not isinstance(spec, dict):
        return None  # not a pipeline stage (e.g. a test's writer)
    return spec.get("do", spec) if "foreach" in spec else spec


def declares_model_files(name: str, dvc_yaml: Path = DVC_YAML) -> bool:
    """True if stage ``name`` of dvc.yaml depends on ``${model_files}`` (the stages that load the model)."""
    body = _stage_body(name, dvc_yaml)
    return body is not None and MODEL_FILES_DEP in [str(dep) for dep in body.get("deps") or []]


def stage_paths(name: str, *options: str, main: bool = False) -> tuple:
    """The paths stage ``name`` reads and writes, each named once: on the stage's ``cmd`` line in dvc.yaml,
    ``python stages/<name>.py --<option> PATH ...`` (as iterative/example-get-started passes them).

    An option written ``"<option>:str"`` is a plain value, not a path (a foreach stage's ``${item}``).
    ``main``: the stage runs as a script: its command-line arguments are parsed (DVC passes the cmd's). A stage
    run without arguments (by hand, or imported by a test) takes the arguments of its cmd in dvc.yaml (not
    for a foreach stage, whose cmd holds ``${item}``). Returns the values in the order of ``options``.
    """
    parser = argparse.ArgumentParser(prog=f"stages/{name}.py", description=f"DVC stage {name} (see dvc.yaml)")
    dests = []
    for option in options:
        flag, _, kind = option.partition(":")
        dests.append(flag.replace("-", "_"))
        parser.add_argument(f"--{flag}", type=str if kind == "str" else Path, required=True, dest=dests[-1],
                            metavar="VALUE" if kind == "str" else "PATH")
    argv = sys.argv[1:] if main else []
    if not argv:
        body = _stage_body(name)
        if body is None:
            raise SystemExit(f"stages/{name}.py: no stage {name} in {DVC_YAML} to take its paths from")
        cmd = shlex.split(body["cmd"] if isinstance(body["cmd"], str) else " ".join(body["cmd"]))
        argv = cmd[cmd.index(f"stages/{name}.py") + 1:]
        if any("${" in arg for arg in argv):
            raise SystemExit(f"stages/{name}.py: a foreach stage: pass the arguments of its cmd in {DVC_YAML} "
                             f"with ${{item}} filled in")
    parsed = parser.parse_args(argv)
    return tuple(getattr(parsed, dest) for dest in dests)


def check_stage_model(name: str, params: dict) -> None:
    """Before any work: a stage that declares the ``${model_files}`` dep must get every file its model reads.

    Otherwise DVC would hash one folder while the stage reads another, and new weights would rerun nothing.
    """
    if declares_model_files(name):
        parsed = parse_params(params, need=("model", "model_files"))
        check_model_files(parsed.model, parsed.model_files)


def log_decisions(name: str) -> None:
    """The library logs its decisions (e.g. CAP's memory plan) on the ``clipprune`` logger: one line each on
    stderr, prefixed with the stage name like the stage's own lines."""
    logger = logging.getLogger("clipprune")
    for handler in [h for h in logger.handlers if getattr(h, "clipprune_stage", False)]:
        logger.removeHandler(handler)
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter(f"{name}: %(message)s"))
    handler.clipprune_stage = True
    logger.addHandler(handler)
    logger.setLevel(logging.INFO)
    logger.propagate = False


def one_line_warnings(name: str) -> Callable:
    """A ``warnings.showwarning`` that prints ``<stage>: <Category>: <message>`` on one line of stderr.

    Python's default prints the warning's file and line and then the source line that issued it
    (``masks, report["lsq"] = tune_masks(...``), which tells a user of the pipeline nothing.
    """
    def show(message, category, filename, lineno, file=None, line=None):
        text = " ".join(str(message).split())  # one line, even for a multi-line third-party message
        text = text[len(name) + 2:] if text.startswith(f"{name}: ") else text  # TuningWarning names the stage
        try:
            (file if file is not None else sys.stderr).write(f"{name}: {category.__name__}: {text}\n")
        except (OSError, ValueError):  # stderr closed or gone: a warning is not worth failing the stage for
            pass

    return show


# huggingface_hub / transformers read it when imported; inherited by torchrun workers
HF_PROGRESS_ENV = "HF_HUB_DISABLE_PROGRESS_BARS"


def quiet_hf_progress() -> Callable[[], None]:
    """Silence transformers' weight-loading bars (and the hub's download bars) in this stage process.

    They redraw for every model load, in every stage, and say nothing the stage's own lines do not.
    Returns a function that undoes it (for stages run in-process by tests).
    """
    set_env = HF_PROGRESS_ENV not in os.environ
    if set_env:
        os.environ[HF_PROGRESS_ENV] = "1"
    undo = []
    if "transformers" in sys.modules:  # already imported (e.g. a test's preloaded process): tell it directly
        from transformers.utils import logging as hf_logging

        if hf_logging.is_progress_bar_enabled():
            hf_logging.disable_progress_bar()
            undo.append(hf_logging.enable_progress_bar)

    def restore() -> None:
        if set_env:
            os.environ.pop(HF_PROGRESS_ENV, None)
        for step in undo:
            step()

    return restore


# the elastic agent's log line when a worker failed; what torchrun prints after it is its own report
_TORCHRUN_FAILED = re.compile(r"^E\d{4} .*torch/distributed/elastic/.*failed")


def relaunch(name: str, nproc: int, paths: Mapping[str, object], script: str | os.PathLike | None = None) -> bool:
    """Run stage ``name`` data parallel: ``stages/<name>.py --key PATH ...`` under torchrun with ``nproc`` processes.

    Returns False (the caller runs its body itself) for ``nproc == 1`` and inside a torchrun worker; otherwise
    runs the workers, relays their output, and returns True once all of them succeeded. A failing worker makes
    torchrun stop the others; this raises a ClipPruneError carrying the failing rank's one-line error. The
    workers inherit the environment (params.yaml is read from the same working directory) with the CPU threads
    split between them. ``paths``: the stage's options, as its ``stage_paths`` read them (keys are option names,
    which must not be prefixes of torchrun's own options: ``--logs`` would be read as ``--logs-specs``).
    ``script``: another entry point than ``stages/<name>.py`` (one that calls ``run_stage(name, ...)`` too).
    """
    from clipprune.distributed import torchrun_command, torchrun_env, under_torchrun

    if nproc == 1 or under_torchrun():
        return False
    args = [arg for key, value in paths.items() for arg in (f"--{key}", str(value))]
    script = str(script or Path(__file__).resolve().parent / f"{name}.py")
    errors: list[str] = []
    report: list[str] = []  # torchrun's own account of a failure (a traceback and a table): shown only if
    process = subprocess.Popen(torchrun_command(script, nproc, args), env=torchrun_env(nproc),  # no worker said why
                               stderr=subprocess.PIPE, text=True, errors="replace")
    try:
        for line in process.stderr:  # relayed as they come; the workers' one-line errors kept
            if report or _TORCHRUN_FAILED.match(line):
                report.append(line)
                continue
            sys.stderr.write(line)
            if line.startswith(f"{name}: error: "):
                errors.append(line[len(f"{name}: error: "):].strip())
        code = process.wait()
    except BaseException:  # interrupted: torchrun passes SIGTERM on to the workers
        process.terminate()
        process.wait()
        raise
    if code != 0:
        if not errors:
            sys.stderr.writelines(report)
        first = next((e for e in errors if not e.startswith("rank ") or "another rank failed" not in e), None)
        raise ClipPruneError(f"{name}.nproc={nproc}: {first}" if first else
                             f"{name}.nproc={nproc}: the torchrun workers failed (exit code {code}); see their "
                             f"messages above")
    return True


@contextlib.contextmanager
def data_parallel_stage(device: str = "cpu", key: str = "device"):
    """The body of a stage that ``relaunch`` may have started: joins the process group under torchrun (a
    one-process context otherwise), makes it the library's (``clipprune.distributed.data_parallel``), and
    after the body waits until every process is done (a barrier) before the caller writes on rank 0 alone
    (``if ctx.is_main``). ``device``: cpu | cuda | auto, from the params key ``key``."""
    from clipprune.distributed import data_parallel, init_distributed

    ctx = init_distributed(device, key)
    try:
        with data_parallel(ctx):
            yield ctx
        ctx.barrier()
    finally:
        ctx.close()


def _rank_prefix() -> str:
    """``"rank R: "`` in a worker of a multi-process run (its error lines say which process failed)."""
    if "RANK" in os.environ and os.environ.get("WORLD_SIZE", "1") != "1":
        return f"rank {os.environ['RANK']}: "
    return ""


def _peer_failed(err: BaseException) -> bool:
    """A collective failed because another process of the group went away (it reports its own error)."""
    import torch

    dist_error = getattr(torch.distributed, "DistError", ())
    return bool(_rank_prefix()) and (isinstance(err, dist_error) or "Connection closed by peer" in str(err)
                                     or "Connection reset by peer" in str(err))


def run_stage(name: str, main: Callable[[dict], None], params_path: str = "params.yaml") -> None:
    """Run ``main(params)``; user errors print one line and exit 1, anything else exits 2 with a traceback.

    First, a stage that loads the model checks ``model_files`` (``check_stage_model``).
    SIGINT (exit 130) and SIGTERM (exit 143) unwind the stage like an exception, so no temporary is left.
    """
    start = time.perf_counter()
    log_decisions(name)
    previous_showwarning, warnings.showwarning = warnings.showwarning, one_line_warnings(name)
    restore_hf_progress = quiet_hf_progress()
    in_main_thread = threading.current_thread() is threading.main_thread()  # only it may set handlers
    previous = signal.signal(signal.SIGTERM, _raise_terminated) if in_main_thread else None
    # Always this repo's fixtures: they are the stage's declared dep, whatever the caller's environment says
    # (a test process or shell may point elsewhere). torchrun workers inherit it; the caller's value returns below.
    caller_fixtures = os.environ.get("CLIPPRUNE_FIXTURES")
    os.environ["CLIPPRUNE_FIXTURES"] = FIXTURES
    try:
        params = load_params(params_path)
        check_stage_model(name, params)
        main(params)
    except ClipPruneError as err:
        print(f"{name}: error: {_rank_prefix()}{err}", file=sys.stderr)
        sys.exit(1)
    except KeyboardInterrupt as err:
        print(f"{name}: interrupted; no outputs were written", file=sys.stderr)
        sys.exit(143 if isinstance(err, Terminated) else 130)
    except Exception as err:  # a bug, not bad input: keep the traceback for the report
        if _peer_failed(err):  # the failing process has printed its own error
            print(f"{name}: error: {_rank_prefix()}stopped: another rank failed ({' '.join(str(err).split())[:200]})",
                  file=sys.stderr)
            sys.exit(1)
        traceback.print_exc()
        sys.exit(2)
    finally:
        warnings.showwarning = previous_showwarning
        restore_hf_progress()
        if caller_fixtures is None:
            os.environ.pop("CLIPPRUNE_FIXTURES", None)
        else:
            os.environ["CLIPPRUNE_FIXTURES"] = caller_fixtures
        if in_main_thread:
            signal.signal(signal.SIGTERM, signal.SIG_DFL if previous is None else previous)
    print(f"{name}: done in {time.perf_counter() - start:.1f} s", file=sys.stderr)
    if _in_torchrun_worker():
        # Outputs are written and the process group is gone: leave without C++ static destructors, where a gloo
        # thread can still abort the worker ("terminate called without an active exception", seen once in CI)
        # and torchrun would report a finished stage as failed.
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(0)


def _in_torchrun_worker() -> bool:
    from clipprune.distributed import under_torchrun

    return under_torchrun()
