"""``cpu-kernels``: what the bundles' ``val_batch_size``, ``sw_batch_size`` and ``channels_last`` buy on the CPU.

Two measurements per network of the bundles, at the quick preset's sizes, on one thread, interleaved:

* **inference per case/window** with no gradient at batch 1 and at batch ``--batch`` (seconds per
  sample). For a single sample PyTorch's CPU convolution uses oneDNN only when N*C*D*H > 20480
  (``use_mkldnn`` in ATen's Convolution.cpp); below that it runs ``slow_conv3d``, its native im2col
  kernel. The profiler's count of ``aten::slow_conv3d_forward`` calls per forward is recorded to show
  which path ran.
* **a training step** (forward, a Dice-like loss, backward, Adam) at the training batch, with the
  network's weights contiguous or channels-last (``brats_kd.device.channels_last``).

Sizes are the quick preset's (``tools.presets``); ``--spatial-size`` changes the input (at 128³ the
first level passes the 20480 bound and batch 1 runs oneDNN too).
"""

from __future__ import annotations

from collections.abc import Callable

from tools.bench.common import _bundle_parser, _median, _positive, _write, environment, interleaved_times


def quick_networks() -> dict[str, Callable]:
    """Constructors of the bundles' own networks (their configs' ``network_def``) at the quick preset's widths."""
    from tools.presets import PRESETS

    quick = PRESETS["quick"]
    kdnet = {"filters": quick.bundle["filters"]}
    members = {m: ["train.json", f"member_{m}.json"] for m in ("unet", "resunet", "cascade")}
    builders = {"kdnet_encoder_decoder": lambda: _bundle_parser(["inference.json"], kdnet, "teacher")}
    builders.update({
        f"ensemble_{m}": (lambda configs=configs: _bundle_parser(configs, dict(quick.patch_bundle), "ensemble"))
        for m, configs in members.items()
    })
    return {name: (lambda parser=parser: parser().get_parsed_content("network_def")) for name, parser in builders.items()}


def _first_output(output):
    return output[0] if isinstance(output, (tuple, list)) else output


def slow_conv_calls(network, sample) -> int:
    """How many convolutions of one no-grad forward ran PyTorch's native ``slow_conv3d`` instead of oneDNN."""
    import torch
    from torch.profiler import profile

    with torch.no_grad(), profile() as prof:
        network(sample)
    return sum(event.count for event in prof.key_averages() if event.key == "aten::slow_conv3d_forward")


def cpu_kernels(json: str | None = None, spatial_size: int = 32, batch: int = 2, train_batch: int = 2,
                steps: int = 10, warmup: int = 2, threads: int = 1) -> dict:
    """Seconds per sample of no-grad inference at batch 1 and ``batch``, and of a training step with
    contiguous and channels-last weights, for each network of :func:`quick_networks`."""
    import torch

    from brats_kd.device import channels_last

    spatial_size, batch, train_batch, steps, warmup = (_positive(n, v) for n, v in (
        ("spatial_size", spatial_size), ("batch", batch), ("train_batch", train_batch), ("steps", steps),
        ("warmup", warmup)))
    torch.set_num_threads(_positive("threads", threads))
    shape = (4, spatial_size, spatial_size, spatial_size)
    results = {}
    for name, build in quick_networks().items():
        torch.manual_seed(0)
        net = build().eval()
        single, batched = torch.randn(1, *shape), torch.randn(batch, *shape)

        def infer(x, network=net):
            with torch.no_grad():
                network(x)

        infer_times = interleaved_times({"batch1": lambda x=single: infer(x), f"batch{batch}": lambda x=batched: infer(x)},
                                        steps, warmup=warmup, block=2, device="cpu")
        trainers = {}
        for layout in ("contiguous", "channels_last"):
            torch.manual_seed(0)
            model = channels_last(build(), layout == "channels_last").train()
            optimizer = torch.optim.Adam(model.parameters(), 1e-3)
            x, y = torch.randn(train_batch, *shape), (torch.rand(train_batch, 3, *shape[1:]) > 0.5).float()

            def step(model=model, optimizer=optimizer, x=x, y=y):
                optimizer.zero_grad()
                p = torch.sigmoid(_first_output(model(x)))
                (1 - 2 * (p * y).sum() / (p.sum() + y.sum())).backward()
                optimizer.step()

            trainers[layout] = step
        train_times = interleaved_times(trainers, steps, warmup=warmup, block=2, device="cpu")
        per_sample_1 = _median(infer_times["batch1"])
        per_sample_b = _median(infer_times[f"batch{batch}"]) / batch
        contiguous, last = _median(train_times["contiguous"]), _median(train_times["channels_last"])
        results[name] = {
            "infer_s_per_sample_batch1": round(per_sample_1, 4),
            f"infer_s_per_sample_batch{batch}": round(per_sample_b, 4),
            "infer_batch1_over_batched": round(per_sample_1 / per_sample_b, 2),
            "slow_conv3d_calls_batch1": slow_conv_calls(net, single),
            f"slow_conv3d_calls_batch{batch}": slow_conv_calls(net, batched),
            "train_step_s_contiguous": round(contiguous, 4),
            "train_step_s_channels_last": round(last, 4),
            "train_contiguous_over_channels_last": round(contiguous / last, 2),
        }
    result = {"benchmark": "cpu-kernels", "spatial_size": spatial_size, "batch": batch, "train_batch": train_batch,
              "steps": steps, **environment("cpu"), "networks": results}
    return _write(json, result)
