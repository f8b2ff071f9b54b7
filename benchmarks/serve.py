"""What `latentforge serve` costs on top of the generation: per-request overhead and throughput.

The server is a `latentforge serve` process on a free port (default model, default settings: live previews
on, every step), driven over HTTP by httpx; the reference is the same generation in this process,
`Pipeline.default()(prompt, seed, steps=4, width=64, height=64)`. Both use `--threads` torch threads.

1. Overhead: txt2img, 4 steps, 64×64, batch 1, fixed seeds. One turn is `--n` requests over HTTP from one
   client (previews on, the server's default), the same `--n` requests with the server's previews off
   (`live_previews_enable: false`), then the same `--n` generations in-process; the turns alternate
   `--repeat` times after a warm-up, so a busy machine slows all three alike. Printed: the median wall time
   per image (and the spread over turns), the ratio HTTP / in-process per turn (median, min–max), and the CPU
   seconds per image (the server process's from /proc plus this client's, against the in-process run's),
   which other processes on a shared machine disturb less than the wall time.
2. Throughput: `--clients` clients at once (one thread and connection each) sending `--per-client` requests
   each, against one client sending the same number in a row; images per second, alternated `--repeat-tp`
   times (the server has one worker: concurrency can only overlap HTTP and JSON work with generation).
3. With `--batch-jobs N` (> 0): a second server started with `--batch-jobs N` (waiting jobs that differ
   only in prompt and seed are sampled as one batch of up to N images) takes the same `--clients` load,
   alternated with the first server's; printed: its images per second and the ratio to one client.

    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/serve.py [--n 10] [--repeat 7] [--clients 8]
        [--per-client 4] [--repeat-tp 3] [--threads 1] [--batch-jobs 8] [--json out.json]
"""

from __future__ import annotations

import argparse
import concurrent.futures
import os
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from latentforge.files import write_json  # noqa: E402
from latentforge.pipeline import Pipeline  # noqa: E402

PROMPT = "a red cube left of a blue ball"


def request(seed: int, steps: int) -> dict:
    return {"prompt": PROMPT, "seed": seed, "steps": steps, "width": 64, "height": 64, "batch_size": 1}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def cpu_seconds(pid: int) -> float:
    """user + system CPU seconds of a process, from /proc/PID/stat (Linux)."""
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rpartition(")")[2].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def start_server(threads: int, log, extra: tuple[str, ...] = ()) -> tuple[subprocess.Popen, str]:
    exe = Path(sys.executable).with_name("latentforge")
    cmd = [str(exe)] if exe.exists() else [sys.executable, "-m", "latentforge"]
    port = free_port()
    env = os.environ | {"OMP_NUM_THREADS": str(threads)}
    proc = subprocess.Popen(
        [*cmd, "serve", "--port", str(port), *extra], stdout=log, stderr=subprocess.STDOUT, env=env
    )
    base = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 120
    while True:
        if proc.poll() is not None:
            raise RuntimeError(f"the server exited with status {proc.returncode}")
        try:
            if httpx.get(base + "/sdapi/v1/progress", timeout=5).status_code == 200:
                return proc, base
        except httpx.TransportError:
            pass
        if time.monotonic() > deadline:
            proc.kill()
            raise RuntimeError("the server did not start in 120 s")
        time.sleep(0.2)


def set_previews(c: httpx.Client, on: bool) -> None:
    r = c.post("/sdapi/v1/options", json={"live_previews_enable": on})
    r.raise_for_status()


def http_turn(c: httpx.Client, pid: int, seeds: range, steps: int) -> tuple[float, float, float]:
    """(wall seconds, CPU seconds: server + this client, this client's CPU seconds), per image, for
    len(seeds) requests."""
    cpu0, mine0, t0 = cpu_seconds(pid), time.process_time(), time.perf_counter()
    for s in seeds:
        r = c.post("/sdapi/v1/txt2img", json=request(s, steps))
        r.raise_for_status()
        assert len(r.json()["images"]) == 1
    wall = time.perf_counter() - t0
    client = time.process_time() - mine0
    cpu = cpu_seconds(pid) - cpu0 + client
    return wall / len(seeds), cpu / len(seeds), client / len(seeds)


