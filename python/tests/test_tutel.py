# ===- test_tutel.py - flexmoe.moe_layer takes Tutel's arguments ---------=== #
#
# Part of Flex, an MLIR-based compiler and runtime for Mixture-of-Experts.
#
# ===----------------------------------------------------------------------=== #
#
# Tutel's constructor and forward arguments translated to Flex's layer, the
# cases where Tutel is lenient (warnings, Tutel's result), and the arguments
# Flex cannot honour (errors naming them).
#
# ===----------------------------------------------------------------------=== #

import json

import pytest
import torch
import torch.nn.functional as F

import flexmoe
from flexmoe.tutel import activation_name, global_experts
from reference import rel_l2
from test_layer import check_against_reference


def tutel(k=2, count=4, h=24, d=16, gate=None, experts=None, **kw):
    gate_type = {"type": "top", "k": k, **(gate or {})}
    experts = {"type": "ffn", "count_per_node": count,
               "hidden_size_per_expert": h, **(experts or {})}
    layer = flexmoe.moe_layer(gate_type=gate_type, model_dim=d,
                              experts=experts, **kw)
    with torch.no_grad():
        layer.wg.mul_(4.0)
    return layer


def test_translation():
    layer = tutel(k=2, gate={"capacity_factor": 1.5, "fp32_gate": True,
                             "gate_noise": 0.5},
                  experts={"activation_fn": lambda x: F.gelu(x)},
                  batch_prioritized_routing=True, normalize_gate=False)
    assert (layer.num_experts, layer.top_k, layer.capacity_factor) == (4, 2,
                                                                       1.5)
    assert layer.activation == "gelu" and layer.bias  # Tutel: biases on
    assert layer.fp32_router and layer.wg.dtype == torch.float32
    assert layer.gate_noise == 0.5 and not layer.normalize
    assert layer.batch_prioritized and not layer.gated
    assert layer.num_global_experts == 4
    assert getattr(layer.w1, "_tutel_expert", False)
    # Tutel's defaults: k 1... normalize_gate on, relu, biases, no noise.
    plain = flexmoe.moe_layer(gate_type="Top2Gate", model_dim=16,
                              experts={"type": "ffn",
                                       "num_experts_per_device": 3,
                                       "hidden_size_per_expert": 8})
    assert (plain.top_k, plain.num_experts, plain.activation) == (2, 3,
                                                                   "relu")
    assert plain.normalize and plain.bias and plain.gate_noise == 0.0


@pytest.mark.parametrize("factor", [1.0, 0.5, 0.0, -0.75],
                         ids=["fixed", "dropping", "dropless", "bounded"])
def test_matches_reference_and_returns_l_aux(factor):
    layer = tutel(k=2, gate={"capacity_factor": factor}).eval()
    x = torch.randn(37, 16)
    y = check_against_reference(layer, x, torch.float32)
    with torch.no_grad():
        out = layer(x.view(1, 37, 16))
    assert out.shape == (1, 37, 16)
    assert out.l_aux is layer.l_aux and out.l_aux.shape == ()
    assert rel_l2(out.view(37, 16), y) <= 1e-6


def test_input_cast_and_result_func():
    layer = tutel(k=1, result_func=lambda y: y * 2)
    x = torch.randn(3, 5, 16, dtype=torch.float64)
    with torch.no_grad():
        y = layer(x)
        ref = layer.run_flat(x.reshape(15, 16).float())[0]
    assert y.dtype == torch.float64  # back to the input's dtype, as Tutel
    assert rel_l2(y.reshape(15, 16), 2 * ref) <= 1e-6


def test_top_k_above_experts_is_clamped():
    with pytest.warns(UserWarning, match="top_k 6 is above the 4 experts"):
        layer = tutel(k=6)
    assert layer.top_k == 4
    check_against_reference(layer, torch.randn(20, 16), torch.float32)
    with pytest.warns(UserWarning, match="clamped"):
        layer(torch.randn(20, 16), top_k=9)


