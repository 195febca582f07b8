"""Replicas behind HAProxy on an S3 registry: publish to converged, cold and warm starts, requests per second.

    .venv/bin/python -m benchmarks.replicas                                       # a tiny model trained by `aeserve train`
    .venv/bin/python -m benchmarks.replicas --registry /tmp/reg --model fmnist-mlp30 --json replicas.json

Everything runs on 127.0.0.1: moto's S3 server (as the tests start it, tests/s3.py), `aeserve serve` replicas at their
defaults (`--registry s3://... --cache DIR --port P` and nothing else: poll every 2 s, the ONNX engine in its engine
process), and HAProxy (Debian's) running the shipped deploy/haproxy.cfg, as tests/system/test_replicas.py runs it (its
global and defaults sections as they are, so it logs every request to haproxy.log; benchmarks/haproxy.py gives each
measured target a frontend and backend of its own). Version 1 is either trained into the S3 registry by the real CLI
(`aeserve train --data` on a small array: an MLP, one epoch), or, with `--registry`, the latest version of `--model`
in that local registry, uploaded with ObjectRegistry.publish. Each later version is version 1's files with the
model's weights scaled by 1 + 1e-6: a new sha256, so the replicas must download and load it, and answers that stay
valid for the same rows.

(a) publish to converged: 3 replicas; `publish` returns, then each replica is asked directly (every 20 ms) until it
    answers with the new version in `X-Model-Version`; the time to the last one. Expected: up to one poll interval
    (2 s by default) plus the download and the load. Between rounds the replicas settle (their new versions moved to
    the engine process) and a random pause shifts the publish against their poll phase.
(b) cold start from an empty cache against a warm one (the same cache, restarted): seconds from the process's start to
    /health/ready 200, and bytes downloaded (`aeserve_registry_fetched_bytes` on /metrics). Version 1 only.
(c) requests per second, single-row JSON encode, wrk with 2 threads and 16 connections: direct to one replica, through
    HAProxy with 1 replica and with 2, in turns (the median turn is shown). On a 2-core machine the replicas, HAProxy
    and wrk share the same cores, so this shows the proxy's overhead, not scaling.
"""
from __future__ import annotations

import argparse
import contextlib
import json
import os
import random
import re
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from pathlib import Path

import httpx
import numpy as np

from aeserve.training.distributed import free_port
from benchmarks.haproxy import haproxy_config
from benchmarks.loadgen import processes, wait_ready
from tests.s3 import ENV, start_s3_server

ROOT = Path(__file__).resolve().parent.parent
REPLICAS = 3
DEFAULT_POLL_SECONDS = 2.0  # aeserve serve's default, which the replicas run at
SETTLE_SECONDS = 180.0  # bound on a replica moving its versions to the engine process (ONNX export, 2 busy cores)


class Replica:
    def __init__(self, url: str, cache: Path, env: dict[str, str], log: Path, extra: list[str]) -> None:
        self.url, self.cache, self.env, self.log, self.extra = url, cache, env, log, extra
        self.port = free_port()
        self.base = f"http://127.0.0.1:{self.port}"
        self.process: subprocess.Popen | None = None

    def start(self) -> float:
        """Start the process; seconds from its start to /health/ready 200."""
        started = time.perf_counter()
        self.process = subprocess.Popen([sys.executable, "-m", "aeserve", "serve", "--registry", self.url, "--cache", str(self.cache),
                                         "--port", str(self.port), *self.extra],
                                        cwd=ROOT, env=self.env, stdout=subprocess.DEVNULL, stderr=self.log.open("ab"))
        try:
            wait_ready(self.base, self.process, timeout=180)
        except (RuntimeError, TimeoutError):
            self.kill()
            raise RuntimeError(f"replica on port {self.port} did not start; its log: {self.log}") from None
        return time.perf_counter() - started

    def metric(self, name: str) -> float:
        found = re.search(rf"^{name} (\S+)$", httpx.get(f"{self.base}/metrics", timeout=10).text, re.MULTILINE)
        return float(found.group(1)) if found else 0.0

    def version(self, model: str, body: bytes) -> str | None:
        try:
            answer = httpx.post(f"{self.base}/v1/models/{model}/encode", content=body, headers={"Content-Type": "application/json"}, timeout=10)
        except httpx.TransportError:
            return None
        return answer.headers.get("X-Model-Version") if answer.status_code == 200 else None

    def settle(self) -> None:
        """Wait until every loaded version runs its small batches on ONNX Runtime (its export is done), when the
        replica runs that engine: so that one publish's exports do not load the cores during the next one's timing."""
        if any("torch" in a for a in self.extra):
            return
        deadline = time.monotonic() + SETTLE_SECONDS
        while self.metric("aeserve_onnx_engine_versions") < self.metric("aeserve_loaded_versions"):
            if time.monotonic() > deadline:
                print(f"  (replica {self.port}: versions not all on ONNX Runtime after {SETTLE_SECONDS:.0f} s; going on)")
                return
            time.sleep(0.2)

    def stop(self) -> None:
        if self.process is not None and self.process.poll() is None:
            children = self._children()
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(30)
            except subprocess.TimeoutExpired:
                self.kill()
            self._reap(children)

    def kill(self) -> None:
        if self.process is not None and self.process.poll() is None:
            children = self._children()
            self.process.kill()
            self.process.wait(10)
            self._reap(children)

    def _children(self) -> list[int]:
        try:
            return processes(self.process.pid)[1:]
        except OSError:
            return []

    @staticmethod
    def _reap(pids: list[int]) -> None:
        """Kill the server's child processes that outlived it, at once: an ONNX export child stops within half a
        second of its server's exit and removes its /tmp/aeserve-onnx-* folder, but it must not load the cores
        while the next measurement starts."""
        for pid in pids:
            with contextlib.suppress(OSError):
                argv = Path(f"/proc/{pid}/cmdline").read_bytes().decode().split("\0")
                if any(arg.startswith("aeserve.service.runtime") for arg in argv):
                    os.kill(pid, signal.SIGKILL)
                    if argv[2:3] == ["aeserve.service.runtime.export"] and Path(argv[4]).name.startswith("aeserve-onnx-"):
                        shutil.rmtree(argv[4], ignore_errors=True)  # argv: python -m MODULE PARENT_PID OUT FOLDER...