def inproc_turn(pipe: Pipeline, seeds: range, steps: int) -> tuple[float, float, float]:
    mine0, t0 = time.process_time(), time.perf_counter()
    for s in seeds:
        images = pipe(prompt=PROMPT, seed=s, steps=steps, width=64, height=64, progress=False)
        assert len(images) == 1
    return (time.perf_counter() - t0) / len(seeds), (time.process_time() - mine0) / len(seeds), 0.0


def throughput(base: str, clients: int, per_client: int, steps: int) -> float:
    """Images per second with `clients` clients at once, each sending `per_client` requests in a row."""
    pool_clients = [httpx.Client(base_url=base, timeout=300) for _ in range(clients)]

    def run(k: int) -> int:
        for i in range(per_client):
            r = pool_clients[k].post("/sdapi/v1/txt2img", json=request(10_000 + k * per_client + i, steps))
            r.raise_for_status()
        return per_client

    try:
        t0 = time.perf_counter()
        with concurrent.futures.ThreadPoolExecutor(clients) as ex:
            n = sum(ex.map(run, range(clients)))
        return n / (time.perf_counter() - t0)
    finally:
        for c in pool_clients:
            c.close()


def spread(xs: list[float], scale: float = 1.0, fmt: str = ".1f") -> str:
    return f"{statistics.median(xs) * scale:{fmt}} [{min(xs) * scale:{fmt}}, {max(xs) * scale:{fmt}}]"


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--steps", type=int, default=4)
    p.add_argument("--n", type=int, default=10, help="requests (and in-process generations) per turn")
    p.add_argument("--repeat", type=int, default=7, help="alternating turns of the overhead part (>= 5)")
    p.add_argument("--clients", type=int, default=8, help="concurrent clients of the throughput part")
    p.add_argument("--per-client", type=int, default=4, help="requests per client in the throughput part")
    p.add_argument("--repeat-tp", type=int, default=3, help="alternating turns of the throughput part")
    p.add_argument("--threads", type=int, default=1, help="torch threads, here and in the server")
    p.add_argument("--batch-jobs", type=int, default=0, help="> 0: also a server with --batch-jobs N")
    p.add_argument("--json", default=None, help="write the numbers here")
    args = p.parse_args()
    if args.repeat < 5:
        p.error("--repeat must be >= 5")
    torch.set_num_threads(args.threads)

    pipe = Pipeline.default()
    with tempfile.TemporaryFile("w+") as log:
        procs = []
        try:
            proc, base = start_server(args.threads, log)
            procs.append(proc)
            batched = None
            if args.batch_jobs > 0:
                bproc, batched = start_server(args.threads, log, ("--batch-jobs", str(args.batch_jobs)))
                procs.append(bproc)
            res = run(args, pipe, proc, base, batched)
        finally:
            for proc in procs:
                proc.terminate()
                try:
                    proc.wait(30)
                except subprocess.TimeoutExpired:
                    proc.kill()
            log.seek(0)
            text = log.read()
    if "Traceback" in text:
        print(text[-3000:])
        return 1
    if args.json:
        write_json(args.json, res)
        print(f"wrote {args.json}")
    return 0


