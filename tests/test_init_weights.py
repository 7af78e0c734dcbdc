"""Starting weights: build_model(pretrained=PATH) and init_model_from load a whole backbone or refuse.

The bug this guards against: an ichscan checkpoint's .safetensors handed to timm as "pretrained" weights
loaded nothing (every key carries ``backbone.``), with only a warning, and training began from random weights.
"""

from __future__ import annotations

import pytest
import torch
from safetensors.torch import load_file, save_file

from ichscan.errors import CheckpointError, NoBundledModelError
from ichscan.labels import LABELS
from ichscan.model import (
    BUNDLED,
    BUNDLED_DIR_ENV,
    WeightsReport,
    build_model,
    classifier_keys,
    init_model_from,
    load_checkpoint,
    load_weights_into,
    resolve_init_checkpoint,
    save_checkpoint,
    write_ensemble,
)

torch.set_num_threads(1)
META = {"windows": [{"name": "brain", "level": 40, "width": 80}, {"name": "blood", "level": 80, "width": 200},
                    {"name": "soft_tissue", "level": 40, "width": 380}], "image_size": 32}
ARCH = "resnet10t"


def trained(seed: int, arch: str = ARCH, labels=LABELS, mean=None, std=None):
    """A model whose every tensor (BN statistics too) differs from what build_model's init gives."""
    torch.manual_seed(seed)
    model = build_model(arch, labels=labels)
    gen = torch.Generator().manual_seed(1000 + seed)
    with torch.no_grad():
        for name, t in model.backbone.state_dict().items():
            if t.is_floating_point():
                t.add_(0.1 * torch.randn(t.shape, generator=gen))
                if "running_var" in name:
                    t.abs_()
        if mean is not None:
            model.mean.copy_(torch.tensor(mean).view_as(model.mean))
            model.std.copy_(torch.tensor(std).view_as(model.std))
    return model.eval()


def saved(tmp_path, name: str, seed: int = 1, **kw):
    """(checkpoint JSON, its weights as saved)."""
    path = save_checkpoint(tmp_path / name, trained(seed, **kw), META)
    return path, load_file(str(path.with_suffix(".safetensors")))


def outputs(model, seed: int = 5):
    torch.manual_seed(seed)
    x = torch.rand(2, 3, 32, 32)
    with torch.no_grad():
        return model.eval()(x)


def test_checkpoint_as_pretrained_loads_every_tensor(tmp_path):
    path, state = saved(tmp_path, "best", mean=(0.3, 0.4, 0.5), std=(0.2, 0.25, 0.3))
    for given in (path.with_suffix(".safetensors"), path, tmp_path / "best"):
        model = build_model(ARCH, pretrained=given)
        got = model.backbone.state_dict()
        assert set(got) == {k.removeprefix("backbone.") for k in state}
        for key, value in state.items():
            assert torch.equal(got[key.removeprefix("backbone.")], value), key
        assert torch.equal(model.backbone.fc.weight, state["backbone.fc.weight"])  # classifier too
        assert model.mean.flatten().tolist() == pytest.approx([0.3, 0.4, 0.5])
        assert model.std.flatten().tolist() == pytest.approx([0.2, 0.25, 0.3])
    report = load_weights_into(build_model(ARCH), path.with_suffix(".safetensors"))
    n_tensors = sum(1 for k in state if not k.startswith("backbone.fc.") and not k.endswith("num_batches_tracked"))
    assert isinstance(report, WeightsReport)
    assert (report.kind, report.loaded, report.total, report.classifier) == ("ichscan", n_tensors, n_tensors, "loaded")
    assert report.arch == ARCH and report.labels == LABELS and report.extra_state == {}
    line = report.line()
    assert "\n" not in line and f"{n_tensors}/{n_tensors}" in line and "best.safetensors" in line
    assert "and its classifier" in line and "any..subdural" in line


def test_the_old_bug_is_gone_weights_are_not_random(tmp_path):
    path, state = saved(tmp_path, "best", seed=2)
    torch.manual_seed(0)
    fresh = build_model(ARCH)
    torch.manual_seed(0)
    loaded = build_model(ARCH, pretrained=path.with_suffix(".safetensors"))
    conv1 = loaded.backbone.conv1[0].weight
    assert torch.equal(conv1, state["backbone.conv1.0.weight"])
    assert not torch.equal(conv1, fresh.backbone.conv1[0].weight)
    assert torch.equal(outputs(loaded), outputs(load_checkpoint(path)[0]))


