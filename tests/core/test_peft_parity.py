"""PEFT-API parity: every call below is made on a shira_dist model and on PEFT's own SHiRA
model (``peft.get_peft_model(base, peft.ShiraConfig(...))``) over the same tiny Llama, and
both must accept it and behave alike.

The two libraries draw different random masks from the same seed, so where outputs are
compared both hold the same adapter: PEFT's, saved and loaded into shira_dist
(``_same_adapter``). Outputs of the two libraries agree to atol 1e-5 (fp32; different
kernels, so only summation order differs); outputs that must equal the base model's (adapter
disabled or unloaded) agree to the bit within one library.
"""

from __future__ import annotations

import os

import peft
import pytest
import torch
from torch import nn

import shira_dist
from tests.conftest import tiny_llama

TARGETS = ["q_proj", "v_proj"]
ATOL = 1e-5
LIBRARIES = ("shira_dist", "peft")


def _config(library: str, **kw):
    """Each library's own SHiRA config; non-zero initial values (``init_weights=False``)."""
    kw = {"r": 2, "target_modules": list(TARGETS), "random_seed": 0, "init_weights": False, **kw}
    return shira_dist.ShiraConfig(**kw) if library == "shira_dist" else peft.ShiraConfig(**kw)


def _wrap(library: str, base=None, **kw):
    base = tiny_llama() if base is None else base
    module = shira_dist if library == "shira_dist" else peft
    return module.get_peft_model(base, _config(library, **kw))


def _peft_model_cls(library: str):
    return shira_dist.PeftModel if library == "shira_dist" else peft.PeftModel


def _same_adapter(tmp_path) -> tuple[dict, str]:
    """{library: model} holding the same adapter (PEFT's, saved to the returned directory)."""
    theirs = _wrap("peft")
    directory = str(tmp_path / "peft_adapter")
    theirs.save_pretrained(directory)
    ours = shira_dist.PeftModel.from_pretrained(tiny_llama(), directory, is_trainable=True)
    return {"shira_dist": ours, "peft": theirs}, directory


def _logits(model, ids) -> torch.Tensor:
    model.eval()
    with torch.no_grad():
        return model(input_ids=ids).logits


def _values(model, adapter: str = "default") -> dict[str, nn.Parameter]:
    return {n: p for n, p in model.named_parameters() if n.endswith(f".shira_weight.{adapter}")}


def _files(directory) -> set[str]:
    """What a save wrote (PEFT also writes a README.md model card, which is not compared)."""
    if not os.path.isdir(directory):
        return set()
    return {os.path.relpath(os.path.join(root, f), directory) for root, _, files in os.walk(directory)
            for f in files if f != "README.md"}


def test_save_pretrained_keywords(tmp_path):
    """is_main_process=False writes nothing; safe_serialization=False (with a save_function)
    writes adapter_model.bin; selected_adapters writes only those (others in subfolders)."""
    written = {}
    for library in LIBRARIES:
        model = _wrap(library)
        model.add_adapter("other", _config(library, random_seed=1))
        root = tmp_path / library
        model.save_pretrained(str(root / "not_main"), is_main_process=False, safe_serialization=True)
        model.save_pretrained(str(root / "bin"), safe_serialization=False, save_function=torch.save,
                              selected_adapters=["default"])
        model.save_pretrained(str(root / "safe"), safe_serialization=True, selected_adapters=["default"])
        model.save_pretrained(str(root / "other"), selected_adapters=["other"])
        written[library] = {d: _files(root / d) for d in ("not_main", "bin", "safe", "other")}
        saved = torch.load(root / "bin" / "adapter_model.bin", weights_only=True)
        safe = peft.utils.load_peft_weights(str(root / "safe"))
        assert saved.keys() == safe.keys() and all(torch.equal(saved[k], safe[k]) for k in saved)
    assert written["shira_dist"] == written["peft"], written
    assert written["peft"] == {"not_main": set(), "bin": {"adapter_config.json", "adapter_model.bin"},
                               "safe": {"adapter_config.json", "adapter_model.safetensors"},
                               "other": {"other/adapter_config.json", "other/adapter_model.safetensors"}}


@pytest.mark.parametrize("is_trainable", [True, False])
def test_from_pretrained_keywords(tmp_path, is_trainable):
    """from_pretrained(torch_device=, low_cpu_mem_usage=, config=, is_trainable=,
    autocast_adapter_dtype=) in both libraries: same outputs, same trainability."""
    models, directory = _same_adapter(tmp_path)
    ids = torch.randint(0, 101, (2, 7), generator=torch.Generator().manual_seed(0))
    loaded = {}
    for library in LIBRARIES:
        config_cls = type(_config(library))
        loaded[library] = _peft_model_cls(library).from_pretrained(
            tiny_llama(), directory, torch_device="cpu", low_cpu_mem_usage=False,
            config=config_cls.from_pretrained(directory), is_trainable=is_trainable, autocast_adapter_dtype=True)
        values = _values(loaded[library])
        assert len(values) == 4 and all(p.requires_grad == is_trainable for p in values.values()), library
    torch.testing.assert_close(_logits(loaded["shira_dist"], ids), _logits(loaded["peft"], ids), rtol=0, atol=ATOL)
    torch.testing.assert_close(_logits(loaded["peft"], ids), _logits(models["peft"], ids), rtol=0, atol=ATOL)