def run(args, pipe: Pipeline, proc: subprocess.Popen, base: str, batched: str | None) -> dict:
    steps, n = args.steps, args.n
    with httpx.Client(base_url=base, timeout=300) as c:
        # warm-up: the server loads its model at the first request; both sides' first-call paths
        set_previews(c, True)
        http_turn(c, proc.pid, range(3), steps)
        inproc_turn(pipe, range(3), steps)
        turns: dict[str, list[tuple[float, float, float]]] = {"http": [], "http_nopreview": [], "inproc": []}
        for r in range(args.repeat):
            seeds = range(r * n, (r + 1) * n)  # the same seeds for the three variants of a turn
            set_previews(c, True)
            turns["http"].append(http_turn(c, proc.pid, seeds, steps))
            set_previews(c, False)
            turns["http_nopreview"].append(http_turn(c, proc.pid, seeds, steps))
            turns["inproc"].append(inproc_turn(pipe, seeds, steps))
        set_previews(c, True)

    wall = {k: [t[0] for t in v] for k, v in turns.items()}
    cpu = {k: [t[1] for t in v] for k, v in turns.items()}
    client = {k: [t[2] for t in v] for k, v in turns.items()}
    ratio = {
        k: [a / b for a, b in zip(wall[k], wall["inproc"], strict=True)] for k in ("http", "http_nopreview")
    }
    print(
        f"default model, {steps} steps, 64x64, batch 1, {args.threads} torch thread(s); "
        f"{args.repeat} turns of {n} images each (median [min, max] over turns)"
    )
    print(f"{'':32s} {'wall ms/image':>22s} {'CPU ms/image':>22s} {'wall ratio vs in-process':>26s} "
          f"{'client CPU ms':>20s}")  # fmt: skip
    labels = {"inproc": "in-process Pipeline", "http": "HTTP txt2img (previews on)",
              "http_nopreview": "HTTP txt2img (previews off)"}  # fmt: skip
    for k in ("inproc", "http", "http_nopreview"):
        r = spread(ratio[k], fmt=".3f") if k in ratio else "1"
        c = spread(client[k], 1e3, ".2f") if k in ratio else "-"
        print(f"{labels[k]:32s} {spread(wall[k], 1e3):>22s} {spread(cpu[k], 1e3):>22s} {r:>26s} {c:>20s}")
    med = {k: statistics.median(v) for k, v in wall.items()}
    print(
        f"server overhead per request: {1e3 * (med['http'] - med['inproc']):+.1f} ms wall (previews on), "
        f"{1e3 * (med['http_nopreview'] - med['inproc']):+.1f} ms (previews off)"
    )

    many = str(args.clients)
    tp: dict[str, list[float]] = {"1": [], many: []}
    if batched:
        tp[f"{many} --batch-jobs {args.batch_jobs}"] = []
        httpx.post(batched + "/sdapi/v1/txt2img", json=request(0, steps), timeout=300).raise_for_status()
    total = args.clients * args.per_client
    for _ in range(args.repeat_tp):
        tp["1"].append(throughput(base, 1, total, steps))
        tp[many].append(throughput(base, args.clients, args.per_client, steps))
        if batched:
            tp[f"{many} --batch-jobs {args.batch_jobs}"].append(
                throughput(batched, args.clients, args.per_client, steps)
            )
    tp_ratio = {k: [b / a for a, b in zip(tp["1"], v, strict=True)] for k, v in tp.items() if k != "1"}
    print(f"\nthroughput, {total} requests per turn, {args.repeat_tp} turns (median [min, max])")
    print(f"{'clients':>16s} {'images/s':>22s} {'vs 1 client':>22s}")
    for k, v in tp.items():
        r = spread(tp_ratio[k], fmt=".3f") if k in tp_ratio else "1"
        print(f"{k:>16s} {spread(v, fmt='.2f'):>22s} {r:>22s}")

    return {
        "steps": steps,
        "n_per_turn": n,
        "threads": args.threads,
        "wall_s_per_image": wall,
        "cpu_s_per_image": cpu,
        "client_cpu_s_per_image": client,
        "wall_ratio_vs_inproc": ratio,
        "median_overhead_ms": {k: 1e3 * (med[k] - med["inproc"]) for k in ("http", "http_nopreview")},
        "throughput_images_per_s": tp,
        "throughput_ratio": tp_ratio,
        "clients": args.clients,
        "per_client": args.per_client,
    }


if __name__ == "__main__":
    raise SystemExit(main())