def test_classifier_names_come_from_timm():
    assert classifier_keys(build_model(ARCH).backbone) == ("fc.weight", "fc.bias")
    assert classifier_keys(build_model("test_convnext").backbone) == ("head.fc.weight", "head.fc.bias")


def test_checkpoint_of_another_arch_is_refused_in_one_line(tmp_path):
    path, state = saved(tmp_path, "r18", arch="resnet18")
    with pytest.raises(CheckpointError) as err:
        build_model(ARCH, pretrained=path.with_suffix(".safetensors"))
    message = str(err.value)
    assert "\n" not in message and "r18.json" in message and "resnet18" in message and ARCH in message
    # The same weights without their JSON: told apart by the tensors themselves.
    bare = tmp_path / "bare" / "r18.safetensors"
    bare.parent.mkdir()
    save_file(state, bare)
    with pytest.raises(CheckpointError) as err:
        build_model(ARCH, pretrained=bare)
    message = str(err.value)
    assert "\n" not in message and str(bare) in message and "another architecture" in message
    assert "shape differs: " in message and "only " in message


def test_timm_state_dicts_load_with_a_new_classifier(tmp_path):
    import timm

    torch.manual_seed(9)
    imagenet = timm.create_model(ARCH, num_classes=1000)
    state = imagenet.state_dict()
    torch.save(state, tmp_path / "w.pth")
    save_file(state, tmp_path / "w.safetensors")
    torch.save({"state_dict": {f"module.{k}": v for k, v in state.items()}, "epoch": 3}, tmp_path / "ddp.pth.tar")
    torch.save({"model": state}, tmp_path / "w.bin")
    n_tensors = sum(1 for k in state if not k.startswith("fc.") and not k.endswith("num_batches_tracked"))
    for name in ("w.pth", "w.safetensors", "ddp.pth.tar", "w.bin"):
        torch.manual_seed(0)
        model = build_model(ARCH)
        fc = model.backbone.fc.weight.clone()
        report = load_weights_into(model, tmp_path / name)
        assert (report.kind, report.loaded, report.total, report.classifier) == ("timm", n_tensors, n_tensors, "new")
        assert report.labels is None and "1000 outputs in the file, 6 here" in report.line()
        assert torch.equal(model.backbone.conv1[0].weight, imagenet.conv1[0].weight)
        assert torch.equal(model.backbone.layer4[0].bn2.running_var, imagenet.layer4[0].bn2.running_var)
        assert torch.equal(model.backbone.fc.weight, fc)  # left as initialised
        assert model.mean.flatten().tolist() == pytest.approx([0.485, 0.456, 0.406])


def test_timm_file_with_six_outputs_brings_its_classifier(tmp_path):
    import timm

    torch.manual_seed(4)
    six = timm.create_model(ARCH, num_classes=6)
    save_file(six.state_dict(), tmp_path / "six.safetensors")
    model = build_model(ARCH)
    assert load_weights_into(model, tmp_path / "six.safetensors").classifier == "loaded"
    assert torch.equal(model.backbone.fc.bias, six.fc.bias)


def test_truncated_or_other_stem_state_dicts_are_refused(tmp_path):
    import timm

    state = timm.create_model(ARCH, num_classes=1000).state_dict()
    n_tensors = sum(1 for k in state if not k.startswith("fc.") and not k.endswith("num_batches_tracked"))
    dropped = ["layer4.0.conv2.weight", "layer2.0.bn1.bias"]
    save_file({k: v for k, v in state.items() if k not in dropped}, tmp_path / "cut.safetensors")
    torch.manual_seed(0)
    model = build_model(ARCH)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(CheckpointError) as err:
        load_weights_into(model, tmp_path / "cut.safetensors")
    message = str(err.value)
    assert f"only {n_tensors - 2} of {n_tensors} backbone tensors match {ARCH}" in message
    assert "layer4.0.conv2.weight" in message and "cut.safetensors" in message and "\n" not in message
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())  # nothing half-loaded
    one_channel = timm.create_model(ARCH, num_classes=1000, in_chans=1).state_dict()
    save_file(one_channel, tmp_path / "gray.safetensors")
    with pytest.raises(CheckpointError, match=r"shape differs: conv1\.0\.weight"):
        build_model(ARCH, pretrained=tmp_path / "gray.safetensors")
    with pytest.raises(CheckpointError, match="not found"):
        build_model(ARCH, pretrained=tmp_path / "absent.pth")
    torch.save({"epoch": 3}, tmp_path / "empty.pth")
    with pytest.raises(CheckpointError, match="no tensors"):
        build_model(ARCH, pretrained=tmp_path / "empty.pth")


