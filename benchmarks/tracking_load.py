#!/usr/bin/env python
"""How many trials one MLflow tracking server keeps up with: N concurrent trial loggers (the real
RunLogger and its spool) logging like a fast GPU trial, into one server on PostgreSQL (as k8s/
deploys it: basic auth, served artifacts) and one on the embedded SQLite store.

    python benchmarks/tracking_load.py                          # N = 8, 32, 64; ~10 minutes
    python benchmarks/tracking_load.py --loggers 16 --seconds 20 --stores sqlite
    python benchmarks/tracking_load.py --loggers 32 --stores postgres-nocache,postgres

Each logger: a run of its own, a row of 25 metric values every 0.5 s, an image every 30 s. The
loggers run as threads spread over `--processes` processes (so the load generator does not
starve the server of the machine's cores). For each store and N it prints:
- values delivered per second while writing (written, less what was still queued when the
  writers stopped), and values written per second;
- the queue depth (rows waiting in every logger's spool) sampled every second: its median and
  last value while writing, and whether it grew (second half's median above the first's);
- write-to-visible latency, p50/p99: from a row's enqueue (its timestamp) until
  `get_metric_history` returns it, polled every second on `--watched` of the runs (so to a second);
- the drain time: from the writers' stop until every spool is empty (at most `--drain-limit`;
  spools left then are counted); and whether MLflow then holds every row once (rows in the
  watched key's history against rows written).
Goal (reported, not gating): 64 loggers with no growing backlog, drained within 10 s, on
PostgreSQL. PostgreSQL needs Debian's `postgresql` (run as an unprivileged user by
tests/postgres.py, which this script uses).
"""

from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import os
import statistics
import sys
import tempfile
import threading
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
VALUES_PER_ROW, ROW_EVERY_S, IMAGE_EVERY_S = 25, 0.5, 30.0
GOAL = {"loggers": 64, "drain_s": 10.0}


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--loggers", default="8,32,64", help="comma-separated N")
    p.add_argument("--seconds", type=float, default=30.0, help="how long the loggers write")
    p.add_argument("--stores", default="postgres,sqlite",
                   help="of postgres, sqlite, postgres-nocache (k8s/'s basic-auth credential cache off)")
    p.add_argument("--processes", type=int, default=4, help="processes the loggers are spread over")
    p.add_argument("--watched", type=int, default=4, help="runs whose rows are polled for latency (each poll is a "
                                                        "request the server serves too: keep it small)")
    p.add_argument("--drain-limit", type=float, default=120.0, help="seconds the loggers get to drain at the end")
    p.add_argument("--tracking-uri", help="load a running server instead (its store named 'given'; "
                                          "credentials from MLFLOW_TRACKING_USERNAME/PASSWORD)")
    p.add_argument("--json", dest="json_out")
    p.add_argument("--smoke", action="store_true", help="N=2 for 3 s on SQLite: proves the script runs")
    args = p.parse_args(argv)
    unknown = set(args.stores.split(",")) - {"postgres", "sqlite", "postgres-nocache"}
    if unknown:
        p.error(f"--stores: unknown {', '.join(sorted(unknown))} (postgres, sqlite, postgres-nocache)")
    if args.smoke:
        args.loggers, args.seconds, args.stores, args.processes = "2", 3.0, "sqlite", 1
    return args


# ------------------------------------------------------------------------------ the load


