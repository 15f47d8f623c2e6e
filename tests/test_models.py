"""The segmenter: shapes, gradient flow, one encoder pass, config, initial weights."""

from __future__ import annotations

import warnings
from pathlib import Path

import pytest
import segmentation_models_pytorch as smp
import timm
import torch
from huggingface_hub.errors import LocalEntryNotFoundError
from safetensors.torch import save_file

from hisynseg.errors import HisynsegError
from hisynseg.models import (
    HisynSegNet,
    SegmenterOutput,
    WeightsFileError,
    WeightsUnavailableError,
    build_segmenter,
)

ENCODERS = ["resnet18", "mobilenet_v2", "efficientnet-b0", "tu-resnet10t"]


def _same(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor], prefix: str) -> bool:
    keys = [k for k in a if k.startswith(prefix)]
    assert keys
    return all(torch.equal(a[k], b[k]) for k in keys)


@pytest.mark.parametrize("encoder", ENCODERS)
def test_output_shapes(encoder: str) -> None:
    net = build_segmenter(encoder, num_classes=3).eval()
    with torch.no_grad():
        out = net(torch.randn(2, 3, 64, 64))
    assert isinstance(out, SegmenterOutput)
    assert out.seg_logits.shape == (2, 3, 64, 64)
    assert out.cam.shape == (2, 3, 4, 4)  # output stride 16
    assert out.cls_logits.shape == (2, 3)
    torch.testing.assert_close(out.cls_logits, out.cam.mean(dim=(2, 3)))


@pytest.mark.parametrize("encoder", ["resnet18", "tu-resnet10t"])
def test_gradients_reach_both_heads_and_the_encoder(encoder: str) -> None:
    torch.manual_seed(0)
    net = build_segmenter(encoder, num_classes=3)
    out = net(torch.randn(2, 3, 64, 64))
    params = {
        "cam": net.cam_head[1].weight,
        "seg": net.segmentation_head[0].weight,
        "stem": next(net.encoder.parameters()),
    }

    def grads(loss: torch.Tensor, retain: bool) -> dict[str, torch.Tensor | None]:
        g = torch.autograd.grad(loss, list(params.values()), retain_graph=retain, allow_unused=True)
        return dict(zip(params, g, strict=True))

    # The segmentation loss trains decoder + encoder, not the CAM head ...
    g = grads(out.seg_logits.square().mean(), retain=True)
    assert g["cam"] is None and g["seg"].abs().sum() > 0 and g["stem"].abs().sum() > 0
    # ... and the classification loss trains the CAM head + encoder, not the decoder.
    g = grads(out.cls_logits.square().mean(), retain=False)
    assert g["seg"] is None and g["cam"].abs().sum() > 0 and g["stem"].abs().sum() > 0


def test_encoder_runs_once_per_forward() -> None:
    net = build_segmenter("resnet18", num_classes=2)
    calls = []
    net.encoder.register_forward_hook(lambda *_: calls.append(1))
    net(torch.randn(2, 3, 32, 32))
    assert len(calls) == 1


