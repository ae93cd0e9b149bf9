"""The served model under load, on loopback: `mlflow models serve` as the README starts it, a
bounded number of clients posting large PNGs at once, and what the server did with them.

    python benchmarks/serve_load.py --model runs:/<run id>/model          # or a model folder
    python benchmarks/serve_load.py --checkpoint best.ckpt                # wrapped, ocr=none
        [--megapixels 4] [--requests 16] [--concurrency 8]
        [--max-in-flight 2] [--max-queued 8] [--queue-timeout 30] [--retries 0] [--json out.json]
    # the hostile case of issue 18: 8 clients, one 90 MP PNG each, all at once
    python benchmarks/serve_load.py --checkpoint best.ckpt --megapixels 90 --requests 8 --concurrency 8

Each of --requests is one POST (a refused one is resent after its Retry-After up to --retries
times; each try counts). Prints requests/s, latency p50/p95 of the answered requests, the 503
count (and whether each carried Retry-After), the server's idle and peak memory (resident set of the whole process
tree, sampled every 20 ms) and the memory per request in flight: (peak - idle) / the most
requests the server read at once (``min(concurrency, max-in-flight)``). The limits default to
the served model's (`cartridgeocr.serving.limits.ServingLimits`); the run takes a few minutes
on 2 cores. Without --model or --checkpoint an untrained YOLO stands in (the
decode, detection and unrolling costs are those of a real model; it reads no text).
"""

from __future__ import annotations

import argparse
import base64
import json
import os
import socket
import subprocess
import sys
import tempfile
import threading
import time
import urllib.error
import urllib.request
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def make_png(megapixels: float, seed: int = 0) -> bytes:
    """A 4:3 PNG of ``megapixels``: a brass disc on a smooth, slightly noisy table (compresses
    like a photo's PNG rather than like pure noise or a flat colour)."""
    import io

    from PIL import Image, ImageDraw

    w = int(round((megapixels * 1e6 * 4 / 3) ** 0.5))
    h = int(round(w * 3 / 4))
    rng = np.random.default_rng(seed)
    rows = np.linspace(70, 130, h, dtype=np.float32)[:, None]
    cols = np.linspace(0, 30, w, dtype=np.float32)[None, :]
    base = (rows + cols).astype(np.uint8)
    img = Image.fromarray(np.dstack([base, base, (base * 0.9).astype(np.uint8)]))
    draw = ImageDraw.Draw(img)
    r = min(w, h) * 0.3
    draw.ellipse([w / 2 - r, h / 2 - r, w / 2 + r, h / 2 + r], fill=(200, 160, 60))
    draw.ellipse([w / 2 - r / 3, h / 2 - r / 3, w / 2 + r / 3, h / 2 + r / 3], fill=(120, 90, 40))
    arr = np.asarray(img).copy()
    noise_rows = rng.integers(0, 4, (min(h, 256), w, 3), dtype=np.uint8)
    arr[: noise_rows.shape[0]] += noise_rows  # a noisy band: not every row compresses to nothing
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, format="PNG", compress_level=1)
    return buf.getvalue()


def untrained_model(folder: Path) -> Path:
    """An untrained YOLO (320 px) reader model, ocr=none: the work around the detector is real."""
    import lightning as L
    from hydra.utils import instantiate

    from cartridgeocr.experiments.compose import compose
    from cartridgeocr.serving.log import reader_config, save_reader_model

    cfg = compose(["model=yolo", "optim=yolo_sgd", "data.image_size=320"], root_dir=folder)
    model = instantiate(cfg.model, _convert_="all")
    trainer = L.Trainer(accelerator="cpu", logger=False, enable_checkpointing=False,
                        enable_progress_bar=False, enable_model_summary=False)  # fmt: skip
    trainer.strategy.connect(model)
    ckpt = folder / "untrained.ckpt"
    trainer.save_checkpoint(ckpt, weights_only=True)
    return save_reader_model(folder / "model", ckpt, reader_config("none"))