def _logger_process(uri: str, run_ids: list[str], run_dir: str, timing: tuple[float, float], env: dict, depth_q,
                    done_q) -> None:
    """Threads of RunLoggers, one per run, writing for `seconds`; this process's total queue depth
    every second goes to `depth_q`; at the end, the time its spools took to drain."""
    os.environ.update(env)
    seconds, drain_limit = timing
    import numpy as np

    from paceray.tracking.runlog import RunLogger

    loggers = [RunLogger(run_id, uri, run_dir) for run_id in run_ids]
    stop = threading.Event()
    image = (np.random.default_rng(0).random((64, 64, 3)) * 255).astype("uint8")

    rows = [0] * len(loggers)

    def write(k: int, logger, offset: float):
        time.sleep(offset)  # the loggers' rows spread over the half second
        step, start, next_image = 0, time.monotonic(), time.monotonic() + offset * 40
        while not stop.is_set():
            rows[k] += 1
            logger.log_metrics({f"train/m{i:02d}": step + i / 100 for i in range(VALUES_PER_ROW)}, step)
            if time.monotonic() >= next_image:
                logger.log_image(image, "samples", step)
                next_image += IMAGE_EVERY_S
            step += 1
            stop.wait(max(0.0, start + step * ROW_EVERY_S - time.monotonic()))

    threads = [threading.Thread(target=write, args=(i, lg, i * ROW_EVERY_S / len(loggers)), daemon=True)
               for i, lg in enumerate(loggers)]
    for t in threads:
        t.start()
    end = time.monotonic() + seconds
    while time.monotonic() < end:
        depth_q.put((time.time(), sum(lg.spool.pending() for lg in loggers)))
        time.sleep(1.0)
    stop.set()
    for t in threads:
        t.join()
    drain_start = time.monotonic()
    left = [lg.close(timeout=max(1.0, drain_start + drain_limit - time.monotonic())) for lg in loggers]
    done_q.put((time.monotonic() - drain_start, sum(1 for x in left if x), sum(rows)))


def _watch(uri: str, run_ids: list[str], env: dict, stop: threading.Event, seen: dict) -> None:
    """When each row of the watched runs first shows in get_metric_history (vs its timestamp)."""
    os.environ.update(env)
    from mlflow.tracking import MlflowClient

    client = MlflowClient(uri)
    while not stop.is_set():
        for run_id in run_ids:
            try:
                history = client.get_metric_history(run_id, "train/m00")
            except Exception:
                continue
            now = time.time() * 1000
            for m in history:
                seen.setdefault((run_id, m.step), now - m.timestamp)
        stop.wait(1.0)


def load(server, n: int, args, scratch: Path) -> dict:
    """N loggers against `server` (uri, client_env): the figures of one row of the table."""
    os.environ.update(server.client_env)
    from mlflow.tracking import MlflowClient

    client = MlflowClient(server.uri)
    exp = client.create_experiment(f"load-{n}-{time.time_ns()}")
    run_ids = [client.create_run(exp).info.run_id for _ in range(n)]
    ctx = mp.get_context("spawn")
    depth_q, done_q = ctx.Queue(), ctx.Queue()
    shares = [run_ids[i::args.processes] for i in range(args.processes) if run_ids[i::args.processes]]
    procs = [ctx.Process(target=_logger_process, args=(server.uri, share, str(scratch / f"runs-{n}"),
                                                       (args.seconds, args.drain_limit), server.client_env, depth_q,
                                                       done_q), daemon=True) for share in shares]
    stop, seen = threading.Event(), {}
    watcher = threading.Thread(target=_watch, args=(server.uri, run_ids[:args.watched], server.client_env, stop, seen),
                               daemon=True)
    watcher.start()
    started = time.time()
    for p in procs:
        p.start()
    drains = [done_q.get(timeout=args.seconds + args.drain_limit + 120) for _ in procs]
    for p in procs:
        p.join()
    stop.set()
    watcher.join(timeout=30)
    depth: dict[int, int] = {}
    while not depth_q.empty():
        t, d = depth_q.get()
        depth[int(t - started)] = depth.get(int(t - started), 0) + d
    series = [depth[k] for k in sorted(depth)]
    half = len(series) // 2
    rows_written = sum(rows for _, _, rows in drains)
    rows_in_mlflow = sum(len(client.get_metric_history(r, "train/m00")) for r in run_ids)
    latencies = sorted(seen.values())
    pct = (lambda q: latencies[min(len(latencies) - 1, int(q * len(latencies)))] / 1000 if latencies else float("nan"))
    queued_at_stop = series[-1] if series else 0
    return {"loggers": n, "values_written_per_s": rows_written * VALUES_PER_ROW / args.seconds,
            "values_delivered_per_s": (rows_written - queued_at_stop) * VALUES_PER_ROW / args.seconds,
            "rows_written": rows_written, "rows_in_mlflow": rows_in_mlflow, "depth_series": series,
            "depth_median": statistics.median(series) if series else 0, "depth_last": series[-1] if series else 0,
            "backlog_grew": bool(half and statistics.median(series[half:]) > 1.5 * max(1, statistics.median(series[:half]))),
            "latency_p50_s": pct(0.50), "latency_p99_s": pct(0.99), "latency_rows": len(latencies),
            "drain_s": max(d for d, _, _ in drains), "spools_left": sum(left for _, left, _ in drains)}


