"""Run the units of one or several studies in parallel worker processes.

A study splits into units: its dense model first, then one unit per (trained method, target)
and one per untrained method (which shares a router or predictor over its targets). Small models
leave a GPU mostly idle (a training step of MiniLM is bound by Python and kernel launches), so
several worker processes on one GPU finish a study several times sooner than one process.

    failures = run_parallel([(cfg_a, out_a), (cfg_b, out_b)], jobs=12, time_limit=540)

Each worker is `python -m lte.cli.main study <out>/study_config.yaml --out <out> --worker
--methods M [--targets T]`; its log goes to `<out>/logs/`. Finished points are on disk, so a
unit cut by the time limit loses only itself, and rerunning resumes. With a time limit, a unit
whose expected duration (`expected_seconds`: units of its method that finished in this run, else
the seconds its method's finished points recorded) no longer fits is not started, so a run ends
once nothing that can finish is left instead of spending its last minutes on work it will throw away.
Units still running at the time limit are asked to stop (SIGTERM): their training writes a
checkpoint within `STOP_GRACE_SECONDS` and the next run resumes it (`lte.study.resume`); the
seconds they ran are recorded (`STOPPED_FILE`), so a resumed unit is expected to need only the rest.
A unit that runs out of GPU memory beside others lowers how many run at once (`WorkerLimit`) and runs
again, so too many --jobs for a GPU's memory costs one failed start, not the rest of the run.
Units start in `start_order`: all seeds of the first method named before the next method's, so a
run cut short by its time limit leaves whole methods done.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import re
import signal
import statistics
import subprocess
import sys
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from .cache import point_done, point_path
from .config import TRAINED, derived_methods, knob_values, method_plan
from .tasks import dense_weights_missing

logger = logging.getLogger(__name__)

#: Rough relative cost of a unit, to start the longest first (load balance).
_COST = {"lte": 4.0, "dejavu-ft": 3.0, "sketch-ft": 3.0, "random-topk": 2.5, "dense-ft": 2.0, "dejavu": 1.5,
         "moefication": 1.5, "moefication-oracle": 0.5, "sketch": 0.5, "teal": 0.8, "cats": 0.6}


@dataclass
class Unit:
    """One worker process's job."""

    study: str  # the study's output folder
    method: str  # a method name, or "dense"
    values: list[float] | None  # knob values to run (None: the method's own list)
    cost: float
    retries: int = 0  # times it ran out of GPU memory beside other units and was queued again
    kin: tuple[str, ...] = ()  # the study's other methods of the same base (timing fallback for a new method)

    @property
    def label(self) -> str:
        tail = "" if self.values is None else "_t" + "-".join(f"{v:g}" for v in self.values)
        return f"{Path(self.study).name}/{self.method}{tail}"


def plan_units(cfg: dict[str, Any], out: Path) -> list[Unit]:
    """The dense unit and the method units of one study, longest first."""
    units = []
    methods = derived_methods(cfg, cfg["methods"])
    bases = {m: method_plan(cfg, m)[0] for m in cfg["methods"] if m != "dense"}
    for method in cfg["methods"]:
        if method == "dense":
            continue
        base = bases[method]
        kin = tuple(m for m, b in bases.items() if b == base and m != method)
        names = [m for m in methods if m == method or m == f"{method}-topk"]
        todo = [v for v in knob_values(cfg, method) if not all(point_done(cfg, out, n, v) for n in names)]
        if not todo:
            continue  # finished earlier: nothing to launch
        if base in TRAINED:  # trained per target: one unit each
            units += [Unit(str(out), method, [v], _COST[base], kin=kin) for v in todo]
        else:  # one router / predictor / calibration pass shared over the targets
            units.append(Unit(str(out), method, todo, _COST[base], kin=kin))
    units.sort(key=lambda u: -u.cost)  # run_parallel's `start_order` orders all studies' units together
    # One dense unit first when its point is missing, or when methods will start from a dense model
    # whose weights were not carried along (else every method worker would fine-tune it at once,
    # into the same folder).
    need_dense = not point_done(cfg, out, "dense", None) or (bool(units) and dense_weights_missing(out))
    dense = [Unit(str(out), "dense", None, 1.0)] if need_dense else []
    return dense + units


def start_order(units: list[Unit], methods: dict[str, list[str]]) -> list[Unit]:
    """The order units start in: dense units first (the others wait for them), then the costliest
    kind of method first (load balance), and among equals the study's `methods` order (the order
    `--methods` gave) before the seed. So when the time limit cuts a run short, the first-named
    methods have all their seeds done, and a round can be decided on them, instead of every method
    holding one seed. ``methods``: study folder -> its methods."""
    def key(unit: Unit) -> tuple:
        names = methods.get(unit.study, [])
        rank = names.index(unit.method) if unit.method in names else len(names)
        return (unit.method != "dense", -unit.cost, rank)

    return sorted(units, key=key)  # stable: seeds (and targets) keep their order