def test_label_order_is_matched_by_name(tmp_path):
    reverse = tuple(reversed(LABELS))
    path, state = saved(tmp_path, "rev", seed=3, labels=reverse)
    model = build_model(ARCH, labels=LABELS)
    report = load_weights_into(model, path)
    assert report.classifier == "reordered" and report.labels == reverse
    assert "reordered" in report.line()
    assert torch.equal(model.backbone.fc.weight[0], state["backbone.fc.weight"][reverse.index("any")])
    expected, _ = load_checkpoint(path)
    expected.select_labels(LABELS)
    assert torch.allclose(outputs(model), outputs(expected), atol=1e-6)
    # Other label names: backbone taken, classifier left new.
    other = build_model(ARCH, labels=("any", "epidural", "a", "b", "c", "d"))
    fc = other.backbone.fc.weight.clone()
    report = load_weights_into(other, path)
    assert report.classifier == "new" and "labels" in report.note and torch.equal(other.backbone.fc.weight, fc)
    assert torch.equal(other.backbone.conv1[0].weight, state["backbone.conv1.0.weight"])
    # Fewer labels: the classifier shape differs.
    assert load_weights_into(build_model(ARCH, labels=("any",)), path).classifier == "new"


def test_manifest_and_bundled_take_the_first_member(tmp_path, monkeypatch):
    a, state_a = saved(tmp_path, "a", seed=1)
    b, _ = saved(tmp_path, "b", seed=2)
    manifest = write_ensemble(tmp_path / "ensemble.json", [a, b], sha256=True)
    model = build_model(ARCH, pretrained=manifest)
    assert torch.equal(model.backbone.conv1[0].weight, state_a["backbone.conv1.0.weight"])
    report = load_weights_into(build_model(ARCH), manifest)
    assert report.manifest == manifest and report.manifest_members == 2
    assert report.source == a.with_suffix(".safetensors")
    assert f"first of 2 members of the ensemble {manifest}" in report.line()
    assert resolve_init_checkpoint(manifest) == a

    bundle = tmp_path / "bundle"
    bundle.mkdir()
    write_ensemble(bundle / "bundled.json", [b, a])
    monkeypatch.setenv(BUNDLED_DIR_ENV, str(bundle))
    report = load_weights_into(build_model(ARCH), BUNDLED)
    assert report.source.resolve() == b.with_suffix(".safetensors").resolve()
    assert report.manifest == bundle / "bundled.json"
    assert resolve_init_checkpoint(BUNDLED).resolve() == b.resolve()
    monkeypatch.setenv(BUNDLED_DIR_ENV, str(tmp_path / "nothing"))
    with pytest.raises(NoBundledModelError):
        resolve_init_checkpoint(BUNDLED)
    with pytest.raises(NoBundledModelError):
        init_model_from(BUNDLED)
    with pytest.raises(NoBundledModelError):
        build_model(ARCH, pretrained=BUNDLED)


def test_init_model_from_gives_the_checkpoints_model(tmp_path):
    path, _ = saved(tmp_path, "best", seed=6, mean=(0.1, 0.2, 0.3), std=(0.5, 0.6, 0.7))
    model, meta, report = init_model_from(path.with_suffix(".safetensors"))
    assert meta.path == path and model.arch == ARCH and model.labels == LABELS
    assert (report.classifier, report.loaded) == ("loaded", report.total)
    expected, _ = load_checkpoint(path)
    assert torch.allclose(outputs(model), outputs(expected), atol=1e-6)
    assert resolve_init_checkpoint(tmp_path / "best") == path
    # A checkpoint of another architecture builds that architecture.
    r18, _ = saved(tmp_path, "r18", arch="resnet18")
    model, meta, _ = init_model_from(r18)
    assert model.arch == "resnet18" == meta.arch
    assert torch.allclose(outputs(model), outputs(load_checkpoint(r18)[0]), atol=1e-6)


def test_init_refuses_bare_weights_files(tmp_path):
    import timm

    torch.save(timm.create_model(ARCH).state_dict(), tmp_path / "imagenet.pth")
    with pytest.raises(CheckpointError, match="not an ichscan checkpoint") as err:
        resolve_init_checkpoint(tmp_path / "imagenet.pth")
    assert "imagenet.pth" in str(err.value)
    with pytest.raises(CheckpointError, match="not an ichscan checkpoint"):
        init_model_from(tmp_path / "imagenet.pth")


