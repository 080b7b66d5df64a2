"""Checkpoints users already have load and give transformers' logits; saving writes the HF
on-disk format transformers reads; broken or foreign checkpoints are refused clearly
(docs/design.md, "Checkpoints")."""

from __future__ import annotations

import copy
import sys
import warnings

import pytest
import torch

from helpers import TOLERANCE, assert_close, rel_err
from segformer import SegFormer, SegFormerConfig
from segformer.checkpoint import infer_config, to_canonical, translate_key
from test_model_parity import hf_model, random_hf_model, randomize_, set_nvlabs_eps_

transformers = pytest.importorskip("transformers")
safetensors_torch = pytest.importorskip("safetensors.torch")

IMAGE_SIZE = (45, 61)


@pytest.fixture(scope="module")
def hf_b0():
    """A random B0 with 5 classes (random weights and BatchNorm statistics), eval mode."""
    return random_hf_model(SegFormerConfig.preset("b0", num_labels=5))


@pytest.fixture(scope="module")
def hf_folder(hf_b0, tmp_path_factory):
    """What transformers' save_pretrained writes: config.json + model.safetensors (v4 names)."""
    folder = tmp_path_factory.mktemp("hf_b0")
    hf_b0.save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def hf_logits(hf_b0):
    """(images, logits) of the transformers model, computed once."""
    images = torch.randn(2, 3, *IMAGE_SIZE)
    return images, logits_of(hf_b0, images)


def logits_of(model, images):
    with torch.no_grad():
        out = model.eval()(images)
    return out if isinstance(out, torch.Tensor) else out.logits


def assert_same_logits(model, reference):
    """reference: a model, or (images, logits) of one."""
    images, expected = reference if isinstance(reference, tuple) else (torch.randn(2, 3, *IMAGE_SIZE), None)
    if expected is None:
        expected = logits_of(reference, images)
    assert_close(logits_of(model, images), expected, torch.float32, "logits")


def nvlabs_state_dict(hf) -> dict[str, torch.Tensor]:
    """An NVlabs/mmseg segmentation state dict with the transformers model's weights:
    backbone./decode_head. prefixes, fused attn.kv, the unused conv_seg."""
    state = {translate_key(name, "hf5", "nvlabs"): value.clone() for name, value in hf.state_dict().items()}
    for key in [k for k in state if ".attn.k." in k]:
        kind = key.rsplit(".", 1)[1]
        prefix = key[: -len(f".k.{kind}")]
        state[f"{prefix}.kv.{kind}"] = torch.cat([state.pop(key), state.pop(f"{prefix}.v.{kind}")])
    state["decode_head.conv_seg.weight"] = torch.randn(5, 256, 1, 1)
    state["decode_head.conv_seg.bias"] = torch.randn(5)
    return state


def nvlabs_reference(hf):
    """transformers with NVlabs' eps semantics and hf's weights: the oracle for NVlabs files."""
    reference = set_nvlabs_eps_(hf_model(SegFormerConfig.preset("b0", num_labels=5)))
    reference.load_state_dict(hf.state_dict())
    return reference.eval()


# ---- HF sources -------------------------------------------------------------------------


def test_hf_folder_loads_with_its_config(hf_logits, hf_folder):
    model = SegFormer.from_pretrained(hf_folder, kernels="torch")
    assert model.config.num_labels == 5
    assert model.config.block_norm_eps == model.config.embed_norm_eps == 1e-5, "transformers uses 1e-5 everywhere"
    assert_same_logits(model, hf_logits)


def test_hf_pytorch_model_bin_and_bare_files(hf_logits, hf_folder, tmp_path):
    tensors = safetensors_torch.load_file(str(hf_folder / "model.safetensors"))
    (tmp_path / "config.json").write_text((hf_folder / "config.json").read_text())
    torch.save(tensors, tmp_path / "pytorch_model.bin")
    assert_same_logits(SegFormer.from_pretrained(tmp_path, kernels="torch"), hf_logits)
    # a bare file, no config.json beside it: the architecture comes from the weights
    bare = tmp_path / "bare" / "weights.bin"
    bare.parent.mkdir()
    torch.save(tensors, bare)
    model = SegFormer.from_pretrained(bare, kernels="torch")
    assert model.config == SegFormerConfig.preset("b0", num_labels=5)
    assert_same_logits(model, hf_logits)
    assert_same_logits(SegFormer.from_pretrained(hf_folder / "model.safetensors", kernels="torch"), hf_logits)


def test_transformers5_names_and_bare_state_dicts_load(hf_b0, hf_logits, tmp_path):
    in_memory = hf_b0.state_dict()
    assert any(".stages.0.blocks.0.attention.q_proj." in k for k in in_memory)
    assert_same_logits(SegFormer.from_pretrained(in_memory, kernels="torch"), hf_logits)
    torch.save(in_memory, tmp_path / "v5.pt")
    model = SegFormer.from_pretrained(tmp_path / "v5.pt", kernels="torch")
    assert_same_logits(model, hf_logits)
    # this model's own state dict, also under a DDP "module." prefix inside {"model": ...}
    wrapped = {"model": {f"module.{k}": v for k, v in model.state_dict().items()}, "step": 3}
    assert_same_logits(SegFormer.from_pretrained(wrapped, kernels="torch"), hf_logits)


