"""``python -m tools.bench <kd-overhead|loader|inference|train-throughput> ...``: see :mod:`tools.bench`."""

import json

import fire

from tools.bench.inference import inference
from tools.bench.kd_overhead import kd_overhead
from tools.bench.loader import loader
from tools.bench.train_throughput import train_throughput


def main() -> None:
    fire.Fire(
        {"kd-overhead": kd_overhead, "loader": loader, "inference": inference, "train-throughput": train_throughput},
        name="python -m tools.bench",
        serialize=lambda result: json.dumps(result, indent=2),
    )


if __name__ == "__main__":
    main()
