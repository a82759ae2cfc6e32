"""SHiRA on quantized base weights (CPU): torchao int8 weight-only, bitsandbytes int8 and nf4.

A SHiRA layer whose base weight is not a plain ``torch.Tensor``/``nn.Parameter`` (here torchao's
``Int8Tensor``, bitsandbytes' ``Int8Params`` and ``Params4bit``) must always run unfused: the
quantized base layer's own forward plus the sparse product. Training and inference work. Merging
(``merge_adapter``, ``merge_and_unload``) and ``set_fuse_mode("fused")`` would have to write into
the quantized weight, so they raise ``TypeError`` naming the layer's module path and the weight's
type, and leave the model exactly as it was (same outputs bit-for-bit, same state bit-for-bit, no
crash, never a silently dropped adapter).

The bases: a tiny Llama whose decoder linear layers are quantized (torchao: ``quantize_`` with
``Int8WeightOnlyConfig``; bitsandbytes: each ``nn.Linear`` replaced by ``Linear8bitLt``
(``has_fp16_weights=False, threshold=0.0``) or ``Linear4bit`` (nf4, fp32 compute) holding the same
weights; both subclass ``nn.Linear``). SHiRA targets q_proj and v_proj. The Llama is tiny but
64 wide rather than conftest's 32: on a CPU with AVX512-BF16, bitsandbytes' ``Linear4bit`` in eval
mode repacks its weight for a CPU kernel that needs in_features % 64 == 0 and out_features % 32 == 0
(with in_features 32 its forward fails inside bitsandbytes: "shape '[32, 0]' is invalid").

Tolerances: a SHiRA layer's output equals the same quantized layer's output with the adapter
disabled plus ``x @ S^T`` computed densely from the layer's indices and values, to rtol 1e-5 and
atol 1e-5 x max|reference| (fp32; only summation order differs). Failed calls must leave outputs
and state bit-identical (``torch.equal``).

The tests that call merge / fuse come last in this file: on code that writes into the quantized
tensor they can crash the process (torchao), so everything else reports first.
"""

from __future__ import annotations

import itertools
from typing import Callable

import pytest
import torch
from torch import nn

from shira_dist import PeftModel, ShiraConfig, ShiraLinear, get_peft_model

KINDS = ["torchao_int8", "bnb_int8", "bnb_nf4"]
# type(layer.base_layer.weight).__name__ for each kind of base
WEIGHT_TYPES = {"torchao_int8": "Int8Tensor", "bnb_int8": "Int8Params", "bnb_nf4": "Params4bit"}
RTOL = 1e-5
ATOL_REL = 1e-5  # absolute tolerance as a fraction of the reference's largest magnitude
Q_PATH = "layers.0.self_attn.q_proj"  # the first targeted layer in module order


def tiny_llama64(seed: int = 0) -> nn.Module:
    """A 2-layer Llama: q/o_proj 64x64, k/v_proj 32x64, gate/up 128x64, down 64x128 (fp32, eval)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = LlamaConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=2,
                      num_key_value_heads=1, vocab_size=101, max_position_embeddings=64)
    torch.manual_seed(seed)
    return LlamaForCausalLM(cfg).eval()


def _in_decoder(fqn: str) -> bool:
    return ".layers." in f".{fqn}"


def _bnb_linear(lin: nn.Linear, kind: str) -> nn.Module:
    """A bitsandbytes layer holding ``lin``'s weight (quantized when moved to a device)."""
    import bitsandbytes as bnb

    if kind == "bnb_int8":
        q = bnb.nn.Linear8bitLt(lin.in_features, lin.out_features, bias=lin.bias is not None,
                                has_fp16_weights=False, threshold=0.0)
        q.weight = bnb.nn.Int8Params(lin.weight.data.clone(), requires_grad=False, has_fp16_weights=False)
    else:
        q = bnb.nn.Linear4bit(lin.in_features, lin.out_features, bias=lin.bias is not None,
                              compute_dtype=torch.float32, quant_type="nf4")
        q.weight = bnb.nn.Params4bit(lin.weight.data.clone(), requires_grad=False, quant_type="nf4")
    if lin.bias is not None:
        q.bias = nn.Parameter(lin.bias.data.clone(), requires_grad=False)
    return q.to("cpu")