def _command(unit: Unit) -> list[str]:
    cmd = [sys.executable, "-m", "lte.cli.main", "-v", "study", str(Path(unit.study) / "study_config.yaml"),
           "--out", unit.study, "--worker", "--methods", unit.method]
    if unit.values is not None:
        cmd += ["--targets", ",".join(f"{v:g}" for v in unit.values)]
    return cmd


def _gpu_count() -> int:
    try:
        import torch

        return torch.cuda.device_count()
    except Exception:  # no torch CUDA runtime: CPU workers
        return 0


#: Seconds a worker gets, once asked to stop, to finish its training step and write a checkpoint.
STOP_GRACE_SECONDS = 60.0


def _stop_all(procs: list[subprocess.Popen], grace: float = STOP_GRACE_SECONDS) -> None:
    """Ask workers to stop (SIGTERM to each process group: training saves a checkpoint and the worker
    exits, `lte.study.resume`), then kill those still running after `grace` seconds."""
    for proc in procs:
        try:
            os.killpg(proc.pid, signal.SIGTERM)
        except ProcessLookupError:
            pass
    deadline = time.perf_counter() + grace
    for proc in procs:
        try:
            proc.wait(timeout=max(0.0, deadline - time.perf_counter()))
        except subprocess.TimeoutExpired:
            try:
                os.killpg(proc.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
            proc.wait()


def recorded_seconds(unit: Unit) -> float | None:
    """Seconds a unit of this method took before, from the finished points of its study and of its
    sibling studies (other seeds): per point train + build + eval seconds, the median; a unit
    that shares its build over several values counts the build once. A method with no finished
    point yet is counted like its kin (`Unit.kin`: the study's methods of the same base). None when
    none is recorded."""
    for methods in ((unit.method,), unit.kin):
        per_value, builds = [], []
        for method in methods:
            for path in Path(unit.study).parent.glob(f"*/{method}/t*/point.json"):
                try:
                    point = json.loads(path.read_text())
                except (OSError, ValueError):
                    continue
                per_value.append(float(point.get("train_seconds") or 0) + float(point.get("eval_seconds") or 0))
                builds.append(float(point.get("build_seconds") or 0))
        if per_value:
            break
    else:
        return None
    values = 1 if unit.values is None else len(unit.values)
    shared = unit.method != "dense" and values > 1
    build = statistics.median(builds)
    return statistics.median(per_value) * values + (build if shared else build * values)


#: File in a study folder: seconds each stopped unit had trained before its checkpoint (label -> seconds).
STOPPED_FILE = "stopped_units.json"


def _point_dir(unit: Unit) -> Path | None:
    """The folder of a one-value unit's point (its training runs and checkpoints live below it)."""
    if unit.values is None or len(unit.values) != 1:
        return None
    return point_path(unit.study, unit.method, unit.values[0]).parent


def _has_checkpoint(unit: Unit) -> bool:
    folder = _point_dir(unit)
    return folder is not None and folder.is_dir() and any(folder.glob("**/checkpoint-*"))


def _stopped_record(study: str) -> dict[str, float]:
    try:
        return {k: float(v) for k, v in json.loads((Path(study) / STOPPED_FILE).read_text()).items()}
    except (OSError, ValueError, AttributeError):
        return {}


def record_stopped(unit: Unit, seconds: float) -> None:
    """Add `seconds` to the time `unit` ran before it was stopped with a checkpoint (`STOPPED_FILE`)."""
    record = _stopped_record(unit.study)
    record[unit.label] = record.get(unit.label, 0.0) + seconds
    (Path(unit.study) / STOPPED_FILE).write_text(json.dumps(record, indent=1))


def forget_stopped(unit: Unit) -> None:
    """Drop a finished unit from `STOPPED_FILE`."""
    record = _stopped_record(unit.study)
    if record.pop(unit.label, None) is not None:
        (Path(unit.study) / STOPPED_FILE).write_text(json.dumps(record, indent=1))


#: Share of a unit's expected time a resumed unit is still counted to need (loading, evaluation).
RESUME_FLOOR = 0.15


def expected_seconds(unit: Unit, finished: dict[str, list[float]]) -> float | None:
    """How long `unit` should take: the median of its method's units finished in this run (per value),
    else `recorded_seconds`; None when nothing is known. A unit that resumes from a checkpoint needs
    that less the seconds it already ran (`record_stopped`), and at least `RESUME_FLOOR` of it."""
    done = finished.get(unit.method)
    if done:
        need = statistics.median(done) * (1 if unit.values is None else len(unit.values))
    else:
        need = recorded_seconds(unit)
    if need is None or not _has_checkpoint(unit):
        return need
    ran = _stopped_record(unit.study).get(unit.label, 0.0)
    return max(need - ran, RESUME_FLOOR * need)


@dataclass
class WorkerLimit:
    """How many units may run at once: --jobs, lowered when a unit runs out of GPU memory.

    A unit that ran out of memory while at most `peers` units ran (itself included) shows that
    `peers` units at once were too many: the limit drops to `peers - 1` (never below 1, never up
    again) and the unit runs again. Units that run out together all saw the same `peers`, so they
    lower the limit once, not once each. A unit fails for good when it ran out alone or after
    `MAX_RETRIES` retries."""

    jobs: int
    MAX_RETRIES = 5

    def out_of_memory(self, unit: Unit, peers: int) -> Unit | None:
        """The unit to queue again (None: it fails) after `unit` ran out of GPU memory with `peers`
        units running at most while it ran (itself included)."""
        if peers <= 1 or unit.retries >= self.MAX_RETRIES:
            return None
        self.jobs = max(1, min(self.jobs, peers - 1))
        return dataclasses.replace(unit, retries=unit.retries + 1)


def _sigterm_as_interrupt() -> Any:
    """Make SIGTERM raise KeyboardInterrupt in this (main) thread, so that a stopped study stops its workers
    too; returns the handler it replaced (None off the main thread, where signals cannot be set)."""
    if threading.current_thread() is not threading.main_thread():
        return None

    def interrupt(signum: int, frame: Any) -> None:
        raise KeyboardInterrupt(f"signal {signum}")

    return signal.signal(signal.SIGTERM, interrupt)


def run_parallel(studies: list[tuple[dict[str, Any], Path]], jobs: int, time_limit: float | None = None,
                 threads_per_job: int | None = None, progress: bool = True) -> dict[str, dict[str, str]]:
    """Run every unit of `studies` ((config, out folder) pairs) with at most `jobs` workers at once.

    A study's method units start once its dense unit has finished. Returns, per study folder,
    the failed units (`label -> reason`); a failed dense unit fails its whole study.
    """
    if jobs < 1:
        raise ValueError(f"jobs must be >= 1, got {jobs}")
    pending: list[Unit] = []
    failures: dict[str, dict[str, str]] = {str(out): {} for _, out in studies}
    dense_done: set[str] = set()
    for cfg, out in studies:
        out.mkdir(parents=True, exist_ok=True)
        (out / "logs").mkdir(exist_ok=True)
        (out / "study_config.yaml").write_text(yaml.safe_dump(cfg, sort_keys=False))
        units = plan_units(cfg, out)
        if not any(u.method == "dense" for u in units):
            dense_done.add(str(out))  # its dense model and point exist already
        pending += units
    pending = start_order(pending, {str(out): cfg.get("methods") or [] for cfg, out in studies})
    gpus = _gpu_count()
    threads = threads_per_job or max(1, (os.cpu_count() or 1) // jobs)
    running: list[tuple[Unit, subprocess.Popen, float, int]] = []
    start = time.perf_counter()
    total = len(pending)
    bar = _progress(total, progress)
    free_slots = list(range(jobs))
    limit = WorkerLimit(jobs)
    peers: dict[int, int] = {}  # worker pid -> most units running at once while it ran
    finished: dict[str, list[float]] = {}  # method -> seconds per value of its units that finished here

    def ready(unit: Unit) -> bool:
        return unit.method == "dense" or unit.study in dense_done

    def cannot_finish(unit: Unit, elapsed: float) -> float | None:
        """The expected seconds of a unit that would end past the time limit (None: start it)."""
        if time_limit is None:
            return None
        need = expected_seconds(unit, finished)
        return need if need is not None and elapsed + need > time_limit else None

    previous = _sigterm_as_interrupt()
    try:
        while pending or running:
            elapsed = time.perf_counter() - start
            if time_limit is not None and elapsed > time_limit:
                _stop_all([proc for _, proc, _, _ in running])
                for unit, proc, t0, _ in running:  # a unit that finished its point while stopping is done
                    if proc.returncode != 0:
                        failures[unit.study][unit.label] = (f"stopped at the time limit ({time_limit:.0f} s); "
                                                            "its training resumes from a checkpoint next time")
                        if _has_checkpoint(unit):
                            record_stopped(unit, time.perf_counter() - t0)
                for unit in pending:
                    failures[unit.study][unit.label] = "not started: time limit"
                logger.warning("time limit reached: %d unit(s) stopped, %d not started", len(running), len(pending))
                break
            for unit in [u for u in pending if ready(u)]:
                need = cannot_finish(unit, elapsed)
                if need is not None:
                    pending.remove(unit)
                    failures[unit.study][unit.label] = (f"not started: it takes about {need:.0f} s and "
                                                        f"{time_limit - elapsed:.0f} s were left")
                    bar.update(1)
            while free_slots and len(running) < limit.jobs and any(ready(u) for u in pending):
                unit = next(u for u in pending if ready(u))
                pending.remove(unit)
                slot = free_slots.pop(0)
                env = dict(os.environ, OMP_NUM_THREADS=str(threads), MKL_NUM_THREADS=str(threads),
                           TOKENIZERS_PARALLELISM="false", PYTHONUNBUFFERED="1")
                if gpus > 1:
                    env["CUDA_VISIBLE_DEVICES"] = str(slot % gpus)
                log = open(_log_path(unit), "a" if unit.retries else "w")
                proc = subprocess.Popen(_command(unit), stdout=log, stderr=subprocess.STDOUT, env=env,
                                        start_new_session=True)
                log.close()
                running.append((unit, proc, time.perf_counter(), slot))
            time.sleep(0.5)
            for _, proc, _, _ in running:
                peers[proc.pid] = max(peers.get(proc.pid, 0), len(running))
            for item in list(running):
                unit, proc, t0, slot = item
                if proc.poll() is None:
                    continue
                running.remove(item)
                free_slots.append(slot)
                seconds = time.perf_counter() - t0
                ran_with = peers.pop(proc.pid, 1)
                again = (limit.out_of_memory(unit, ran_with)
                         if proc.returncode != 0 and _ran_out_of_memory(unit) else None)
                if again is not None:  # too many workers for the GPU's memory (finished points are kept)
                    logger.warning("%s ran out of GPU memory with %d unit(s) running; it runs again, and at most "
                                   "%d unit(s) run at once from now", unit.label, ran_with, limit.jobs)
                    pending.insert(0, again)
                    continue
                if proc.returncode != 0:
                    failures[unit.study][unit.label] = _failure_reason(unit, proc.returncode)
                    if unit.method == "dense":  # nothing else of this study can run
                        for other in [u for u in pending if u.study == unit.study]:
                            pending.remove(other)
                            failures[unit.study][other.label] = "not started: the dense unit failed"
                else:
                    if unit.label in _stopped_record(unit.study):  # resumed: its per-value time is not a full unit's
                        forget_stopped(unit)
                    else:
                        finished.setdefault(unit.method, []).append(seconds / (1 if unit.values is None else len(unit.values)))
                    if unit.method == "dense":
                        dense_done.add(unit.study)
                bar.update(1)
                bar.set_postfix_str(f"{unit.label} {'ok' if proc.returncode == 0 else 'FAILED'} in {seconds:.0f} s")
                logger.info("%s %s in %.0f s", unit.label, "done" if proc.returncode == 0 else "FAILED", seconds)
            if not running and pending and not any(ready(u) for u in pending):
                break  # only units of failed studies are left (already marked)
    except KeyboardInterrupt:  # Ctrl-C or SIGTERM: the workers run in sessions of their own, so nothing else
        # stops them; asked here, each writes a checkpoint that the next run resumes
        logger.warning("interrupted: asking %d running unit(s) to stop; rerun the same command to resume",
                       len(running))
        _stop_all([proc for _, proc, _, _ in running])
        raise
    finally:
        bar.close()
        if previous is not None:
            signal.signal(signal.SIGTERM, previous)
    return failures


def _log_path(unit: Unit) -> Path:
    return Path(unit.study) / "logs" / (unit.label.split("/", 1)[1] + ".log")


def _log_tail(unit: Unit, tail_bytes: int = 20000) -> bytes:
    """The last `tail_bytes` of the unit's log (empty if it has none)."""
    try:
        with open(_log_path(unit), "rb") as fh:
            fh.seek(0, os.SEEK_END)
            fh.seek(max(0, fh.tell() - tail_bytes))
            return fh.read()
    except OSError:
        return b""


_ERROR_LINE = re.compile(r"^(lte: error: .*|[\w.]*(Error|Exception)(: .*)?)$")


def _failure_reason(unit: Unit, returncode: int) -> str:
    """Why a unit failed: its exit code, the last error line of its log (the CLI's `lte: error:` or a
    Python exception), and where the log is."""
    lines = _log_tail(unit).decode("utf-8", "replace").replace("\r", "\n").splitlines()
    error = next((line.strip() for line in reversed(lines) if _ERROR_LINE.match(line.strip())), None)
    return f"exit code {returncode}" + (f": {error}" if error else "") + f" (log: {_log_path(unit)})"


def _ran_out_of_memory(unit: Unit, tail_bytes: int = 20000) -> bool:
    """Whether the unit's log ends with a CUDA out-of-memory error."""
    tail = _log_tail(unit, tail_bytes)
    return b"OutOfMemoryError" in tail or b"CUDA out of memory" in tail


def _progress(total: int, enabled: bool):
    from tqdm.auto import tqdm

    return tqdm(total=total, desc="study units", unit="unit", disable=not enabled)
