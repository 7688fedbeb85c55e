"""BottleneckHook, FrozenTeacher and KDTrainer (brats_kd) on a tiny encoder--decoder."""

import copy

import pytest
import torch
from ignite.engine import Events
from monai.engines import SupervisedTrainer
from monai.losses import DiceCELoss
from torch import nn
from torch.utils.data import DataLoader

import brats_kd.bottleneck as bottleneck
import brats_kd.losses as losses
import brats_kd.teacher as teacher_mod
import brats_kd.trainer as trainer_mod

SIZE = 8


class TinyEncDec(nn.Module):
    """A two-level 3-D encoder--decoder with one skip connection and a submodule named ``bottleneck``."""

    def __init__(self, in_channels: int, out_channels: int = 3, features: int = 4) -> None:
        super().__init__()
        # BatchNorm makes train-mode forwards detectable: they change the output and the running buffers
        self.encoder = nn.Sequential(
            nn.Conv3d(in_channels, features, 3, padding=1), nn.BatchNorm3d(features), nn.ReLU()
        )
        self.down = nn.MaxPool3d(2)
        self.bottleneck = nn.Sequential(nn.Conv3d(features, 2 * features, 3, padding=1), nn.ReLU())
        self.up = nn.Upsample(scale_factor=2)
        self.decoder = nn.Conv3d(3 * features, out_channels, 1)

    def forward(self, x):
        skip = self.encoder(x)
        return self.decoder(torch.cat([self.up(self.bottleneck(self.down(skip))), skip], dim=1))


class Wrapper(nn.Module):
    """Stands in for DistributedDataParallel: the real model is ``.module``."""

    def __init__(self, module):
        super().__init__()
        self.module = module

    def forward(self, x):
        return self.module(x)