@pytest.mark.parametrize("preset", ["b1", "b2"])
def test_architecture_is_inferred_from_weights(preset):
    config = SegFormerConfig.preset(preset, num_labels=11)
    state = hf_model(config, device="meta").state_dict()
    tensors, source, _, _ = to_canonical(state)
    assert source == "hf5"
    assert infer_config(tensors, source, None) == config


# ---- NVlabs sources ------------------------------------------------------------------------


def test_nvlabs_segmentation_checkpoint_loads_with_its_eps(hf_b0, tmp_path):
    path = tmp_path / "segformer.b0.ade.pth"
    torch.save({"meta": {"CLASSES": ["a", "b", "c", "d", "e"]}, "state_dict": nvlabs_state_dict(hf_b0)}, path)
    model = SegFormer.from_pretrained(path, kernels="torch")
    assert (model.config.block_norm_eps, model.config.embed_norm_eps) == (1e-6, 1e-5)
    assert model.config.id2label == {0: "a", 1: "b", 2: "c", 3: "d", 4: "e"}
    assert SegFormer.from_pretrained(path, config="b0").config.block_norm_eps == 1e-6
    reference = nvlabs_reference(hf_b0)
    assert_same_logits(model, reference)
    # In fp64 the match is exact and the eps difference is plain: transformers' 1e-5
    # everywhere gives other logits. (sdpa: transformers' eager attention takes its
    # softmax in fp32 even for fp64 inputs.)
    images = torch.randn(1, 3, *IMAGE_SIZE, dtype=torch.float64)
    logits = logits_of(model.double(), images)
    transformers_eps = copy.deepcopy(hf_b0).double()
    for oracle in (reference, transformers_eps):
        oracle.config._attn_implementation = "sdpa"
    exact = rel_err(logits, logits_of(reference.double(), images))
    assert exact <= 1e-12
    assert rel_err(logits, logits_of(transformers_eps, images)) > 1e-3 * TOLERANCE[torch.float32]


def test_nvlabs_imagenet_backbone_loads_into_the_encoder(hf_b0, tmp_path):
    backbone = {k.removeprefix("backbone."): v for k, v in nvlabs_state_dict(hf_b0).items() if k.startswith("backbone.")}
    backbone["head.weight"], backbone["head.bias"] = torch.randn(1000, 256), torch.randn(1000)
    path = tmp_path / "mit_b0.pth"
    torch.save(backbone, path)
    with pytest.raises(ValueError, match="has no segmentation head .* pass num_classes="):
        SegFormer.from_pretrained(path)
    with pytest.warns(UserWarning, match="decode head is freshly initialised"):
        model = SegFormer.from_pretrained(path, num_classes=4, kernels="torch")
    assert model.config.num_labels == 4 and model.config.block_norm_eps == 1e-6
    reference = nvlabs_reference(hf_b0)
    images = torch.randn(2, 3, *IMAGE_SIZE)
    with torch.no_grad():
        features, _ = model.eval().encoder(images)
        expected = reference.segformer(images, output_hidden_states=True).hidden_states
    for i, (mine, theirs) in enumerate(zip(features, expected)):
        assert_close(mine, theirs.flatten(2).transpose(1, 2), torch.float32, f"stage {i + 1} features")


def test_hf_classification_checkpoint_gives_a_fresh_decoder(hf_b0, tmp_path):
    classifier = randomize_(hf_model(SegFormerConfig.preset("b0", num_labels=1000), head="SegformerForImageClassification"))
    classifier.save_pretrained(tmp_path)
    with pytest.warns(UserWarning, match="decode head is freshly initialised"):
        model = SegFormer.from_pretrained(tmp_path, num_classes=3, kernels="torch")
    assert model.config.num_labels == 3
    ours = model.state_dict()
    for name, value in classifier.state_dict().items():
        if not name.startswith("classifier."):
            assert torch.equal(ours[translate_key(name, "hf5", "ours")], value), name


# ---- saving ----------------------------------------------------------------------------------