def test_cam_head_and_stored_settings() -> None:
    net = build_segmenter("mobilenet_v2", num_classes=4, dropout=0.3)
    assert net.num_classes == 4 and net.encoder_name == "mobilenet_v2"
    assert isinstance(net.cam_head[0], torch.nn.Dropout) and net.cam_head[0].p == 0.3
    assert net.cam_head[1].kernel_size == (1, 1)
    assert net.cam_head[1].in_channels == net.encoder.out_channels[-1]
    net.eval()  # no dropout: the CAM is deterministic
    x = torch.randn(1, 3, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(net(x).cam, net(x).cam)


def test_config_rebuilds_the_architecture() -> None:
    net = build_segmenter("tu-resnet10t", num_classes=5, dropout=0.2, encoder_depth=4)
    cfg = net.config()
    assert cfg == {"encoder": "tu-resnet10t", "num_classes": 5, "dropout": 0.2, "encoder_depth": 4}
    for clone in (build_segmenter(**cfg), HisynSegNet.from_config(cfg)):
        clone.load_state_dict(net.state_dict())  # strict: same keys and shapes
        assert clone.config() == cfg


def test_positional_num_classes_and_missing_num_classes() -> None:
    assert build_segmenter("resnet18", 3).num_classes == 3
    with pytest.raises(TypeError):
        build_segmenter("resnet18")


def test_bad_settings_are_user_errors() -> None:
    with pytest.raises(HisynsegError, match="unknown encoder"):
        build_segmenter("resnet-does-not-exist", num_classes=2)
    with pytest.raises(HisynsegError, match="unknown encoder"):
        build_segmenter("tu-not_a_timm_model", num_classes=2)
    with pytest.raises(HisynsegError, match="encoder_depth"):
        build_segmenter("resnet18", num_classes=2, encoder_depth=2)
    with pytest.raises(HisynsegError, match="dropout"):
        build_segmenter("resnet18", num_classes=2, dropout=1.0)


def test_input_size_must_be_divisible_by_16() -> None:
    net = build_segmenter("resnet18", num_classes=2)
    with pytest.raises(ValueError, match="divisible by 16"):
        net(torch.randn(1, 3, 40, 48))


@pytest.mark.parametrize("weights", [None, "none", "None", ""])
def test_no_weights_means_random(weights: str | None) -> None:
    assert (
        build_segmenter("resnet18", num_classes=2, encoder_weights=weights).encoder_weights is None
    )


# --------------------------------------------------------------------------- weight files


def test_encoder_state_dict_file(tmp_path: Path) -> None:
    torch.manual_seed(1)
    src = HisynSegNet("resnet18", num_classes=3)
    path = tmp_path / "enc.pth"
    torch.save(src.encoder.state_dict(), path)
    torch.manual_seed(2)
    net = build_segmenter("resnet18", num_classes=3, encoder_weights=str(path))
    assert net.encoder_weights == str(path)
    assert _same(src.state_dict(), net.state_dict(), "encoder.")
    assert not _same(src.state_dict(), net.state_dict(), "decoder.")


def test_full_smp_model_safetensors_with_other_class_count(tmp_path: Path) -> None:
    torch.manual_seed(3)
    smp_model = smp.DeepLabV3Plus(
        "resnet18", encoder_weights=None, encoder_output_stride=16, classes=5
    )
    path = tmp_path / "smp.safetensors"
    save_file({k: v.contiguous() for k, v in smp_model.state_dict().items()}, str(path))
    with pytest.warns(UserWarning, match="another shape"):
        net = build_segmenter("resnet18", num_classes=3, encoder_weights=path)
    ref = smp_model.state_dict()
    own = net.state_dict()
    assert _same(ref, own, "encoder.") and _same(ref, own, "decoder.")
    assert own["segmentation_head.0.weight"].shape[0] == 3


def test_lightning_checkpoint_with_prefix(tmp_path: Path) -> None:
    torch.manual_seed(4)
    src = HisynSegNet("mobilenet_v2", num_classes=2)
    state = {f"model.{k}": v for k, v in src.state_dict().items()}
    path = tmp_path / "last.ckpt"
    torch.save({"epoch": 3, "state_dict": state, "hyper_parameters": {"lr": 1e-4}}, path)
    net = build_segmenter("mobilenet_v2", num_classes=2, encoder_weights=path)
    for k, v in src.state_dict().items():
        assert torch.equal(v, net.state_dict()[k]), k


def test_timm_checkpoint_for_tu_encoder(tmp_path: Path) -> None:
    torch.manual_seed(5)
    model = timm.create_model("resnet10t")
    path = tmp_path / "resnet10t.pth"
    torch.save(model.state_dict(), path)  # includes the classifier fc.*, unused
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # two unused head tensors do not warn
        net = build_segmenter("tu-resnet10t", num_classes=2, encoder_weights=path)
    inner = net.encoder.model.state_dict()
    for k, v in inner.items():
        assert torch.equal(v, model.state_dict()[k]), k


def test_wrong_encoder_file_is_a_clear_error(tmp_path: Path) -> None:
    path = tmp_path / "r18.pth"
    torch.save(HisynSegNet("resnet18", num_classes=2).encoder.state_dict(), path)
    with pytest.raises(WeightsFileError, match="r18.pth.*mobilenet_v2"):
        build_segmenter("mobilenet_v2", num_classes=2, encoder_weights=path)
    with pytest.raises(WeightsFileError, match="missing"):
        build_segmenter("resnet34", num_classes=2, encoder_weights=path)


def test_shape_mismatch_in_encoder_is_an_error(tmp_path: Path) -> None:
    state = HisynSegNet("resnet18", num_classes=2).encoder.state_dict()
    state["conv1.weight"] = torch.zeros(64, 3, 3, 3)
    path = tmp_path / "bad.pth"
    torch.save(state, path)
    with pytest.raises(WeightsFileError, match=r"another shape: encoder.conv1.weight"):
        build_segmenter("resnet18", num_classes=2, encoder_weights=path)


def test_bigger_variant_warns_about_unused_tensors(tmp_path: Path) -> None:
    path = tmp_path / "r34.pth"
    torch.save(HisynSegNet("resnet34", num_classes=2).encoder.state_dict(), path)
    with pytest.warns(UserWarning, match="not used"):
        build_segmenter("resnet18", num_classes=2, encoder_weights=path)


def test_missing_unreadable_and_unknown_weights(tmp_path: Path) -> None:
    with pytest.raises(WeightsFileError, match="not found"):
        build_segmenter("resnet18", num_classes=2, encoder_weights=tmp_path / "nope.pth")
    junk = tmp_path / "junk.pt"
    junk.write_bytes(b"not a checkpoint")
    with pytest.raises(WeightsFileError, match="junk.pt: not a readable"):
        build_segmenter("resnet18", num_classes=2, encoder_weights=junk)
    with pytest.raises(HisynsegError, match="imagenet"):
        build_segmenter("resnet18", num_classes=2, encoder_weights="imagenet21k")


# ------------------------------------------------------------------------ imagenet weights


def _offline(*args: object, **kwargs: object) -> str:
    raise LocalEntryNotFoundError("offline (mocked)")


def test_imagenet_offline_smp_encoder(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr("segmentation_models_pytorch.encoders.hf_hub_download", _offline)
    with pytest.raises(WeightsUnavailableError) as info:
        build_segmenter("resnet18", num_classes=2, encoder_weights="imagenet")
    msg = str(info.value)
    assert "smp-hub/resnet18.imagenet" in msg and "encoder_weights=/path/to/" in msg
    assert isinstance(info.value, HisynsegError)


def test_imagenet_offline_timm_encoder(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr("timm.models._hub.hf_hub_download", _offline)
    with pytest.raises(WeightsUnavailableError, match="timm/resnet10t"):
        build_segmenter("tu-resnet10t", num_classes=2, encoder_weights="imagenet")


def test_imagenet_download_path_loads_what_smp_fetches(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    torch.manual_seed(6)
    src = HisynSegNet("resnet18", num_classes=2).encoder.state_dict()
    file = tmp_path / "model.safetensors"
    save_file({k: v.contiguous() for k, v in src.items()}, str(file))
    fetched: list[str] = []

    def fake_download(repo_id: str, filename: str, revision: str | None = None) -> str:
        fetched.append(f"{repo_id}/{filename}")
        return str(file)

    monkeypatch.setattr("segmentation_models_pytorch.encoders.hf_hub_download", fake_download)
    net = build_segmenter("resnet18", num_classes=2, encoder_weights="imagenet")
    assert net.encoder_weights == "imagenet"
    assert "smp-hub/resnet18.imagenet/model.safetensors" in fetched
    own = net.encoder.state_dict()
    assert all(torch.equal(v, own[k]) for k, v in src.items())


def test_an_onnx_file_is_named_as_such_where_a_checkpoint_is_needed(tmp_path: Path) -> None:
    from hisynseg.models.checkpoint import CheckpointError, load_segmenter

    path = tmp_path / "model.onnx"
    path.write_bytes(b"\x08\x07\x12\x07pytorch")  # an ONNX protobuf's first bytes
    with pytest.raises(CheckpointError, match=r"model\.onnx: an ONNX model.*\.ckpt"):
        load_segmenter(path)


def test_export_refuses_an_opset_too_old_for_the_network(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from hisynseg.cli import main

    with pytest.raises(SystemExit) as stopped:
        main(
            ["export", str(tmp_path / "m.ckpt"), "--onnx", str(tmp_path / "m.onnx"), "--opset", "5"]
        )
    assert stopped.value.code == 2
    assert "--opset: must be at least 11, got 5" in capsys.readouterr().err