def test_zero_slots_drop_every_token_as_tutel():
    # k * int(0.1 * ceil(8 / 4)) = 0: Tutel drops every token.
    layer = tutel(k=2, gate={"capacity_factor": 0.1})
    x = torch.randn(8, 16, requires_grad=True)
    with pytest.warns(UserWarning, match="gives 0 slots"):
        y = layer(x)
    assert torch.equal(y, torch.zeros_like(y))
    logits = x.detach().double() @ layer.wg.detach().double()
    scores = torch.softmax(logits, dim=1)
    frac = F.one_hot(scores.argmax(1), 4).double().mean(0)
    assert abs(float(y.l_aux) - float(4 * (scores.mean(0) * frac).sum())) < 1e-5
    (y.sum() + y.l_aux).backward()  # only l_aux reaches the gate
    assert layer.wg.grad is not None and layer.w1.grad is None
    # Bounded too; more tokens give slots again, and Flex runs.
    with pytest.warns(UserWarning, match="gives 0 slots"):
        layer(torch.randn(8, 16), capacity_factor=-0.1)
    assert layer(torch.randn(400, 16), capacity_factor=0.1).abs().sum() > 0


def test_per_call_arguments():
    layer = tutel(k=2, gate={"capacity_factor": 1.0})
    x = torch.randn(30, 16)
    with torch.no_grad():
        base = layer(x)
        # Tutel: capacity_factor=0 (or None) in forward means the gate's.
        assert torch.equal(layer(x, capacity_factor=0), base)
        dropless = layer(x, capacity_factor=0.0001 * 0 - 0.0)  # still 0
        assert torch.equal(dropless, base)
        other = layer(x, capacity_factor=0.25)
        assert not torch.equal(other, base)
        one = layer(x, top_k=1)
        assert not torch.equal(one, base)
        # One rank: the variant arguments change nothing.
        same = layer(x, a2a_ffn_overlap_degree=2, adaptive_r=1,
                     megablocks_size=4, inequivalent_tokens=True)
        assert torch.equal(same, base)


def test_llama_ffn_is_swiglu():
    layer = flexmoe.moe_layer(gate_type={"type": "top", "k": 2},
                              model_dim=16,
                              experts={"type": "llama_ffn",
                                       "count_per_node": 4,
                                       "hidden_size_per_expert": 24})
    assert layer.gated and layer.w3 is not None and layer.b1 is None
    with torch.no_grad():
        layer.wg.mul_(4.0)
    check_against_reference(layer, torch.randn(25, 16), torch.float32)


def test_scan_expert_func_and_seeds():
    seen = []
    a = tutel(scan_expert_func=lambda n, p: seen.append(n), seeds=(1, 2, 3))
    b = tutel(seeds=(1, 2, 3))
    assert seen == ["w1", "w2", "b1", "b2"]
    for n, p in a.named_parameters():
        assert torch.equal(p, dict(b.named_parameters())[n]), n


@pytest.mark.parametrize("kwargs,message", [
    (dict(experts={"type": "custom", "module": torch.nn.Linear}),
     "experts type 'custom'"),
    (dict(experts={"activation_fn": lambda x: x * 2}),
     "computes none of relu"),
    (dict(experts={"activation_fn_with_self": lambda x, s: x}),
     "activation_fn_with_self"),
    (dict(experts={"has_fc1_bias": False}), "has_fc1_bias=False"),
    (dict(experts={"output_dim": 8}), "output_dim"),
    (dict(is_gshard_loss=False), "is_gshard_loss=False"),
    (dict(is_postscore=False), "is_postscore=False"),
    (dict(gate={"type": "cosine_top"}), "gate_type type 'cosine_top'"),
    (dict(experts={"type": "llama_ffn", "activation_fn": F.relu}),
     "llama_ffn with activation relu"),
], ids=["custom-expert", "custom-activation", "activation-with-self",
        "one-bias", "output-dim", "load-importance-loss", "prescore",
        "cosine-gate", "llama-relu"])