def test_save_pretrained_loads_in_transformers(tmp_path):
    model = SegFormer.from_config("b0", num_classes=6, kernels="torch")
    randomize_(model)
    model.save_pretrained(tmp_path)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["config.json", "model.safetensors"]
    hf, info = transformers.SegformerForSemanticSegmentation.from_pretrained(tmp_path, output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"] and not info["mismatched_keys"], info
    assert_same_logits(model, hf)
    reloaded = SegFormer.from_pretrained(tmp_path, kernels="torch")
    assert reloaded.config == model.config
    for key, value in model.state_dict().items():
        assert torch.equal(reloaded.state_dict()[key], value), key


def test_save_keeps_nvlabs_eps(hf_b0, tmp_path):
    model = SegFormer.from_pretrained({"state_dict": nvlabs_state_dict(hf_b0)}, kernels="torch")
    model.save_pretrained(tmp_path)
    reloaded = SegFormer.from_pretrained(tmp_path, kernels="torch")
    assert (reloaded.config.block_norm_eps, reloaded.config.embed_norm_eps) == (1e-6, 1e-5)
    assert_same_logits(reloaded, model)


def test_save_without_safetensors_writes_pytorch_model_bin(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "safetensors.torch", None)  # makes the import fail
    model = randomize_(SegFormer.from_config("b0", num_classes=2, kernels="torch"))
    model.save_pretrained(tmp_path)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["config.json", "pytorch_model.bin"]
    monkeypatch.undo()
    assert_same_logits(SegFormer.from_pretrained(tmp_path, kernels="torch"), model)
    hf = transformers.SegformerForSemanticSegmentation.from_pretrained(tmp_path)
    assert_same_logits(model, hf)


# ---- fine-tuning, missing, unexpected, mismatched --------------------------------------------


def test_other_num_classes_gives_a_fresh_classifier(hf_b0, hf_folder):
    with pytest.warns(UserWarning, match=r"5 classes, num_classes=3: the classifier .* freshly initialised"):
        model = SegFormer.from_pretrained(hf_folder, num_classes=3, kernels="torch")
    assert model.decode_head.classifier.weight.shape == (3, 256, 1, 1)
    assert model.config.num_labels == 3 and model.config.id2label is None
    assert torch.equal(model.decode_head.linear_fuse.weight, hf_b0.decode_head.linear_fuse.weight)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        SegFormer.from_pretrained(hf_folder, num_classes=5, kernels="torch")  # same count: silent


def test_missing_and_unexpected_keys_are_named(hf_b0):
    state = dict(hf_b0.state_dict())
    del state["segformer.stages.1.blocks.0.mlp.fc1.weight"]
    with pytest.raises(ValueError, match=r"missing keys .*encoder\.stages\.1\.blocks\.0\.mlp\.fc1\.weight"):
        SegFormer.from_pretrained(state, config="b0")
    with pytest.warns(UserWarning, match=r"encoder\.stages\.1\.blocks\.0\.mlp\.fc1\.weight"):
        SegFormer.from_pretrained(state, config=SegFormerConfig.preset("b0", num_labels=5), strict=False)
    state = dict(hf_b0.state_dict(), **{"segformer.extra.weight": torch.zeros(3)})
    with pytest.raises(ValueError, match=r"unexpected keys .*segformer\.extra\.weight"):
        SegFormer.from_pretrained(state)


def test_shape_mismatch_names_the_key_and_both_shapes(hf_b0):
    with pytest.raises(ValueError, match=r"shape mismatch at encoder\.stages\.0\.patch_embed\.proj\.weight: "
                                         r"the checkpoint has \(32, 3, 7, 7\).*expects \(64, 3, 7, 7\)"):
        SegFormer.from_pretrained(hf_b0.state_dict(), config="b1")


# ---- refusing what is not a SegFormer checkpoint ---------------------------------------------


@pytest.mark.parametrize("name", ["model.safetensors", "checkpoint.pth"])
def test_corrupt_files_are_refused(tmp_path, hf_folder, name):
    path = tmp_path / name
    path.write_bytes(b"\x00not a checkpoint" * 10)
    with pytest.raises(ValueError, match="could not read"):
        SegFormer.from_pretrained(path)
    truncated = tmp_path / "truncated" / name
    truncated.parent.mkdir()
    truncated.write_bytes((hf_folder / "model.safetensors").read_bytes()[:5000])
    with pytest.raises(ValueError, match="could not read"):
        SegFormer.from_pretrained(truncated)


def test_a_resnet_is_not_a_segformer(tmp_path):
    resnet = {
        "conv1.weight": torch.randn(64, 3, 7, 7), "bn1.weight": torch.ones(64), "bn1.bias": torch.zeros(64),
        "layer1.0.conv1.weight": torch.randn(64, 64, 3, 3), "fc.weight": torch.randn(1000, 2048), "fc.bias": torch.zeros(1000),
    }
    torch.save({"state_dict": resnet}, tmp_path / "resnet.pth")
    with pytest.raises(ValueError, match=r"not a SegFormer checkpoint: expected keys like .*found 'conv1\.weight'"):
        SegFormer.from_pretrained(tmp_path / "resnet.pth")
    with pytest.raises(ValueError, match="holds no tensors"):
        SegFormer.from_pretrained({"epoch": 3})
    with pytest.raises(TypeError, match="path must be"):
        SegFormer.from_pretrained(42)
    with pytest.raises(FileNotFoundError):
        SegFormer.from_pretrained(tmp_path / "nothing_here")


def test_config_json_of_another_model_is_refused(tmp_path, hf_folder):
    (tmp_path / "config.json").write_text('{"model_type": "bert", "hidden_size": 768}')
    (tmp_path / "model.safetensors").write_bytes((hf_folder / "model.safetensors").read_bytes())
    with pytest.raises(ValueError, match="'bert' model, not model_type 'segformer'"):
        SegFormer.from_pretrained(tmp_path)