# ------------------------------------------------------------------------------ the servers


class _Given:
    def __init__(self, uri: str):
        self.uri, self.client_env = uri, {}

    def stop(self):
        pass


class _Sqlite:
    def __init__(self, root: Path):
        from paceray.tracking.server import LocalServer

        self.server = LocalServer(root).start()
        self.uri, self.client_env = self.server.uri, {}

    def stop(self):
        self.server.stop()


class _Postgres:
    def __init__(self, root: Path, auth_cache_ttl: int | None = None):
        sys.path.insert(0, str(REPO / "tests"))
        from postgres import Postgres, PostgresMlflowServer, postgres_bin

        if postgres_bin() is None:
            raise SystemExit("tracking_load: no PostgreSQL (apt-get install postgresql), or --stores sqlite")
        self.pg = Postgres().start()
        self.server = PostgresMlflowServer(self.pg, root, "load", auth_cache_ttl).start()
        self.uri, self.client_env = self.server.uri, self.server.client_env

    def stop(self):
        self.server.stop()
        self.pg.stop()


def main(argv=None) -> int:
    args = parse_args(argv)
    # The watcher's polls fail fast when a server is gone (an interrupt, a crash), as the loggers'
    # own calls do, instead of MLflow's minutes of retries.
    from paceray.tracking.runlog import FAST_FAIL_ENV

    os.environ.update(FAST_FAIL_ENV)
    scratch = Path(tempfile.mkdtemp(prefix="paceray-tracking-load-"))
    results = []
    stores = ["given"] if args.tracking_uri else args.stores.split(",")
    for store in stores:
        if args.tracking_uri:
            server = _Given(args.tracking_uri)
        elif store == "sqlite":
            server = _Sqlite(scratch / store)
        else:
            server = _Postgres(scratch / store, 0 if store == "postgres-nocache" else None)
        try:
            for n in (int(x) for x in args.loggers.split(",")):
                r = {"store": store, **load(server, n, args, scratch / store)}
                results.append(r)
                left = f" · {r['spools_left']} spool(s) left" if r["spools_left"] else ""
                once = "" if r["rows_in_mlflow"] == r["rows_written"] else \
                    f" · MLflow holds {r['rows_in_mlflow']} of {r['rows_written']} rows"
                print(f"{store:8s} N={n:3d}: delivered {r['values_delivered_per_s']:7.0f} values/s while writing "
                      f"(written {r['values_written_per_s']:.0f}/s) · queue median {r['depth_median']} last "
                      f"{r['depth_last']} rows{' GROWING' if r['backlog_grew'] else ''} · visible after p50 "
                      f"{r['latency_p50_s']:.2f} s p99 {r['latency_p99_s']:.2f} s ({r['latency_rows']} rows) · "
                      f"drained in {r['drain_s']:.1f} s{left}{once}", flush=True)
        finally:
            server.stop()
    goal = [r for r in results if r["store"] == "postgres" and r["loggers"] == GOAL["loggers"]]
    if goal:
        met = not goal[0]["backlog_grew"] and goal[0]["drain_s"] <= GOAL["drain_s"]
        print(f"goal (64 loggers on PostgreSQL, no growing backlog, drained within 10 s): {'met' if met else 'NOT met'}")
    print(f"{args.seconds:.0f} s of writing per N; {args.processes} logger processes; load average "
          f"{os.getloadavg()[0]:.2f}")
    if args.json_out:
        Path(args.json_out).write_text(json.dumps(results, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
