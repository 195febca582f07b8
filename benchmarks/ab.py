"""Two `aeserve serve` variants side by side: single-row JSON encode under wrk in alternating runs, and memory.

    .venv/bin/python -m benchmarks.ab --registry registry --model fmnist-mlp30 --b=--no-engine-process

On a shared machine a server's rate drifts by tens of percent within minutes, so both servers run at once and wrk
measures them in turns; the result is the median of the pairs' ratios (B / A). Needs `wrk`.
"""
from __future__ import annotations

import argparse
import statistics
import sys

from benchmarks.serve import memory, start, stop, wait_for_engine, wrk_round


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--registry", default="registry")
    parser.add_argument("--model", default="fmnist-mlp30")
    parser.add_argument("--a", default="", help="flags of server A (default: none, the defaults)")
    parser.add_argument("--b", default="", help="flags of server B")
    parser.add_argument("--pairs", type=int, default=8)
    parser.add_argument("--seconds", type=int, default=5, help="per wrk run")
    parser.add_argument("--connections", type=int, default=32)
    args = parser.parse_args()

    from aeserve.models.registry import Registry

    version = Registry(args.registry).load(args.model)
    body = '{"inputs": [[' + ",".join("127.0" for _ in range(version.preprocessing.input_dim)) + "]]}"
    servers = {}
    try:
        for label, flags, port in (("A", args.a, 8771), ("B", args.b, 8772)):
            process, ready = start([sys.executable, "-m", "aeserve", "serve", "--registry", args.registry, "--port", str(port),
                                    *flags.split()], port)
            if "torch" not in flags:
                wait_for_engine(f"http://127.0.0.1:{port}", "--no-engine-process" not in flags)
            servers[label] = (process, port, flags or "(defaults)", ready)
        rounds = {label: [] for label in servers}
        for _ in range(args.pairs):
            for label, (process, port, _, _) in servers.items():
                rounds[label].append(wrk_round(process.pid, f"http://127.0.0.1:{port}/v1/models/{args.model}/encode", body,
                                               args.seconds, args.connections))
        ratios = [b.rate / a.rate for a, b in zip(rounds["A"], rounds["B"], strict=True)]
        print("| server | flags | req/s (median) | server CPU per request (median) | memory after | start to ready |\n|---|---|---|---|---|---|")
        for label, (process, _, flags, ready) in servers.items():
            print(f"| {label} | {flags} | {statistics.median(r.rate for r in rounds[label]):.0f} | "
                  f"{statistics.median(r.cpu_us for r in rounds[label]):.0f} us | {memory(process.pid)} | {ready:.2f} s |")
        print(f"\nB / A, median of {len(ratios)} pairs: {statistics.median(ratios):.3f} (pairs {min(ratios):.2f}-{max(ratios):.2f})")
    finally:
        for process, *_ in servers.values():
            stop(process)


if __name__ == "__main__":
    main()