def _quantized_llama(kind: str, which: Callable[[str], bool] = _in_decoder) -> nn.Module:
    """tiny_llama64() with the ``nn.Linear`` layers whose path satisfies ``which`` quantized (deterministic:
    two calls give bit-identical models)."""
    base = tiny_llama64()
    if kind == "torchao_int8":
        from torchao.quantization import Int8WeightOnlyConfig, quantize_

        quantize_(base, Int8WeightOnlyConfig(set_inductor_config=False),
                  filter_fn=lambda m, fqn: isinstance(m, nn.Linear) and which(fqn))
    else:
        for fqn, module in list(base.named_modules()):
            if type(module) is nn.Linear and which(fqn):
                parent_path, _, child = fqn.rpartition(".")
                setattr(base.get_submodule(parent_path), child, _bnb_linear(module, kind))
    # new modules start in training mode, and bitsandbytes' layers compute differently in each mode
    # on the CPU (int8, training: dequantized fp32 matmul; eval: int8 matmul of the input quantized
    # through fp16. nf4, eval without input grad: a bf16 kernel on a weight repacked in place), so
    # the whole model is put back in eval mode like tiny_llama64()'s
    return base.eval()


def _shira(kind: str, which: Callable[[str], bool] = _in_decoder, init_weights: bool = False):
    cfg = ShiraConfig(r=2, target_modules=["q_proj", "v_proj"], random_seed=0, init_weights=init_weights)
    return get_peft_model(_quantized_llama(kind, which), cfg)


def _layers(model) -> dict[str, ShiraLinear]:
    return {name: m for name, m in model.named_modules() if isinstance(m, ShiraLinear)}


def _layer(model, path: str) -> ShiraLinear:
    return model.get_base_model().model.get_submodule(path)


def _ids() -> torch.Tensor:
    return torch.randint(0, 101, (2, 9), generator=torch.Generator().manual_seed(1))


def _logits(model, ids) -> torch.Tensor:
    with torch.no_grad():
        return model(ids).logits


def _plain_parts(t: torch.Tensor) -> list[torch.Tensor]:
    """Plain tensors holding every bit of ``t`` (a torchao tensor subclass is flattened into its
    inner tensors; bitsandbytes parameters are plain storage under a Parameter subclass)."""
    if type(t) not in (torch.Tensor, nn.Parameter) and hasattr(type(t), "__tensor_flatten__"):
        names, _ = t.__tensor_flatten__()
        return [p for n in names if getattr(t, n) is not None for p in _plain_parts(getattr(t, n))]
    return [t.detach().clone()]


def _snapshot(model) -> dict[str, list[torch.Tensor]]:
    """Every tensor the model computes with, as plain tensors: parameters and buffers, plus the
    quantization state bitsandbytes keeps outside them (int8: the weight's CB/SCB, moved to the
    module's ``state`` by its first forward; 4-bit: the weight's QuantState). Not ``state_dict()``:
    on an AVX512-BF16 CPU, bitsandbytes' 4-bit layer un-packs its weight in place while saving
    (after an eval-mode forward packed it), which changes the next outputs. Compare two snapshots
    only when both were taken after a forward in the same mode."""
    out = {n: _plain_parts(t) for n, t in itertools.chain(model.named_parameters(), model.named_buffers())}
    for name, module in model.named_modules():
        extra = []
        state = getattr(module, "state", None)
        if type(state).__name__ == "MatmulLtState":
            extra += [state.CB, state.SCB]
        weight = getattr(module, "weight", None)
        extra += [getattr(weight, "CB", None), getattr(weight, "SCB", None)]
        quant_state = getattr(weight, "quant_state", None)
        while quant_state is not None:
            extra += [v for v in vars(quant_state).values() if isinstance(v, torch.Tensor)]
            quant_state = getattr(quant_state, "state2", None)
        extra = [t.detach().clone() for t in extra if t is not None]
        if extra:
            out[f"{name}.<bitsandbytes state>"] = extra
    return out


def _assert_same_state(before: dict, after: dict) -> None:
    assert before.keys() == after.keys()
    for k in before:
        assert len(before[k]) == len(after[k]) and all(
            a.dtype == b.dtype and torch.equal(a, b) for a, b in zip(before[k], after[k])), f"{k} changed"


def _dense_delta(layer: ShiraLinear) -> torch.Tensor:
    """S (out, in) built densely from the stored (2, nnz) indices and the values, times the scale."""
    idx = layer.shira_indices["default"].long()
    values = layer.shira_weight["default"].detach()
    assert idx.shape == (2, 2 * (layer.in_features + layer.out_features))
    dense = torch.zeros(layer.out_features, layer.in_features, dtype=values.dtype)
    dense[idx[0], idx[1]] = values
    return dense * layer.scaling["default"]