class MaliciousPayload:
    """Unpickling this runs ``exec``, which creates ``marker``."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return exec, (f"open({self.marker!r}, 'w').close()",)


def _loader(n=4, seed=0, extra=None):
    gen = torch.Generator().manual_seed(seed)
    items = []
    for i in range(n):
        four = torch.randn(4, SIZE, SIZE, SIZE, generator=gen)
        label = (torch.rand(3, SIZE, SIZE, SIZE, generator=gen) > 0.7).float()
        item = {"image": four[1:2].clone(), "teacher_image": four, "label": label}
        item.update(extra(i, item) if extra else {})
        items.append(item)
    return DataLoader(items, batch_size=2, shuffle=False)


@pytest.fixture
def teacher_ckpt(tmp_path):
    """A 4-modality teacher saved as {"model": state_dict}, with non-trivial BatchNorm running statistics."""
    torch.manual_seed(1)
    net = TinyEncDec(4)
    bn = net.encoder[1]
    bn.running_mean.uniform_(-0.5, 0.5)
    bn.running_var.uniform_(0.5, 2.0)
    path = tmp_path / "teacher.pt"
    torch.save({"model": net.state_dict()}, path)
    return path


def _objective(lambda_kd=0.75, alpha_kl=10.0):
    return losses.KDNetObjective(
        DiceCELoss(sigmoid=True), losses.KDLoss(5.0), losses.BottleneckKLLoss(), lambda_kd=lambda_kd, alpha_kl=alpha_kl
    )


def _kd_trainer(student, loader, objective, handlers=(), epochs=1):
    return trainer_mod.KDTrainer(
        device=torch.device("cpu"),
        max_epochs=epochs,
        train_data_loader=loader,
        network=student,
        # plain SGD: Adam's first step is ~lr * sign(grad), which turns float noise in a near-zero gradient into
        # a visible difference between runs that should agree (e.g. the conv bias in front of BatchNorm)
        optimizer=torch.optim.SGD(student.parameters(), lr=0.1),
        loss_function=objective,
        train_handlers=list(handlers),
    )


def _params(net):
    return {k: v.detach().clone() for k, v in net.state_dict().items()}


# ---- BottleneckHook ----
def test_bottleneck_hook_captures_named_submodule():
    torch.manual_seed(0)
    net = TinyEncDec(1).eval()
    x = torch.randn(2, 1, SIZE, SIZE, SIZE)
    expected = net.bottleneck(net.down(net.encoder(x)))
    hook = bottleneck.BottleneckHook(net)
    with pytest.raises(RuntimeError, match="run the network forward"):
        _ = hook.output
    net(x)
    torch.testing.assert_close(hook.output, expected)
    hook.clear()
    with pytest.raises(RuntimeError, match="no bottleneck output"):
        _ = hook.output
    hook.remove()
    assert not net.bottleneck._forward_hooks
    with pytest.raises(RuntimeError, match="removed"):
        _ = hook.output


def test_bottleneck_hook_resolves_wrappers_and_dotted_names():
    net = TinyEncDec(1)
    for wrapped in (Wrapper(net), Wrapper(Wrapper(net)), nn.DataParallel(net)):
        assert bottleneck.BottleneckHook(wrapped, "bottleneck").module is net.bottleneck
    assert bottleneck.BottleneckHook(Wrapper(net), "module.bottleneck").module is net.bottleneck
    assert bottleneck.BottleneckHook(Wrapper(net), "bottleneck.0").module is net.bottleneck[0]
    with pytest.raises(AttributeError, match=r"'latent'.*\['encoder', 'down', 'bottleneck', 'up', 'decoder'\]"):
        bottleneck.BottleneckHook(Wrapper(net), "latent")


# ---- FrozenTeacher: checkpoint checks before the first iteration ----
def _run_expecting(error, match, teacher_net, ckpt):
    student = TinyEncDec(1)
    before = _params(student)
    trainer = _kd_trainer(student, _loader(), _objective(), [teacher_mod.FrozenTeacher(teacher_net, ckpt)])
    with pytest.raises(error, match=match):
        trainer.run()
    assert trainer.state.iteration == 0
    assert all(torch.equal(v, student.state_dict()[k]) for k, v in before.items())


def test_missing_checkpoint_fails_before_any_iteration(tmp_path):
    missing = tmp_path / "models" / "model.pt"
    _run_expecting(FileNotFoundError, r"(?s)models/model\.pt.*teacher_ckpt.*teacher bundle", TinyEncDec(4), missing)


def test_wrong_input_channels_are_explained(teacher_ckpt):
    match = "teacher checkpoint expects 4 input channels but the configured teacher network has 1"
    _run_expecting(RuntimeError, match, TinyEncDec(1), teacher_ckpt)


def test_malicious_pickle_is_refused_without_running_it(tmp_path):
    marker = tmp_path / "pwned"
    evil = tmp_path / "evil.pt"
    torch.save(MaliciousPayload(marker), evil)
    # the payload is real: a full unpickle runs it
    torch.load(evil, weights_only=False)
    assert marker.exists()
    marker.unlink()
    _run_expecting(ValueError, "Refusing to load teacher checkpoint", TinyEncDec(4), evil)
    assert not marker.exists()


def test_checkpoint_formats_and_key_mismatches(teacher_ckpt, tmp_path):
    state = torch.load(teacher_ckpt, weights_only=True)["model"]
    bare = tmp_path / "bare.pt"
    torch.save(state, bare)
    net = TinyEncDec(4)
    teacher_mod.load_teacher_weights(Wrapper(net), bare)  # bare state dict, loaded through a wrapper
    assert all(torch.equal(net.state_dict()[k], v) for k, v in state.items())

    partial = tmp_path / "partial.pt"
    no_decoder = {k: v for k, v in state.items() if not k.startswith("decoder")}
    torch.save({"model": {**no_decoder, "extra.w": torch.zeros(1)}}, partial)
    with pytest.raises(RuntimeError, match=r"(?s)missing from the checkpoint.*decoder\.weight.*unexpected.*extra\.w"):
        teacher_mod.load_teacher_weights(TinyEncDec(4), partial)

    wider = tmp_path / "wider.pt"
    torch.save({"model": TinyEncDec(4, features=8).state_dict()}, wider)
    shapes = r"shape mismatch.*encoder\.0\.weight: \(8, 4, 3, 3, 3\) vs \(4, 4, 3, 3, 3\)"
    with pytest.raises(RuntimeError, match=shapes):
        teacher_mod.load_teacher_weights(TinyEncDec(4), wider)

    not_a_state_dict = tmp_path / "list.pt"
    torch.save([torch.zeros(1)], not_a_state_dict)
    with pytest.raises(ValueError, match="not a state dict"):
        teacher_mod.load_teacher_weights(TinyEncDec(4), not_a_state_dict)


def test_teacher_rejects_bad_configuration():
    with pytest.raises(AttributeError, match="no submodule named 'latent'"):
        teacher_mod.FrozenTeacher(TinyEncDec(4), "teacher.pt", bottleneck="latent")
    with pytest.raises(RuntimeError, match="before load"):
        teacher_mod.FrozenTeacher(TinyEncDec(4), "teacher.pt").infer(torch.zeros(1, 4, SIZE, SIZE, SIZE))
    with pytest.raises(TypeError, match="KDNetObjective"):
        _kd_trainer(TinyEncDec(1), _loader(), DiceCELoss(sigmoid=True))


# ---- KDTrainer with the online teacher ----
def test_cpu_bf16_teacher_returns_float32_targets_close_to_the_float32_teacher(teacher_ckpt, tmp_path):
    torch.manual_seed(2)
    image = torch.randn(2, 4, SIZE, SIZE, SIZE)
    exact = teacher_mod.FrozenTeacher(TinyEncDec(4), teacher_ckpt)
    fast = teacher_mod.FrozenTeacher(TinyEncDec(4), teacher_ckpt, cpu_bf16=True)
    exact.load("cpu")
    fast.load("cpu")
    logits, bottleneck_out = fast.infer(image)
    ref_logits, ref_bottleneck = exact.infer(image)
    # the losses get float32 targets, and the weights stay float32 (autocast, not a cast of the network)
    assert logits.dtype == bottleneck_out.dtype == torch.float32
    assert all(p.dtype == torch.float32 for p in fast.network.parameters())
    # computed in bfloat16 (8-bit mantissa): close to, but not bit-identical with, the float32 teacher. The
    # outputs are small (|logit| < 1), so the tolerance is relative to their range: bf16 is within 0.6 % of it
    # here; 1.5 % still tells a teacher with one weight 5 % off (2-4 % of the range; atol = rtol = 0.05 passed it).
    assert not torch.equal(logits, ref_logits)

    def assert_bf16_close(actual, expected):
        torch.testing.assert_close(actual, expected, rtol=0, atol=0.015 * float(expected.abs().max()))

    assert_bf16_close(logits, ref_logits)
    assert_bf16_close(bottleneck_out, ref_bottleneck)
    state = torch.load(teacher_ckpt, weights_only=True)["model"]
    state["decoder.weight"] = state["decoder.weight"] * 1.05
    torch.save({"model": state}, tmp_path / "off.pt")
    off = teacher_mod.FrozenTeacher(TinyEncDec(4), tmp_path / "off.pt")
    off.load("cpu")
    with pytest.raises(AssertionError):
        assert_bf16_close(off.infer(image)[0], ref_logits)


def test_kd_training_keeps_teacher_frozen_and_trains_student(teacher_ckpt):
    torch.manual_seed(2)
    teacher_net, student = TinyEncDec(4), TinyEncDec(1)
    student_before = _params(student)
    teacher_modes = []
    teacher_net.register_forward_pre_hook(lambda module, args: teacher_modes.append(module.training))
    trainer = _kd_trainer(
        student, _loader(), _objective(), [teacher_mod.FrozenTeacher(teacher_net, teacher_ckpt)], epochs=2
    )
    logged = []

    @trainer.on(Events.ITERATION_COMPLETED)
    def log_terms(engine):
        logged.append(trainer_mod.loss_terms(engine.state.output))

    # something flips the teacher to train mode mid-run: its next forward must still be in eval mode
    trainer.add_event_handler(Events.ITERATION_COMPLETED(once=1), lambda e: teacher_net.train())
    trainer.run()

    assert teacher_modes == [False] * 4
    assert not any(m.training for m in teacher_net.modules())
    checkpoint = torch.load(teacher_ckpt, weights_only=True)["model"]
    assert teacher_net.state_dict().keys() == checkpoint.keys()
    assert all(torch.equal(v, checkpoint[k]) for k, v in teacher_net.state_dict().items())
    assert all(p.grad is None and not p.requires_grad for p in teacher_net.parameters())
    # parameters, not buffers: BatchNorm's running statistics would change even without an optimizer step
    assert any(not torch.equal(p, student_before[name]) for name, p in student.named_parameters())

    assert len(logged) == 4
    for terms in logged:
        assert set(terms) == {"loss", "loss_gt", "loss_kd", "loss_kl"}
        assert terms["loss_gt"] > 0 and terms["loss_kd"] > 0 and terms["loss_kl"] > 0
        expected = 0.75 * terms["loss_kd"] + 0.25 * terms["loss_gt"] + 10.0 * terms["loss_kl"]
        assert terms["loss"] == pytest.approx(expected, rel=1e-5)


def test_cached_teacher_outputs_give_the_same_step_as_the_online_teacher(teacher_ckpt):
    torch.manual_seed(3)
    teacher = teacher_mod.FrozenTeacher(TinyEncDec(4), teacher_ckpt)
    teacher.load()

    def cache(_, item):
        logits, latent = teacher.infer(item["teacher_image"][None])
        # no_grad, not inference_mode: the targets must be ordinary tensors that autograd may save
        assert not logits.is_inference() and not latent.is_inference() and not logits.requires_grad
        return {"teacher_logits": logits[0], "teacher_bottleneck": latent[0]}

    student = TinyEncDec(1)
    runs = {}
    for mode, loader, handlers in (
        ("online", _loader(), [teacher]),
        ("cached", _loader(extra=cache), []),
    ):
        net = copy.deepcopy(student)
        trainer = _kd_trainer(net, loader, _objective(), handlers)
        trainer.add_event_handler(Events.ITERATION_COMPLETED(once=1), lambda e: e.terminate())
        trainer.run()
        runs[mode] = (trainer_mod.loss_terms(trainer.state.output), _params(net))
    for key, value in runs["online"][0].items():
        assert runs["cached"][0][key] == pytest.approx(value, rel=1e-5), key
    for key, value in runs["online"][1].items():
        torch.testing.assert_close(runs["cached"][1][key], value, rtol=1e-4, atol=1e-6)


def test_kd_trainer_without_teacher_outputs_says_how_to_get_them():
    trainer = _kd_trainer(TinyEncDec(1), _loader(), _objective(alpha_kl=0.0))
    with pytest.raises(KeyError, match="(?s)teacher_logits.*FrozenTeacher"):
        trainer.run()


class SkipsBottleneckAfterFirstCall(TinyEncDec):
    """A student whose forward stops using its bottleneck after the first call."""

    calls = 0

    def forward(self, x):
        self.calls += 1
        if self.calls == 1:
            return super().forward(x)
        return self.decoder(torch.cat([self.encoder(x)] * 3, dim=1))


def test_kd_trainer_never_reuses_a_stale_student_bottleneck(teacher_ckpt):
    student = SkipsBottleneckAfterFirstCall(1)
    trainer = _kd_trainer(student, _loader(), _objective(), [teacher_mod.FrozenTeacher(TinyEncDec(4), teacher_ckpt)])
    with pytest.raises(RuntimeError, match="no bottleneck output captured"):
        trainer.run()
    assert trainer.state.iteration == 2


# ---- KDTrainer as the GT-only baseline ----
def test_gt_only_kd_trainer_matches_supervised_trainer():
    torch.manual_seed(4)
    student = TinyEncDec(1)
    reference = copy.deepcopy(student)
    kd = _kd_trainer(student, _loader(), _objective(lambda_kd=0.0, alpha_kl=0.0))
    sup = SupervisedTrainer(
        device=torch.device("cpu"),
        max_epochs=1,
        train_data_loader=_loader(),
        network=reference,
        optimizer=torch.optim.SGD(reference.parameters(), lr=0.1),
        loss_function=DiceCELoss(sigmoid=True),
    )
    assert kd.student_hook is None and not student.bottleneck._forward_hooks  # alpha = 0: no hook
    outputs = {}
    for name, engine in (("kd", kd), ("sup", sup)):
        outputs[name] = []
        engine.add_event_handler(Events.ITERATION_COMPLETED, lambda e, o=outputs[name]: o.append(e.state.output[0]))
        engine.run()
    assert len(outputs["kd"]) == len(outputs["sup"]) == 2
    for kd_out, sup_out in zip(outputs["kd"], outputs["sup"]):
        assert {"image", "label", "pred", "loss", "loss_gt", "loss_kd", "loss_kl"} <= set(kd_out)
        assert float(kd_out["loss"]) == float(sup_out["loss"])
        assert float(kd_out["loss_gt"]) == float(sup_out["loss"])
        assert float(kd_out["loss_kd"]) == 0.0 and float(kd_out["loss_kl"]) == 0.0
    for key, value in reference.state_dict().items():
        assert torch.equal(student.state_dict()[key], value), key