def test_unsupported_arguments_name_themselves(kwargs, message):
    with pytest.raises(NotImplementedError, match=message):
        tutel(**kwargs)


def test_unrecognized_arguments():
    with pytest.raises(ValueError, match=r"unrecognized argument\(s\) "
                       r"\['fancy'\]"):
        tutel(fancy=1)
    with pytest.raises(ValueError, match="gate_type argument"):
        tutel(gate={"temperature": 2})
    with pytest.raises(NotImplementedError, match="several gates"):
        flexmoe.moe_layer(gate_type=[{"type": "top", "k": 1}] * 2,
                          model_dim=16, experts={"type": "ffn",
                                                 "hidden_size_per_expert": 8})
    with pytest.warns(UserWarning, match="pad_samples"):
        tutel(pad_samples=True)


def test_expert_counts_and_sharding():
    assert global_experts(2, 4) == 8
    assert global_experts(-2, 4) == 2  # two ranks share each expert
    assert global_experts(-1, 4) == 4
    # Built for 4 ranks on one process (the communicator waits for the
    # first forward): rank 3 holds shard 1 of expert 1.
    layer = tutel(k=1, count=-2, world_size=4, rank=3,
                  parallel_type="adaptive:2")
    assert (layer.num_experts, layer.shards, layer.shard) == (2, 2, 1)
    assert tuple(layer.w1.shape) == (1, 16, 12)
    assert tuple(layer.b2.shape) == (1, 16) and tuple(layer.wg.shape) == (16,
                                                                          2)
    assert layer.variants[0] == "r2d1"
    state = layer.state_dict()["_extra_state"]
    assert (state["world_size"], state["rank"], state["first_expert"]) == (4,
                                                                           3,
                                                                           1)
    with pytest.raises(ValueError, match="adaptive degree 3"):
        tutel(k=1, count=-4, world_size=4, rank=0,
              parallel_type="adaptive:3")


def test_activation_probe():
    assert activation_name(None) == "relu"
    assert activation_name(torch.relu) == "relu"
    assert activation_name(torch.nn.GELU()) == "gelu"
    assert activation_name(lambda x: x * torch.sigmoid(x)) == "silu"
    with pytest.raises(NotImplementedError):
        activation_name(torch.nn.GELU(approximate="tanh"))


def test_use_2dh_groups_the_ranks_of_a_node(monkeypatch):
    """use_2dh compiles the hierarchical exchange for nodes of
    LOCAL_WORLD_SIZE ranks (every all_to_all of the plan carries
    ranks_per_node); on one node it warns and keeps the flat one."""
    from flexmoe import _compiler
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "2")
    layer = tutel(k=2, count=2, world_size=4, rank=1, use_2dh=True)
    assert layer.ranks_per_node == 2
    spec = layer.spec(32, True)
    assert "ranks_per_node=2" in spec.pipeline()
    plan = json.loads(_compiler.plans.get(spec).text)
    exchanges = [s for v in plan["variants"]
                 for s in v["forward"] + v["backward"]
                 if s["op"] == "all_to_all"]
    assert exchanges and all(s["attrs"]["ranks_per_node"] == 2
                               for s in exchanges)
    flat = tutel(k=2, count=2, world_size=4, rank=1)
    plan = json.loads(_compiler.plans.get(flat.spec(32, True)).text)
    assert all(s["attrs"]["ranks_per_node"] == 0 for v in plan["variants"]
               for s in v["forward"] if s["op"] == "all_to_all")
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "4")
    with pytest.warns(UserWarning, match="use_2dh on 4 rank"):
        one_node = tutel(k=2, count=2, world_size=4, rank=1, use_2dh=True)
    assert one_node.ranks_per_node == 0
    with pytest.raises(ValueError, match="must divide the world size 4"):
        flexmoe.MoELayer(16, 24, 8, world_size=4, rank=0, ranks_per_node=3)