@pytest.mark.parametrize("is_trainable", [True, False])
def test_load_adapter_keywords(tmp_path, is_trainable):
    """load_adapter(dir, name, is_trainable=) adds a second adapter in both libraries, trainable
    as asked; once active, both compute the same outputs."""
    models, directory = _same_adapter(tmp_path)
    ids = torch.randint(0, 101, (2, 7), generator=torch.Generator().manual_seed(0))
    outputs = {}
    for library in LIBRARIES:
        model = _wrap(library, random_seed=5)
        model.load_adapter(directory, "other", is_trainable=is_trainable)
        assert all(p.requires_grad == is_trainable for p in _values(model, "other").values()), library
        assert sorted(model.peft_config) == ["default", "other"]
        model.set_adapter("other")
        outputs[library] = _logits(model, ids)
    torch.testing.assert_close(outputs["shira_dist"], outputs["peft"], rtol=0, atol=ATOL)
    torch.testing.assert_close(outputs["peft"], _logits(models["peft"], ids), rtol=0, atol=ATOL)


def test_merge_and_unload_and_unload(tmp_path):
    """merge_and_unload(progressbar=True, safe_merge=True) returns the plain transformers model
    computing the adapter's outputs; unload() returns it computing the base model's."""
    ids = torch.randint(0, 101, (2, 7), generator=torch.Generator().manual_seed(0))
    base_logits = _logits(tiny_llama(), ids)
    merged = {}
    for library in LIBRARIES:
        models, _ = _same_adapter(tmp_path / library)
        adapter_logits = _logits(models[library], ids)
        plain = models[library].merge_and_unload(progressbar=True, safe_merge=True)
        assert type(plain).__name__ == "LlamaForCausalLM" and not any("shira" in n for n, _ in plain.named_modules())
        merged[library] = _logits(plain, ids)
        torch.testing.assert_close(merged[library], adapter_logits, rtol=0, atol=ATOL)
        models, _ = _same_adapter(tmp_path / f"{library}_unload")
        plain = models[library].unload()
        assert type(plain).__name__ == "LlamaForCausalLM"
        assert torch.equal(_logits(plain, ids), base_logits), library
    torch.testing.assert_close(merged["shira_dist"], merged["peft"], rtol=0, atol=ATOL)


def test_get_base_layer_and_adapter_layer_switches():
    """layer.get_base_layer() is the wrapped nn.Linear; base_model.disable_adapter_layers()
    gives the base model's outputs and enable_adapter_layers() the adapter's again."""
    ids = torch.randint(0, 101, (2, 7), generator=torch.Generator().manual_seed(0))
    base = tiny_llama()
    base_logits = _logits(base, ids)
    for library in LIBRARIES:
        model = _wrap(library)
        layer = model.base_model.model.model.layers[0].self_attn.q_proj
        inner = layer.get_base_layer()
        assert type(inner) is nn.Linear and torch.equal(inner.weight, base.model.layers[0].self_attn.q_proj.weight)
        adapter_logits = _logits(model, ids)
        assert not torch.allclose(adapter_logits, base_logits), library
        model.base_model.disable_adapter_layers()
        assert torch.equal(_logits(model, ids), base_logits), library
        model.base_model.enable_adapter_layers()
        assert torch.equal(_logits(model, ids), adapter_logits), library


def _statuses(model) -> tuple[list, object]:
    return model.get_layer_status(), model.get_model_status()


_LAYER_FIELDS = ("enabled", "active_adapters", "merged_adapters", "available_adapters", "requires_grad", "devices")
_MODEL_FIELDS = ("base_model_type", "adapter_model_type", "peft_types", "trainable_params", "total_params",
                 "num_adapter_layers", "enabled", "active_adapters", "merged_adapters", "requires_grad",
                 "available_adapters", "devices", "quantization_backend")


