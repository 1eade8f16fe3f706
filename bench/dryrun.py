"""Benchmark: ``dry-run`` over 10,000 pod documents vs. PyYAML's C loader alone.

Target (issue 2): dry-run at most 1.6x the time the C loader takes just to parse
the same file.  Prints both times and the ratio; asserts nothing (tests never
assert on wall-clock time).  Run: ``.venv/bin/python bench/dryrun.py [N]``.
"""

from __future__ import annotations

import io
import statistics
import sys
import tempfile
import time
from pathlib import Path

import yaml

from webhook import dryrun

IMAGES = [
    "602401143452.dkr.ecr.ap-southeast-4.amazonaws.com/amazon-k8s-cni:v1.19.4",
    "602401143452.dkr.ecr.us-west-2.amazonaws.com/amazon-k8s-cni-init:v1.23.1",
    "602401143452.dkr.ecr.ap-southeast-4.amazonaws.com/amazon/aws-network-policy-agent:v1.2.0",
    "nginx:1.27",
    "111122223333.dkr.ecr.ap-southeast-4.amazonaws.com/team/app:v7",
]


def make_stream(n: int) -> str:
    docs = []
    for i in range(n):
        docs.append(
            {
                "apiVersion": "v1",
                "kind": "Pod",
                "metadata": {
                    "name": f"pod-{i}",
                    "namespace": "kube-system",
                    "labels": {"app": "aws-node", "i": str(i)},
                },
                "spec": {
                    "containers": [
                        {
                            "name": f"c{j}",
                            "image": IMAGES[(i + j) % len(IMAGES)],
                            "ports": [{"containerPort": 8080 + j}],
                        }
                        for j in range(3)
                    ]
                },
            }
        )
    return yaml.dump_all(docs, Dumper=yaml.CSafeDumper, sort_keys=False)


def best(fn: object, repeat: int = 5) -> float:
    times = []
    for _ in range(repeat):
        t0 = time.perf_counter()
        fn()  # type: ignore[operator]
        times.append(time.perf_counter() - t0)
    return min(times)


def main() -> None:
    n = int(sys.argv[1]) if len(sys.argv) > 1 else 10_000
    text = make_stream(n)
    with tempfile.TemporaryDirectory() as d:
        path = Path(d) / "pods.yaml"
        path.write_text(text)

        def parse_only() -> None:
            list(yaml.load_all(path.read_text(), Loader=yaml.CSafeLoader))

        def dry_run() -> None:
            out, err = io.StringIO(), io.StringIO()
            rc = dryrun.run([str(path)], "ap-southeast-4", None, "json", {}, out, err)
            assert rc == 0

        parse_s = best(parse_only)
        dry_s = best(dry_run)
    print(f"documents:            {n}")
    print(f"C loader parse only:  {parse_s:.3f} s")
    print(f"dry-run --output json: {dry_s:.3f} s")
    print(f"ratio:                {dry_s / parse_s:.2f}x (target <= 1.6x)")
    _ = statistics  # keep import for future percentile output


if __name__ == "__main__":
    main()