def test_series_head_tensors_are_handed_back_not_loaded(tmp_path):
    path, state = saved(tmp_path, "best", seed=7)
    head = torch.arange(12, dtype=torch.float32).view(2, 6)
    save_file({**state, "series_head.fc.weight": head, "aux.counter": torch.ones(1)}, path.with_suffix(".safetensors"))
    model = build_model(ARCH)
    report = load_weights_into(model, path)
    assert report.loaded == report.total and report.classifier == "loaded"
    assert list(report.extra_state) == ["series_head.fc.weight"]
    assert torch.equal(report.extra_state["series_head.fc.weight"], head)
    assert "1 series_head tensors not loaded" in report.line()
    assert torch.equal(model.backbone.conv1[0].weight, state["backbone.conv1.0.weight"])


def test_init_keeps_the_checkpoints_size_unless_another_is_asked_for(tmp_path):
    from ichscan.errors import IchscanError
    from ichscan.train import TrainConfig, resolve_init

    path, _ = saved(tmp_path, "best")  # a resnet10t at 32 px
    said: list[str] = []
    # Not asked (the preset's own size): the checkpoint's 32 px, its architecture and windows.
    config = resolve_init(TrainConfig.from_preset("sim2real", init=str(path)), said.append)
    assert (config.arch, config.image_size, config.windows) == (ARCH, 32, ("brain", "blood", "soft_tissue"))
    assert said[-1].endswith(f"({ARCH}, 32 px, windows brain, blood, soft_tissue)")
    # Asked: fine-tuning at a higher resolution keeps the weights and trains at the new size, and says so.
    config = resolve_init(TrainConfig.from_preset("sim2real", init=str(path), image_size=256), said.append)
    assert (config.arch, config.image_size) == (ARCH, 256)
    assert "trained at 32 px, now 256 px" in said[-1]
    # Another architecture cannot come from these weights: one line naming both.
    with pytest.raises(IchscanError, match=r"is a resnet10t; --arch resnet18 cannot change that"):
        resolve_init(TrainConfig.from_preset("sim2real", init=str(path), arch="resnet18"))


def test_a_gpu_named_without_an_index_is_the_processs_own():
    from ichscan.train import pick_device

    # torch.cuda.set_device refuses a bare "cuda" (seen on an H200 with torch 2.11): it gets an index.
    assert pick_device("cuda", 0, True) == torch.device("cuda", 0)
    assert pick_device("cuda", 3, True) == torch.device("cuda", 3)  # torchrun's LOCAL_RANK 3
    assert pick_device("cuda:1", 3, True) == torch.device("cuda", 1)  # an index given is kept
    assert pick_device("cpu", 0, True) == torch.device("cpu")
    assert pick_device(None, 2, True) == torch.device("cuda", 2)
    assert pick_device(None, 0, False) == torch.device("cpu")


def test_average_checkpoints_is_the_weighted_mean_of_every_tensor(tmp_path):
    from ichscan.model import average_checkpoints, sha256_file

    a, wa = saved(tmp_path, "a", seed=1)
    b, wb = saved(tmp_path, "b", seed=2)
    out = average_checkpoints([a, b], tmp_path / "avg", shares=[3, 1])
    got = load_file(str(out.with_suffix(".safetensors")))
    assert got.keys() == wa.keys()
    key = "backbone.conv1.0.weight"
    assert torch.allclose(got[key], 0.75 * wa[key] + 0.25 * wb[key], atol=1e-7)
    var = next(k for k in wa if k.endswith("running_var"))  # batch-norm statistics are averaged too
    assert torch.allclose(got[var], 0.75 * wa[var] + 0.25 * wb[var], atol=1e-7)
    steps = next(k for k in wa if k.endswith("num_batches_tracked"))
    assert torch.equal(got[steps], wa[steps])  # integer buffers: the first source's
    model, meta = load_checkpoint(out)  # a checkpoint like any other, which predicts
    x = torch.rand(1, 3, 32, 32)
    assert model(x).shape == (1, len(LABELS))
    record = meta.record
    assert record["metrics"] == {} and [s["share"] for s in record["averaged_from"]] == [0.75, 0.25]
    assert record["averaged_from"][1]["sha256"] == sha256_file(b.with_suffix(".safetensors"))
    # Equal shares by default; a checkpoint averaged with itself is itself.
    same = load_file(str(average_checkpoints([a, a], tmp_path / "same").with_suffix(".safetensors")))
    assert all(torch.equal(same[k], wa[k]) for k in wa)
    # Another network, or another way of feeding it, is refused in one line naming the file.
    other = save_checkpoint(tmp_path / "other", trained(3), dict(META, image_size=64))
    with pytest.raises(CheckpointError, match="image_size differ") as err:
        average_checkpoints([a, other], tmp_path / "bad")
    assert "other.json" in str(err.value) and "\n" not in str(err.value)
    with pytest.raises(CheckpointError, match="at least two"):
        average_checkpoints([a], tmp_path / "bad")
    with pytest.raises(CheckpointError, match="one non-negative share"):
        average_checkpoints([a, b], tmp_path / "bad", shares=[1, -1])


