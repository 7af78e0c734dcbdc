"""Model: timm backbones with six outputs, offline ImageNet weights, checkpoints and ensembles."""

from __future__ import annotations

import json

import pytest
import torch

from ichscan.errors import CheckpointError, IchscanError
from ichscan.labels import LABELS
from ichscan.model import (
    Ensemble,
    build_model,
    load_checkpoint,
    load_ensemble,
    save_checkpoint,
    write_ensemble,
)

torch.set_num_threads(1)
META = {"windows": [{"name": "brain", "level": 40, "width": 80}, {"name": "blood", "level": 80, "width": 200},
                    {"name": "soft_tissue", "level": 40, "width": 380}], "image_size": 32}


def tiny(seed: int = 0, **kw):
    torch.manual_seed(seed)
    return build_model("resnet10t", **kw).eval()


def test_paper_model_has_six_outputs_and_known_size():
    model = build_model("seresnext50_32x4d").eval()
    assert model.labels == LABELS
    # timm's SE-ResNeXt50 32x4d (27,559,896 parameters with 1000 classes) with a 6-way head.
    assert sum(p.numel() for p in model.parameters()) == 25_523_190
    with torch.no_grad():
        out = model(torch.zeros(2, 3, 64, 64, dtype=torch.uint8))
    assert out.shape == (2, 6)


def test_uint8_and_float_inputs_agree():
    model = tiny()
    x = torch.randint(0, 256, (2, 3, 32, 32), dtype=torch.uint8)
    with torch.no_grad():
        assert torch.allclose(model(x), model(x.float() / 255), atol=1e-6)


def test_checkpoint_round_trip_gives_identical_outputs(tmp_path):
    model = tiny(seed=3)
    x = torch.rand(3, 3, 32, 32)
    path = save_checkpoint(tmp_path / "ckpt" / "best", model, {**META, "metrics": {"val_loss": 0.1}})
    assert path.name == "best.json" and (tmp_path / "ckpt" / "best.safetensors").is_file()
    assert not [p for p in (tmp_path / "ckpt").iterdir() if p.name.startswith(".")]  # no temporary left over
    meta = json.loads(path.read_text())
    for key in ("arch", "labels", "windows", "image_size", "config", "data", "metrics", "ichscan_version"):
        assert key in meta
    loaded, meta2 = load_checkpoint(tmp_path / "ckpt" / "best.safetensors")
    assert meta2.labels == LABELS and meta2.image_size == 32 and meta2.metrics == {"val_loss": 0.1}
    assert not loaded.training
    with torch.no_grad():
        assert torch.equal(model(x), loaded(x))


def test_loading_honours_label_order(tmp_path):
    order = ("subdural", "any", "epidural", "subarachnoid", "intraventricular", "intraparenchymal")
    model = tiny(seed=4, labels=order)
    path = save_checkpoint(tmp_path / "m", model, META)
    x = torch.rand(2, 3, 32, 32)
    loaded, meta = load_checkpoint(path)
    assert loaded.labels == order and meta.labels == tuple(order)
    reordered, _ = load_checkpoint(path, labels=LABELS)
    assert reordered.labels == LABELS
    with torch.no_grad():
        raw, out = model(x), reordered(x)
    for j, name in enumerate(LABELS):
        assert torch.equal(out[:, j], raw[:, order.index(name)])
    with pytest.raises(CheckpointError, match="no output"):
        load_checkpoint(path, labels=("any", "chronic"))


def test_checkpoint_errors(tmp_path):
    with pytest.raises(CheckpointError, match="not found"):
        load_checkpoint(tmp_path / "nothing.json")
    path = save_checkpoint(tmp_path / "m", tiny(), META)
    (tmp_path / "m.safetensors").unlink()
    with pytest.raises(CheckpointError, match="missing"):
        load_checkpoint(path)
    with pytest.raises(IchscanError, match="unknown timm"):
        build_model("no_such_net")


def test_pretrained_is_offline_and_loads_local_files(tmp_path):
    import timm
    from safetensors.torch import save_file

    with pytest.raises(CheckpointError, match="--pretrained PATH"):
        build_model("resnet10t", pretrained=True)
    with pytest.raises(CheckpointError, match="not found"):
        build_model("resnet10t", pretrained=tmp_path / "missing.safetensors")
    torch.manual_seed(9)
    imagenet = timm.create_model("resnet10t", num_classes=1000)
    save_file(imagenet.state_dict(), tmp_path / "resnet10t.safetensors")
    model = build_model("resnet10t", pretrained=tmp_path / "resnet10t.safetensors")
    assert torch.equal(model.backbone.conv1[0].weight, imagenet.conv1[0].weight)
    assert model.backbone.fc.out_features == 6


