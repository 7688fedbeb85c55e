"""Performance benchmarks of the KD student: training-step overhead, data-loader throughput, inference.

    python -m tools.bench kd-overhead --json OUT.json [--device cpu|cuda] [--spatial-size 64] [--batch-size 2] [--steps 10]
    python -m tools.bench loader --json OUT.json [--teacher-mode online|cached|both]
    python -m tools.bench inference --json OUT.json [--size 240]
    python -m tools.bench train-throughput --json OUT.json [--device cpu|cuda] [--spatial-size 64] [--batch-size 2] [--steps 10]
    python -m tools.bench cpu-kernels --json OUT.json [--spatial-size 32] [--batch 2] [--steps 10]

One module per benchmark (:mod:`tools.bench.kd_overhead`, :mod:`tools.bench.loader`,
:mod:`tools.bench.inference`, :mod:`tools.bench.train_throughput`, :mod:`tools.bench.cpu_kernels`), shared helpers
in :mod:`tools.bench.common`.

Every figure of one command comes from one process run: variants are interleaved (round-robin
blocks, rotating order) so that drifting machine load hits them alike, and medians are reported.
Results go to ``--json`` with the machine, thread count, load average and versions. Timings are
only meaningful on an otherwise idle machine: check the reported ``loadavg``.

The training step is the bundles' own code: ``SupervisedTrainer._iteration`` for the baseline,
``KDTrainer._iteration`` with the ``FrozenTeacher`` handler (online) or with targets already in
the batch (cached) for the student, on batches shaped as the data loader delivers them.
"""