def version_files(fs, key: str) -> dict[str, bytes]:
    """A published version's files by relative path (its claim marker left out)."""
    return {path[len(key) + 1:]: fs.cat_file(path) for path in sorted(fs.find(key)) if not path.endswith("/.claim")}


def republish(registry, model: str, files: dict[str, bytes], scale: float) -> int:
    """Publish version 1's files again as a new version, the model's weights scaled by ``scale`` (a new sha256)."""
    from safetensors.torch import load, save

    weights = files["weights.safetensors"]
    if scale != 1.0:
        weights = save({k: v * scale if k.startswith("model.") else v for k, v in load(weights).items()})
    manifest = {k: v for k, v in json.loads(files["manifest.json"]).items() if k not in ("sha256", "created_at")}
    extras = {k: v for k, v in files.items() if k not in ("manifest.json", "weights.safetensors")}
    return registry.publish(model, manifest, weights, extra_files=extras)


def run_wrk(url: str, body: bytes, seconds: int, connections: int, script_dir: Path) -> float:
    script = script_dir / "encode.lua"
    script.write_text(f'wrk.method = "POST"\nwrk.headers["Content-Type"] = "application/json"\nwrk.body = [==[{body.decode()}]==]\n')
    out = subprocess.run(["wrk", "-t2", f"-c{connections}", f"-d{seconds}s", "-s", str(script), url],
                         capture_output=True, text=True, check=True, timeout=seconds + 60).stdout
    for problem in (r"Non-2xx or 3xx responses: (\d+)", r"Socket errors: .*"):
        if found := re.search(problem, out):
            raise RuntimeError(f"wrk saw errors ({found.group(0)}):\n{out}")
    return float(re.search(r"Requests/sec:\s+([\d.]+)", out).group(1))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--registry", help="a local registry whose --model (latest version) is uploaded; default: train a tiny model")
    parser.add_argument("--model", default="tiny", help="the model's name (default tiny: trained here by `aeserve train`)")
    parser.add_argument("--publishes", type=int, default=5, help="(a): publishes timed")
    parser.add_argument("--starts", type=int, default=3, help="(b): cold and warm starts each")
    parser.add_argument("--seconds", type=int, default=10, help="(c): per wrk run")
    parser.add_argument("--rounds", type=int, default=3, help="(c): turns of direct, 1 replica, 2 replicas")
    parser.add_argument("--connections", type=int, default=16)
    parser.add_argument("--serve-args", default="", help="flags added to every `aeserve serve` (not the defaults then; the output says so)")
    parser.add_argument("--json", help="also write every figure to this file")
    args = parser.parse_args()
    haproxy = shutil.which("haproxy") or "/usr/sbin/haproxy"
    if not os.access(haproxy, os.X_OK) or shutil.which("wrk") is None:
        sys.exit("needs haproxy and wrk (Debian packages)")
    serve_args = args.serve_args.split()
    rng = random.Random(0)
    results: dict[str, str] = {}
    figures: dict[str, object] = {"cpus": os.cpu_count(), "serve_args": serve_args, "poll_seconds": DEFAULT_POLL_SECONDS}

    work = Path(tempfile.mkdtemp(prefix="aeserve-replicas-"))
    s3_port = free_port()
    endpoint = f"http://127.0.0.1:{s3_port}"
    env = {**os.environ, **ENV, "AWS_ENDPOINT_URL": endpoint, "AESERVE_CACHE": str(work / "cli-cache")}
    for key in ("AESERVE_REGISTRY", "AWS_PROFILE", "AWS_SESSION_TOKEN"):
        env.pop(key, None)
    bucket = f"aeserve-bench-{uuid.uuid4().hex[:12]}"
    url = f"s3://{bucket}/registry"
    store = start_s3_server(s3_port)
    replicas: list[Replica] = []
    proxy: subprocess.Popen | None = None

    def replica(name: str, cache: Path | None = None) -> Replica:
        made = Replica(url, cache or work / f"cache-{name}", env, work / f"{name}.log", serve_args)
        replicas.append(made)
        return made

    try:
        from aeserve.models.registry import Registry
        from aeserve.models.remote import ObjectRegistry

        registry = ObjectRegistry(url, work / "publisher-cache", endpoint_url=endpoint, key=ENV["AWS_ACCESS_KEY_ID"],
                                  secret=ENV["AWS_SECRET_ACCESS_KEY"], skip_instance_cache=True)
        registry.fs.mkdir(bucket)
        if args.registry:
            local = Registry(args.registry)
            folder = local.version_dir(args.model, local.resolve(args.model))
            files = {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}
            assert republish(registry, args.model, files, 1.0) == 1
            source = f"{args.model}:{local.resolve(args.model)} from {args.registry}, uploaded"
        else:
            data = work / "rows.npy"
            gen = np.random.default_rng(0)
            np.save(data, (gen.random((300, 4)) @ gen.random((4, 16)) + 0.05 * gen.random((300, 16))).astype(np.float32))
            subprocess.run([sys.executable, "-m", "aeserve", "train", "--data", str(data), "--name", args.model, "--registry", url,
                            "--quiet", "--set", "train.epochs=1"], cwd=work, env=env, check=True, timeout=600, stdout=subprocess.DEVNULL)
            source = f"{args.model} trained by `aeserve train --data` (an MLP on a 300 x 16 array, 1 epoch)"
        files = version_files(registry.fs, registry._key(args.model, 1))
        manifest = json.loads(files["manifest.json"])
        row = np.random.default_rng(1).random(int(np.prod(manifest["input_shape"]))) * 255
        body = json.dumps({"inputs": [[round(float(v), 1) for v in row]]}).encode()
        version_bytes = sum(len(v) for v in files.values())
        figures.update(model=args.model, source=source, version_bytes=version_bytes, weights_bytes=len(files["weights.safetensors"]))
        print(f"model {source}; a version is {version_bytes / 1e6:.2f} MB "
              f"(weights {len(files['weights.safetensors']) / 1e6:.2f} MB); {os.cpu_count()} CPUs")

        # (b) cold and warm starts, one replica at a time, while the registry holds version 1 only.
        cold, warm = [], []
        for i in range(args.starts):
            cache = work / f"cache-start-{i}"
            for kind, into in (("cold", cold), ("warm", warm)):
                one = replica(f"start-{i}-{kind}", cache)
                seconds = one.start()
                into.append((seconds, one.metric("aeserve_registry_fetched_bytes")))
                one.settle()  # its ONNX export done, so that nothing of this start runs during the next one
                one.stop()
                print(f"  (b) {kind} start {i + 1}: {seconds:.2f} s to ready, {into[-1][1] / 1e6:.2f} MB fetched")
        for kind, runs in (("cold (empty cache)", cold), ("warm (same cache, restarted)", warm)):
            results[f"(b) start to ready, {kind}"] = (
                f"{statistics.median(s for s, _ in runs):.2f} s (median of {len(runs)}: {', '.join(f'{s:.2f}' for s, _ in runs)}); "
                f"{statistics.median(b for _, b in runs) / 1e6:.2f} MB fetched")
        figures["start_cold"] = [{"seconds": s, "fetched_bytes": b} for s, b in cold]
        figures["start_warm"] = [{"seconds": s, "fetched_bytes": b} for s, b in warm]

        # (a) publish to converged: 3 replicas at the default poll interval.
        fleet = [replica(f"r{i}") for i in range(REPLICAS)]
        for one in fleet:
            one.start()
        for one in fleet:
            one.settle()
        rounds = []
        for i in range(args.publishes):
            time.sleep(rng.uniform(0, DEFAULT_POLL_SECONDS))
            version = republish(registry, args.model, files, 1 + 1e-6 * (i + 1))
            published = time.perf_counter()
            arrived: dict[int, float] = {}

            def watch(one: Replica, version: int = version, published: float = published, arrived: dict = arrived) -> None:
                deadline = published + 120
                while one.version(args.model, body) != str(version):
                    if time.perf_counter() > deadline:
                        return
                    time.sleep(0.02)
                arrived[one.port] = time.perf_counter() - published

            watchers = [threading.Thread(target=watch, args=(one,)) for one in fleet]
            for watcher in watchers:
                watcher.start()
            for watcher in watchers:
                watcher.join()
            if len(arrived) < len(fleet):
                raise RuntimeError(f"version {version} did not reach every replica within 120 s")
            rounds.append(sorted(arrived.values()))
            print(f"  (a) version {version}: replicas answered it after {', '.join(f'{s:.2f}' for s in rounds[-1])} s")
            for one in fleet:
                one.settle()
        last = [r[-1] for r in rounds]
        results["(a) publish to all 3 replicas serving it, at the default --poll-seconds 2"] = (
            f"median {statistics.median(last):.2f} s, max {max(last):.2f} s over {len(rounds)} publishes "
            f"(all: {', '.join(f'{s:.2f}' for s in last)}); first replica: median {statistics.median(r[0] for r in rounds):.2f} s")
        figures["publish_to_converged"] = rounds

        # (c) requests per second: direct, and through HAProxy with 1 and with 2 replicas; the third replica stops.
        fleet[2].stop()
        one_port, two_port = free_port(), free_port()
        config = work / "haproxy.cfg"
        config.write_text(haproxy_config({"one": (one_port, [fleet[0].port]), "two": (two_port, [fleet[0].port, fleet[1].port])}))
        proxy = subprocess.Popen([haproxy, "-f", str(config), "-db"], stdout=subprocess.DEVNULL, stderr=(work / "haproxy.log").open("ab"))
        targets = {"direct to one replica": fleet[0].base, "HAProxy, 1 replica": f"http://127.0.0.1:{one_port}",
                   "HAProxy, 2 replicas": f"http://127.0.0.1:{two_port}"}
        for base in targets.values():
            deadline = time.monotonic() + 10
            while True:  # HAProxy up, its servers' first checks passed
                try:
                    if httpx.post(f"{base}/v1/models/{args.model}/encode", content=body, headers={"Content-Type": "application/json"}).status_code == 200:
                        break
                except httpx.TransportError:
                    pass
                if time.monotonic() > deadline:
                    raise RuntimeError(f"{base} did not answer; see {work / 'haproxy.log'}")
                time.sleep(0.1)
        time.sleep(1.0)  # rise 2 at 200 ms: both servers of the second backend up
        rates: dict[str, list[float]] = {what: [] for what in targets}
        for _ in range(args.rounds):
            for what, base in targets.items():
                rates[what].append(run_wrk(f"{base}/v1/models/{args.model}/encode", body, args.seconds, args.connections, work))
                print(f"  (c) {what}: {rates[what][-1]:.0f} req/s")
        direct = statistics.median(rates["direct to one replica"])
        for what, values in rates.items():
            median = statistics.median(values)
            results[f"(c) req/s, single-row JSON encode, {args.connections} connections, {what}"] = (
                f"{median:.0f} ({median / direct:.2f} x direct; median of {len(values)} turns of {args.seconds} s: "
                f"{', '.join(f'{v:.0f}' for v in values)})")
        figures["requests_per_second"] = rates
    finally:
        for one in replicas:
            one.kill()
        if proxy is not None:
            proxy.kill()
            proxy.wait(10)
        store.kill()
        store.wait(10)
        shutil.rmtree(work, ignore_errors=True)

    print(f"\nmodel {source}, {REPLICAS} replicas, {os.cpu_count()} CPUs; aeserve serve "
          f"{' '.join(serve_args) or 'at its defaults (poll every 2 s, ONNX engine in its engine process)'}; moto S3 and HAProxy "
          f"on loopback. (c) shares the same cores between the replicas, HAProxy and wrk: it shows the proxy's overhead, "
          f"not scaling.\n")
    print("| measure | result |\n|---|---|")
    for key in sorted(results):
        print(f"| {key} | {results[key]} |")
    if args.json:
        Path(args.json).write_text(json.dumps({**figures, "results": results}, indent=2) + "\n")


if __name__ == "__main__":
    main()