def test_layer_and_model_status():
    """get_layer_status() / get_model_status(): PEFT's dataclasses with the same values, for a
    second (inactive, frozen) adapter and with the adapter layers disabled too."""
    seen = {}
    for library in LIBRARIES:
        model = _wrap(library)
        model.add_adapter("other", _config(library, random_seed=1))
        layers, status = _statuses(model)
        model.base_model.disable_adapter_layers()
        disabled_layers, disabled = _statuses(model)
        seen[library] = ([{f: getattr(s, f) for f in _LAYER_FIELDS} for s in layers],
                         {f: getattr(status, f) for f in _MODEL_FIELDS},
                         [s.enabled for s in disabled_layers], disabled.enabled)
    assert seen["shira_dist"] == seen["peft"]
    _, status, _, disabled = seen["peft"]
    assert status["requires_grad"] == {"default": True, "other": False} and disabled is False


def test_layer_status_names_match_peft():
    """TunerLayerStatus.name is the module's path as PEFT names it (under the tuner: ``model.<path>``)."""
    names = {library: [s.name for s in _wrap(library).get_layer_status()] for library in LIBRARIES}
    assert names["shira_dist"] == names["peft"], names


@pytest.mark.parametrize("modules_to_save", [None, ["lm_head"]])
def test_modules_to_save(modules_to_save):
    found = {library: _wrap(library, modules_to_save=modules_to_save).modules_to_save for library in LIBRARIES}
    assert found["shira_dist"] == found["peft"] == (None if modules_to_save is None else set(modules_to_save))


def test_parameter_and_state_dict_names():
    """The SHiRA value parameters have the same names in both libraries, as do all trainable
    parameters; shira_dist's state_dict() holds PEFT's keys plus each layer's indices (PEFT
    keeps them outside the state dict)."""
    ours, theirs = _wrap("shira_dist"), _wrap("peft")
    assert set(_values(ours)) == set(_values(theirs)) and len(_values(ours)) == 4
    assert {n for n, p in ours.named_parameters() if p.requires_grad} == \
           {n for n, p in theirs.named_parameters() if p.requires_grad}
    ours_keys, theirs_keys = set(ours.state_dict()), set(theirs.state_dict())
    assert theirs_keys <= ours_keys
    assert {k.replace(".shira_indices.", ".shira_weight.") for k in ours_keys - theirs_keys} == set(_values(ours))


def test_peft_state_dict_loads_into_shira_dist(tmp_path):
    """With the same masks, PEFT's whole state_dict() loads into the shira_dist model with no
    unexpected keys (missing: only the indices PEFT does not keep there), and both compute
    the same outputs after PEFT's values changed."""
    models, _ = _same_adapter(tmp_path)
    ours, theirs = models["shira_dist"], models["peft"]
    with torch.no_grad():
        for name, p in _values(theirs).items():
            p.copy_(torch.randn(p.shape, generator=torch.Generator().manual_seed(len(name))))
    result = ours.load_state_dict(theirs.state_dict(), strict=False)
    assert result.unexpected_keys == []
    assert result.missing_keys and all(".shira_indices." in k for k in result.missing_keys), result.missing_keys
    ids = torch.randint(0, 101, (2, 7), generator=torch.Generator().manual_seed(0))
    torch.testing.assert_close(_logits(ours, ids), _logits(theirs, ids), rtol=0, atol=ATOL)


def test_missing_keys_are_named_as_the_state_dict_names_them():
    """load_state_dict(strict=False) reports a missing pattern under its state_dict() key
    (``...shira_indices.<adapter>``), the key a caller can supply."""
    model = _wrap("shira_dist")
    without_indices = {k: v for k, v in model.state_dict().items() if ".shira_indices." not in k}
    missing = model.load_state_dict(without_indices, strict=False).missing_keys
    assert sorted(missing) == sorted(k for k in model.state_dict() if ".shira_indices." in k)


@pytest.mark.parametrize("autocast", [True, False])
def test_adapter_values_dtype_on_bf16_base(autocast):
    """On a bf16 base the adapter values are fp32 with autocast_adapter_dtype=True (the
    default), bf16 without, in both libraries."""
    for library in LIBRARIES:
        module = shira_dist if library == "shira_dist" else peft
        model = module.get_peft_model(tiny_llama(dtype=torch.bfloat16), _config(library),
                                      autocast_adapter_dtype=autocast)
        dtypes = {p.dtype for p in _values(model).values()}
        assert dtypes == {torch.float32 if autocast else torch.bfloat16}, (library, dtypes)


def test_missing_attribute_error_names_shira_dist_peft_model():
    """An attribute found nowhere raises AttributeError naming shira_dist's PeftModel (PEFT's
    names the innermost LlamaForCausalLM)."""
    with pytest.raises(AttributeError, match=r"^PeftModel \(shira_dist.*has no attribute 'no_such_thing'"):
        _wrap("shira_dist").no_such_thing
    with pytest.raises(AttributeError, match=r"'LlamaForCausalLM' object has no attribute 'no_such_thing'"):
        _wrap("peft").no_such_thing