def test_cli_average_writes_the_mean_and_refuses_bad_input_in_one_line(tmp_path, capsys):
    from ichscan.cli import main

    a, wa = saved(tmp_path, "a", seed=1)
    b, wb = saved(tmp_path, "b", seed=2)
    manifest = write_ensemble(tmp_path / "pair.json", [b, a])  # a manifest stands for its first member: b
    assert main(["average", str(a), str(manifest), "--shares", "1,3", "--out", str(tmp_path / "avg")]) == 0
    out = capsys.readouterr().out
    assert "avg.json" in out and "(0.25)" in out and "(0.75)" in out
    got = load_file(str(tmp_path / "avg.safetensors"))
    key = "backbone.conv1.0.weight"
    assert torch.allclose(got[key], 0.25 * wa[key] + 0.75 * wb[key], atol=1e-7)
    assert main(["average", str(a), str(b), "--shares", "1,x", "--out", str(tmp_path / "bad")]) == 1
    assert main(["average", str(a), str(tmp_path / "missing.json"), "--out", str(tmp_path / "bad")]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 2 and "--shares '1,x'" in err[0] and "missing" in err[1]
    assert not (tmp_path / "bad.json").exists()


def test_average_ensembles_member_by_member(tmp_path, capsys):
    """Member k of the result is the weighted mean of every source's member k; the manifest records the
    members' hashes (checked on read) and the sources; ensembles of different sizes are refused in one line."""
    from ichscan.cli import main
    from ichscan.model import average_ensembles, read_manifest

    (a0, wa0), (a1, wa1) = saved(tmp_path, "a0", seed=1), saved(tmp_path, "a1", seed=2)
    (b0, wb0), (b1, wb1) = saved(tmp_path, "b0", seed=3), saved(tmp_path, "b1", seed=4)
    pair_a = write_ensemble(tmp_path / "pair_a.json", [a0, a1])
    pair_b = write_ensemble(tmp_path / "pair_b.json", [b0, b1])
    out = average_ensembles([pair_a, pair_b], tmp_path / "soup" / "pair", shares=[3, 1])
    assert out == tmp_path / "soup" / "pair.json"
    manifest = read_manifest(out)  # every member's sha256 checked
    assert len(manifest.members) == 2 and all(m.sha256 for m in manifest.members)
    assert [m.checkpoint.name for m in manifest.members] == ["pair-member0.json", "pair-member1.json"]
    key = "backbone.conv1.0.weight"
    for member, wa, wb in zip(manifest.members, (wa0, wa1), (wb0, wb1)):
        got = load_file(str(member.checkpoint.with_suffix(".safetensors")))
        assert torch.allclose(got[key], 0.75 * wa[key] + 0.25 * wb[key], atol=1e-7)
    assert [s["share"] for s in manifest.info["averaged_from"]] == [0.75, 0.25]
    assert manifest.thresholds is None  # operating points are chosen anew for a new model
    # The CLI: --members averages every member; a checkpoint is an ensemble of one, so it cannot pair with two.
    assert main(["average", "--members", str(pair_a), str(pair_b), "--out", str(tmp_path / "cli")]) == 0
    assert "an ensemble of 2" in capsys.readouterr().out
    cli0 = load_file(str(tmp_path / "cli-member0.safetensors"))
    assert torch.allclose(cli0[key], 0.5 * wa0[key] + 0.5 * wb0[key], atol=1e-7)
    assert main(["average", "--members", str(pair_a), str(b0), "--out", str(tmp_path / "bad")]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "b0.json" in err[0] and "1 member(s) where" in err[0]
    assert not list(tmp_path.glob("bad*"))