def _assert_matches_dense_reference(model, path: str) -> None:
    """layer(x) == (same quantized layer, adapter disabled)(x) + x @ S^T, without autograd
    (inference) and with x requiring grad (the training path; bitsandbytes may take another kernel)."""
    layer = _layer(model, path)
    x = torch.randn(2, 5, layer.in_features, generator=torch.Generator().manual_seed(2))
    delta = _dense_delta(layer)
    for grad in (False, True):
        xi = x.clone().requires_grad_(grad)
        with torch.set_grad_enabled(grad):
            with model.disable_adapter():
                base_out = layer(xi).detach()
            out = layer(xi).detach()
        reference = base_out + x @ delta.T
        atol = ATOL_REL * reference.abs().max().item()
        assert not torch.allclose(base_out, reference, rtol=0, atol=100 * atol)  # the adapter matters here
        torch.testing.assert_close(out, reference, rtol=RTOL, atol=atol, msg=lambda m: f"grad={grad}: {m}")


# ---- the quantized layers themselves ------------------------------------------------------


@pytest.mark.parametrize("kind", ["bnb_int8", "bnb_nf4"])
def test_bnb_layer_runs_on_this_cpu_build(kind):
    """Precondition: this bitsandbytes build runs ``Linear8bitLt`` / ``Linear4bit`` (64 -> 32) on the
    CPU, forward in training and eval mode (close to the fp32 layer: 2% / 20% of the output scale
    for int8 / nf4) and backward with respect to the input, and the layer is an ``nn.Linear`` (so
    SHiRA can target it)."""
    torch.manual_seed(0)
    lin = nn.Linear(64, 32, bias=False)
    q = _bnb_linear(lin, kind)
    assert isinstance(q, nn.Linear) and (q.in_features, q.out_features) == (64, 32)
    assert type(q.weight).__name__ == WEIGHT_TYPES[kind]
    tol = 0.02 if kind == "bnb_int8" else 0.2
    x = torch.randn(3, 64)
    # backward first: once the nf4 layer has run an eval-mode forward without input grad on an
    # AVX512-BF16 CPU, it has repacked its weight and its forward no longer passes gradients to
    # the input (bitsandbytes' gemv_4bit has no autograd kernel; x.grad stays None, with a warning)
    q.train()
    xg = x.clone().requires_grad_(True)
    q(xg).sum().backward()
    assert xg.grad is not None and torch.isfinite(xg.grad).all() and xg.grad.abs().sum() > 0
    for training in (True, False):
        q.train(training)
        with torch.no_grad():
            y, ref = q(x), lin(x)
        assert y.shape == ref.shape and y.dtype == torch.float32
        torch.testing.assert_close(y, ref, rtol=0, atol=tol * ref.abs().max().item())


# ---- forward, training, inference ---------------------------------------------------------


@pytest.mark.parametrize("kind", KINDS)
def test_shira_on_quantized_base_matches_dense_reference(kind):
    """Adapters attach to quantized layers (weight type as expected, pattern r*(in+out) entries of
    the (out, in) weight); the model's forward runs; and one layer's output equals the same
    quantized layer's output with the adapter disabled plus x @ S^T built densely from
    ``shira_indices``/``shira_weight`` (rtol 1e-5, atol 1e-5 x scale), with and without autograd."""
    model = _shira(kind)
    layers = _layers(model)
    assert len(layers) == 4
    for layer in layers.values():
        assert type(layer.base_layer.weight).__name__ == WEIGHT_TYPES[kind]
    ids = _ids()
    y = _logits(model, ids)
    with model.disable_adapter():
        y_base = _logits(model, ids)
    assert torch.isfinite(y).all() and not torch.allclose(y, y_base)
    _assert_matches_dense_reference(model, Q_PATH)
    _assert_matches_dense_reference(model, "layers.1.self_attn.v_proj")


def test_quantized_then_wrapped_model_converts_with_to():
    """Quantize, then wrap (the usual order): ``.to()`` still converts the model (torch swaps a
    tensor subclass in place, which a weak reference to it would block) and outputs stay equal."""
    model = _shira("torchao_int8")
    ids = _ids()
    y = _logits(model, ids)
    model.to(torch.float32)
    torch.testing.assert_close(_logits(model, ids), y, rtol=0, atol=0)


