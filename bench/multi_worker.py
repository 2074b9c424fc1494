"""Two workers on this machine against one: images per second and all-reduce share.

The same training step as ``bench/train_step.py`` (IRv2 at 75 px, random weights, one
stage from ``block8_1``), at the same global batch, run

- by one process (``finetune.distribution: none``), then
- by two worker processes on 127.0.0.1 (``multi_worker``: ``TF_CONFIG``, the
  project's ``runtime.Workers`` sharding and Keras fixes), each with half the batch.

The all-reduce share is the time of one all-reduce of as many float32 values as the
stage trains (the gradients each step all-reduces), in a graph as in a training step,
measured alone on the same two-worker cluster, over the time of one training step. On a machine with few cores the two
workers share the same cores: the figure shows the overhead of the collectives, not
a speed-up, which needs one machine (or GPU) per worker.

    python bench/multi_worker.py [--steps 10 --batch-size 16]

It prints a short table and, as the last line, one JSON object with the figures.
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

BENCH = Path(__file__).resolve().parent


def worker(args: argparse.Namespace) -> dict:
    """One training process: times ``steps`` steps after a warm-up, and all-reduces."""
    import numpy as np  # noqa: PLC0415 - after TF_CONFIG is set
    import tensorflow as tf  # noqa: PLC0415

    sys.path.insert(0, str(BENCH))
    from train_step import CLASSES, build_trainee  # noqa: PLC0415

    from irv2_pipeline.backbone import load_irv2  # noqa: PLC0415
    from irv2_pipeline.cluster import cluster_role  # noqa: PLC0415
    from irv2_pipeline.pipelines.finetune.runtime import (  # noqa: PLC0415
        Workers,
        distribution_strategy,
        keras_multi_worker_fixes,
    )

    multi = "TF_CONFIG" in os.environ
    strategy = distribution_strategy("multi_worker" if multi else "none", 300)
    workers = Workers(strategy, cluster_role() if multi else None)
    share = args.batch_size // (workers.shard.workers if multi else 1)
    rng = np.random.default_rng(0 if not multi else workers.shard.worker)
    pixels = rng.integers(0, 256, (share, 75, 75, 3)).astype("float32")
    labels = np.eye(CLASSES, dtype="float32")[rng.integers(0, CLASSES, share)]

    def batches(_shard):
        return tf.data.Dataset.from_tensors((pixels, labels)).repeat()

    with strategy.scope(), keras_multi_worker_fixes():
        trainee = build_trainee(load_irv2(None, 75), "block8_1", "frozen", jit=False)
        data = workers.dataset(batches)
        trainee.fit(data, steps_per_epoch=args.warmup_steps, epochs=1, verbose=0)
        started = time.perf_counter()
        trainee.fit(data, steps_per_epoch=args.steps, epochs=1, verbose=0)
        step_s = (time.perf_counter() - started) / args.steps
        allreduce_s = 0.0
        if multi:
            count = sum(int(np.prod(v.shape)) for v in trainee.trainable_variables)
            gradients = tf.ones([count], tf.float32)

            # As a training step all-reduces its gradients: in a graph, in float32.
            @tf.function
            def all_reduce():
                return strategy.run(
                    lambda: tf.distribute.get_replica_context().all_reduce(
                        "SUM", gradients
                    )
                )

            strategy.experimental_local_results(all_reduce())[0].numpy()  # trace
            started = time.perf_counter()
            for _ in range(args.allreduce_repeats):
                strategy.experimental_local_results(all_reduce())[0].numpy()
            allreduce_s = (time.perf_counter() - started) / args.allreduce_repeats
    return {
        "images_per_second": args.batch_size / step_s,
        "seconds_per_step": step_s,
        "allreduce_seconds": allreduce_s,
    }


def free_ports(count: int) -> list[int]:
    sockets = [socket.socket() for _ in range(count)]
    for sock in sockets:
        sock.bind(("127.0.0.1", 0))
    ports = [sock.getsockname()[1] for sock in sockets]
    for sock in sockets:
        sock.close()
    return ports


def launch(argv: list[str], configs: list[str | None]) -> list[dict]:
    """Runs one process per config (side by side); returns each one's figures."""
    processes = []
    for config in configs:
        env = {k: v for k, v in os.environ.items() if k != "TF_CONFIG"}
        env["TF_CPP_MIN_LOG_LEVEL"] = "2"
        if config is not None:
            env["TF_CONFIG"] = config
        processes.append(
            subprocess.Popen(  # noqa: S603 - this interpreter, this script
                [sys.executable, __file__, "--worker", *argv],
                env=env,
                stdout=subprocess.PIPE,
                text=True,
            )
        )
    outputs = [p.communicate(timeout=1800)[0] for p in processes]
    for process, output in zip(processes, outputs, strict=True):
        if process.returncode != 0:
            raise RuntimeError(f"A worker failed ({process.returncode}): {output}")
    return [json.loads(output.strip().splitlines()[-1]) for output in outputs]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--batch-size", type=int, default=16, help="global batch")
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--warmup-steps", type=int, default=2)
    parser.add_argument("--allreduce-repeats", type=int, default=5)
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        sys.stdout.write(json.dumps(worker(args)) + "\n")
        return
    argv = [
        f"--batch-size={args.batch_size}",
        f"--steps={args.steps}",
        f"--warmup-steps={args.warmup_steps}",
        f"--allreduce-repeats={args.allreduce_repeats}",
    ]
    (one,) = launch(argv, [None])
    ports = free_ports(2)
    cluster = {"worker": [f"127.0.0.1:{port}" for port in ports]}
    two = launch(
        argv,
        [
            json.dumps({"cluster": cluster, "task": {"type": "worker", "index": i}})
            for i in (0, 1)
        ],
    )
    chief = two[0]
    share = chief["allreduce_seconds"] / chief["seconds_per_step"]
    rows = [
        ("1 worker", one["images_per_second"], one["seconds_per_step"], 0.0),
        ("2 workers", chief["images_per_second"], chief["seconds_per_step"], share),
    ]
    print(f"command: python bench/multi_worker.py {' '.join(argv)}")
    print(f"{'':<10} {'img/s':>8} {'s/step':>8} {'all-reduce share':>17}")
    for name, rate, step, part in rows:
        print(f"{name:<10} {rate:>8.2f} {step:>8.3f} {part:>17.1%}")
    print(
        json.dumps(
            {
                "global_batch": args.batch_size,
                "steps": args.steps,
                "one_worker_images_per_second": round(one["images_per_second"], 2),
                "two_workers_images_per_second": round(chief["images_per_second"], 2),
                "two_over_one": round(
                    chief["images_per_second"] / one["images_per_second"], 3
                ),
                "allreduce_seconds": round(chief["allreduce_seconds"], 4),
                "allreduce_share_of_step": round(share, 3),
                "cores": os.cpu_count(),
                "load_average": round(os.getloadavg()[0], 1),
            }
        )
    )


if __name__ == "__main__":
    main()