def tree_rss(pid: int) -> int:
    """Resident bytes of a process and all its children."""
    import psutil

    try:
        proc = psutil.Process(pid)
        procs = [proc, *proc.children(recursive=True)]
    except psutil.Error:
        return 0
    total = 0
    for p in procs:
        try:
            total += p.memory_info().rss
        except psutil.Error:
            pass
    return total


class Sampler(threading.Thread):
    def __init__(self, pid: int, every: float = 0.02) -> None:
        super().__init__(daemon=True)
        self.pid, self.every, self.peak, self.stop = pid, every, 0, threading.Event()

    def run(self) -> None:
        while not self.stop.is_set():
            self.peak = max(self.peak, tree_rss(self.pid))
            time.sleep(self.every)


def post(url: str, body: bytes, timeout: float) -> tuple[int, dict, float]:
    t0 = time.perf_counter()
    req = urllib.request.Request(url, body, {"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(req, timeout=timeout) as resp:
            resp.read()
            status, headers = resp.status, {k.lower(): v for k, v in resp.headers.items()}
    except urllib.error.HTTPError as e:
        e.read()
        status, headers = e.code, {k.lower(): v for k, v in e.headers.items()}
    except (urllib.error.URLError, ConnectionError, TimeoutError) as e:
        status, headers = -1, {"error": str(e)}
    return status, headers, time.perf_counter() - t0


def serve(model: str, port: int, args: argparse.Namespace) -> subprocess.Popen:
    env = {
        **os.environ,
        "PATH": f"{BIN}{os.pathsep}{os.environ.get('PATH', '')}",  # mlflow starts uvicorn by name
        "CARTRIDGEOCR_SERVE_MAX_IN_FLIGHT": str(args.max_in_flight),
        "CARTRIDGEOCR_SERVE_MAX_QUEUED": str(args.max_queued),
        "CARTRIDGEOCR_SERVE_QUEUE_TIMEOUT": str(args.queue_timeout),
    }
    cmd = [str(BIN / "mlflow"), "models", "serve", "-m", model, "--env-manager", "local",
           "-h", "127.0.0.1", "-p", str(port), "-w", "1", "-t", str(args.timeout)]  # fmt: skip
    print("serving:", " ".join(cmd), flush=True)
    return subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            start_new_session=True)  # fmt: skip


def wait_ready(base: str, server: subprocess.Popen, limit: float = 600) -> None:
    deadline = time.time() + limit
    while True:
        try:
            with urllib.request.urlopen(f"{base}/ping", timeout=5) as r:
                if r.status == 200:
                    return
        except (urllib.error.URLError, ConnectionError, TimeoutError):
            pass
        if server.poll() is not None:
            raise SystemExit("the server died:\n" + server.stdout.read().decode()[-3000:])
        if time.time() > deadline:
            raise SystemExit("the server did not start")
        time.sleep(1)


def percentile(values: list[float], q: float) -> float:
    if not values:
        return float("nan")
    return float(np.percentile(np.asarray(values), q))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", help="model URI or folder (runs:/<id>/model)")
    parser.add_argument("--checkpoint", help="a detector checkpoint, served with ocr=none")
    parser.add_argument("--megapixels", type=float, default=4.0)
    parser.add_argument("--requests", type=int, default=16)
    parser.add_argument("--concurrency", type=int, default=8)
    from cartridgeocr.serving.limits import ServingLimits

    served = ServingLimits()  # the served model's defaults
    parser.add_argument("--max-in-flight", type=int, default=served.max_in_flight)
    parser.add_argument("--max-queued", type=int, default=served.max_queued)
    parser.add_argument("--queue-timeout", type=float, default=served.queue_timeout)
    parser.add_argument("--timeout", type=int, default=300, help="server request timeout, s")
    parser.add_argument("--retries", type=int, default=0,
                        help="resend a request refused with 503 after its Retry-After, this often")  # fmt: skip
    parser.add_argument("--json", help="also write the figures to this file")
    args = parser.parse_args()
    os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")

    with tempfile.TemporaryDirectory(prefix="serve-load-") as tmp:
        if args.model:
            model = args.model
        elif args.checkpoint:
            from cartridgeocr.serving.log import reader_config, save_reader_model

            model = str(save_reader_model(Path(tmp) / "model", args.checkpoint,
                                          reader_config("none")))  # fmt: skip
        else:
            print("no --model or --checkpoint: an untrained YOLO stands in", flush=True)
            model = str(untrained_model(Path(tmp)))
        png = make_png(args.megapixels)
        body = json.dumps({"inputs": [{"image": base64.b64encode(png).decode()}]}).encode()
        print(f"{args.requests} requests of one {args.megapixels:g} MP PNG ({len(png) / 1e6:.1f} MB,"
              f" body {len(body) / 1e6:.1f} MB), {args.concurrency} clients at once", flush=True)  # fmt: skip

        port = free_port()
        base = f"http://127.0.0.1:{port}"
        server = serve(model, port, args)
        try:
            wait_ready(base, server)
            small = json.dumps({"inputs": [{"image": base64.b64encode(make_png(0.05)).decode()}]})
            warm = post(f"{base}/invocations", small.encode(), args.timeout)
            assert warm[0] == 200, f"warm-up request answered {warm[0]}"
            time.sleep(1.0)
            idle = tree_rss(server.pid)
            sampler = Sampler(server.pid)
            sampler.start()
            results: list[tuple[int, dict, float]] = []
            lock = threading.Lock()
            counter = iter(range(args.requests))

            def client() -> None:
                while True:
                    with lock:
                        if next(counter, None) is None:
                            return
                    for attempt in range(args.retries + 1):
                        outcome = post(f"{base}/invocations", body, args.timeout + 60)
                        with lock:
                            results.append(outcome)
                        if outcome[0] != 503 or attempt == args.retries:
                            break
                        time.sleep(float(outcome[1].get("retry-after", 1)))

            t0 = time.perf_counter()
            threads = [threading.Thread(target=client) for _ in range(args.concurrency)]
            for t in threads:
                t.start()
            for t in threads:
                t.join()
            wall = time.perf_counter() - t0
            time.sleep(0.2)
            sampler.stop.set()
            sampler.join()
        finally:
            server.terminate()
            try:
                server.wait(timeout=30)
            except subprocess.TimeoutExpired:
                server.kill()

    answered: dict[str, int] = {}
    for status, _, _ in results:
        answered[str(status)] = answered.get(str(status), 0) + 1
    ok = [dt for status, _, dt in results if status == 200]
    refused = [h for status, h, _ in results if status == 503]
    at_once = min(args.concurrency, args.max_in_flight)
    per_request = (sampler.peak - idle) / at_once
    figures = {
        "megapixels": args.megapixels,
        "png_mb": round(len(png) / 1e6, 2),
        "requests": args.requests,
        "tries": len(results),
        "concurrency": args.concurrency,
        "max_in_flight": args.max_in_flight,
        "max_queued": args.max_queued,
        "wall_s": round(wall, 2),
        "requests_per_s": round(len(results) / wall, 3),
        "answered_per_s": round(len(ok) / wall, 3),
        "p50_s": round(percentile(ok, 50), 3),
        "p95_s": round(percentile(ok, 95), 3),
        "answered": answered,
        "retry_after_on_every_503": all("retry-after" in h for h in refused),
        "idle_rss_mb": round(idle / 2**20),
        "peak_rss_mb": round(sampler.peak / 2**20),
        "mb_per_request_in_flight": round(per_request / 2**20),
    }
    print(
        f"requests/s {figures['requests_per_s']} (200s: {figures['answered_per_s']}/s), "
        f"latency of the 200s p50 {figures['p50_s']} s p95 {figures['p95_s']} s, "
        f"answers {answered}, 503s {len(refused)} (Retry-After on each: "
        f"{figures['retry_after_on_every_503']})\n"
        f"server memory idle {figures['idle_rss_mb']} MB, peak {figures['peak_rss_mb']} MB, "
        f"{figures['mb_per_request_in_flight']} MB per request in flight "
        f"({at_once} read at once)"
    )
    if args.json:
        Path(args.json).write_text(json.dumps(figures, indent=1) + "\n")


if __name__ == "__main__":
    main()