@pytest.mark.parametrize("kind", KINDS)
def test_training_on_quantized_base(kind, tmp_path):
    """A few fused-AdamW steps (lr 1e-2) on a quantized base: gradients reach the SHiRA values, the
    loss goes down, the values change, the quantized base stays bit-identical; afterwards the dense
    reference still holds, and the saved adapter on a fresh quantized base gives the same logits
    (rtol 1e-5, atol 1e-5 x scale)."""
    model = _shira(kind, init_weights=True)
    ids = _ids()
    model.train()
    with torch.no_grad():
        model(ids)  # bitsandbytes int8 moves its quantization state on the first forward
    base_before = {k: v for k, v in _snapshot(model).items() if "shira_weight" not in k}
    values_before = {n: l.shira_weight["default"].detach().clone() for n, l in _layers(model).items()}
    params = [p for p in model.parameters() if p.requires_grad]
    assert len(params) == 4
    opt = torch.optim.AdamW(params, lr=1e-2, fused=True)
    losses = []
    for _ in range(5):
        loss = model(ids, labels=ids).loss
        loss.backward()
        assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in params)
        opt.step()
        opt.zero_grad()
        losses.append(loss.item())
    # (read before any eval-mode forward: bitsandbytes' nf4 layer then repacks its own weight)
    _assert_same_state(base_before, {k: v for k, v in _snapshot(model).items() if "shira_weight" not in k})
    model.eval()
    final = model(ids, labels=ids).loss.item()
    assert final < losses[0] and losses[-1] < losses[0], losses + [final]
    for name, layer in _layers(model).items():
        assert not torch.equal(layer.shira_weight["default"], values_before[name]), name
    _assert_matches_dense_reference(model, Q_PATH)

    model.save_pretrained(str(tmp_path / "adapter"))
    reloaded = PeftModel.from_pretrained(_quantized_llama(kind), str(tmp_path / "adapter"))
    y, y_reloaded = _logits(model, ids), _logits(reloaded, ids)
    torch.testing.assert_close(y_reloaded, y, rtol=RTOL, atol=ATOL_REL * y.abs().max().item())


# ---- merge / fuse are refused, and change nothing ----------------------------------------

CALLS = {
    "merge_adapter": lambda m: m.merge_adapter(),
    "merge_and_unload": lambda m: m.merge_and_unload(),
    "set_fuse_mode_fused": lambda m: m.set_fuse_mode("fused"),
}


def _assert_refused_and_unchanged(model, call: str, path: str, weight_type: str) -> None:
    ids = _ids()
    y = _logits(model, ids)
    state = _snapshot(model)
    layers = _layers(model)
    with pytest.raises(TypeError) as err:
        CALLS[call](model)
    message = str(err.value)
    assert path in message, f"the message should name the layer {path!r}: {message!r}"
    assert weight_type in message, f"the message should name the weight's type {weight_type!r}: {message!r}"
    assert _layers(model) == layers  # every SHiRA wrapper still in place (merge_and_unload replaced nothing)
    merged = [name for name, layer in layers.items() if layer.merged]
    assert not merged, f"layers merged by the refused call: {merged}"
    assert torch.equal(_logits(model, ids), y), "outputs changed after the refused call"
    _assert_same_state(state, _snapshot(model))


@pytest.mark.parametrize("call", list(CALLS))
@pytest.mark.parametrize("kind", KINDS)
def test_merge_or_fuse_on_quantized_base_raises_type_error(kind, call):
    """``merge_adapter()``, ``merge_and_unload()`` and ``set_fuse_mode("fused")`` on a model whose
    targeted layers are all quantized raise ``TypeError`` naming the first layer's path
    ("layers.0.self_attn.q_proj") and its weight type, and leave the model exactly as it was:
    SHiRA wrappers in place, nothing merged, outputs and state bit-identical."""
    _assert_refused_and_unchanged(_shira(kind), call, Q_PATH, WEIGHT_TYPES[kind])


@pytest.mark.parametrize("call", list(CALLS))
@pytest.mark.parametrize("kind", KINDS)
def test_merge_or_fuse_with_some_quantized_layers_changes_nothing(kind, call):
    """Only the v_proj layers are quantized; the plain q_proj layers come first in module order and
    could be merged/fused on their own. The call still raises ``TypeError`` (naming
    "layers.0.self_attn.v_proj" and its weight type) before changing anything: no plain layer is
    merged, state and outputs are bit-identical."""
    model = _shira(kind, which=lambda fqn: fqn.endswith("v_proj"))
    assert type(_layer(model, Q_PATH).base_layer.weight) is nn.Parameter
    _assert_refused_and_unchanged(model, call, "layers.0.self_attn.v_proj", WEIGHT_TYPES[kind])
