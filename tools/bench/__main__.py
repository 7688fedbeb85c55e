"""``python -m tools.bench <command> ...``: the commands and what they measure are in :mod:`tools.bench`."""

import json

import fire

from tools.bench.cpu_kernels import cpu_kernels
from tools.bench.gpu_check import bundles_epoch, paper_fold
from tools.bench.inference import inference
from tools.bench.kd_overhead import kd_overhead
from tools.bench.loader import loader
from tools.bench.train_throughput import train_throughput


def main() -> None:
    fire.Fire(
        {"kd-overhead": kd_overhead, "loader": loader, "inference": inference, "train-throughput": train_throughput,
         "bundles-epoch": bundles_epoch, "paper-fold": paper_fold,
         "cpu-kernels": cpu_kernels},
        name="python -m tools.bench",
        serialize=lambda result: json.dumps(result, indent=2),
    )


if __name__ == "__main__":
    main()