def test_ensemble_manifest_round_trip(tmp_path):
    a = save_checkpoint(tmp_path / "a" / "best", tiny(seed=1), META)
    b = save_checkpoint(tmp_path / "b" / "best", tiny(seed=2), META)
    manifest = write_ensemble(tmp_path / "ensemble.json", [a, b], weights=[1.0, 3.0])
    record = json.loads(manifest.read_text())
    assert record["kind"] == "ichscan-ensemble" and record["labels"] == list(LABELS)
    assert [m["checkpoint"] for m in record["members"]] == ["a/best.json", "b/best.json"]
    ens = load_ensemble(manifest)
    assert isinstance(ens, Ensemble) and ens.labels == LABELS and ens.image_size == 32
    x = torch.rand(2, 3, 32, 32)
    ma, _ = load_checkpoint(a)
    mb, _ = load_checkpoint(b)
    with torch.no_grad():
        expected = 0.25 * torch.sigmoid(ma(x)) + 0.75 * torch.sigmoid(mb(x))
        assert torch.allclose(ens(x), expected, atol=1e-6)
    single = load_ensemble(a)
    assert len(single.members) == 1
    # Members of other sizes load (the Predictor windows per size), but cannot share one input tensor.
    c = save_checkpoint(tmp_path / "c", tiny(seed=3), {**META, "image_size": 64})
    mixed = load_ensemble(write_ensemble(tmp_path / "mixed.json", [a, c]))
    assert mixed.preps == [(mixed.windows, 32), (mixed.windows, 64)]
    with pytest.raises(CheckpointError, match="differ in windows or image size"):
        mixed(x)


def test_ensemble_matches_members_by_label_name(tmp_path):
    order = ("subdural", "any", "epidural", "subarachnoid", "intraventricular", "intraparenchymal")
    a = save_checkpoint(tmp_path / "a", tiny(seed=1), META)
    b = save_checkpoint(tmp_path / "b", tiny(seed=2, labels=order), META)
    ens = load_ensemble(write_ensemble(tmp_path / "e.json", [a, b]))
    x = torch.rand(2, 3, 32, 32)
    ma, _ = load_checkpoint(a)
    mb, _ = load_checkpoint(b)
    with torch.no_grad():
        pb = torch.sigmoid(mb(x))[:, [order.index(name) for name in LABELS]]
        assert torch.allclose(ens(x), 0.5 * torch.sigmoid(ma(x)) + 0.5 * pb, atol=1e-6)


@pytest.mark.parametrize("change, message", [
    ({"image_size": -5}, "'image_size' is -5, not a positive number of pixels"),
    ({"image_size": None}, "'image_size' is None"),
    ({"windows": []}, "no 'windows'"),
    ({"labels": ["any", "any"]}, "not a list of distinct names"),
    ({"in_chans": 1}, "takes 1 channels but the JSON lists 3 windows"),
    ({"operating_points": {"method": "youden", "thresholds": {"any": "abc"}}}, "threshold for any is 'abc'"),
    ({"operating_points": {"thresholds": {"bleed": 0.3}}}, "unknown label 'bleed'"),
    ({"arch": "no_such_net"}, "unknown timm architecture"),
])
def test_a_damaged_checkpoint_json_is_one_line_naming_file_and_field(tmp_path, change, message):
    path = save_checkpoint(tmp_path / "m", tiny(seed=1), META)
    record = json.loads(path.read_text())
    record.update(change)
    path.write_text(json.dumps(record))
    with pytest.raises(CheckpointError) as err:
        load_checkpoint(path)
    assert message in str(err.value) and str(err.value).startswith(str(path)) and "\n" not in str(err.value)


def test_weights_of_another_architecture_are_one_line(tmp_path):
    path = save_checkpoint(tmp_path / "m", tiny(seed=1), META)
    other = save_checkpoint(tmp_path / "o", build_model("test_efficientnet"), META)
    (tmp_path / "m.safetensors").write_bytes((tmp_path / "o.safetensors").read_bytes())
    assert other.is_file()
    with pytest.raises(CheckpointError) as err:
        load_checkpoint(path)
    text = str(err.value)
    assert text.startswith(str(tmp_path / "m.safetensors")) and "weights do not fit" in text and "\n" not in text
    assert len(text) < 400


def test_save_checkpoint_refuses_a_record_inference_could_not_use(tmp_path):
    with pytest.raises(CheckpointError, match="image_size"):
        save_checkpoint(tmp_path / "m", tiny(seed=1), {**META, "image_size": 0})
    assert not list(tmp_path.iterdir())
