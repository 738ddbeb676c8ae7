# ===- test_checkpoint.py - Checkpoints across world sizes, from Tutel ---=== #
#
# Part of Flex, an MLIR-based compiler and runtime for Mixture-of-Experts.
#
# ===----------------------------------------------------------------------=== #
#
# state_dict round trips; W -> W' conversion (flexmoe.checkpoint and its
# command line) and Tutel import, each checked by outputs before and after:
#
# - a W-rank checkpoint cannot run here (CPU ranks have no communicator from
#   PyTorch), so its function is evaluated from the ranks' own slices in
#   plain PyTorch (`sharded_experts`: E >= W whole experts per rank; E < W
#   the sum of an expert's shards plus the mean of their b2, what fc2's
#   bias_scale 1/s adds), and compared with the one-rank flexmoe layer of
#   the gathered checkpoint, before and after conversion;
# - a Tutel checkpoint is built by hand in Tutel's layouts and evaluated in
#   plain PyTorch from Tutel's tensors (`tutel_experts`, Tutel's formulas:
#   x @ fc1_w.T, y @ fc2_w, the fc2 bias slices gathered, llama's flat
#   pieces), and compared with the imported flexmoe.moe_layer.
#
# Routing is dropless (capacity factor 0), so the plain evaluation needs no
# slot order: out = sum over the k choices of gate * expert(x).
#
# ===----------------------------------------------------------------------=== #

import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

import flexmoe
from flexmoe import checkpoint as ckpt
from flexmoe.checkpoint import CheckpointError
from reference import NORMALIZE_EPS, rel_l2

D, H = 16, 24
PYTHON_DIR = Path(flexmoe.__file__).resolve().parents[1]


def plain_moe(x, wg_t, experts, k, normalize=True):
    """Dropless top-k MoE in float64: wg_t [d, E], experts[e](x) -> [T, d].
    Returns (out, l_aux) ([loss-1])."""
    x = x.double()
    scores = torch.softmax(x @ wg_t.double(), dim=1)
    E = scores.shape[1]
    idx = torch.argsort(-scores, dim=1, stable=True)[:, :k]
    g = scores.gather(1, idx)
    if normalize and k > 1:
        g = g / g.sum(1, keepdim=True).clamp(min=NORMALIZE_EPS)
    ys = torch.stack([f(x) for f in experts])  # [E, T, d]
    T = x.shape[0]
    out = sum(g[:, j:j + 1] * ys[idx[:, j], torch.arange(T)]
              for j in range(k))
    frac = F.one_hot(idx[:, 0], E).double().mean(0)
    return out, E * (scores.mean(0) * frac).sum()


def _ffn(w1, w2, w3=None, b1=None, b2=None, act="relu"):
    fn = {"relu": F.relu, "gelu": F.gelu, "silu": F.silu}[act]

    def run(x):
        h = x @ w1.double()
        if b1 is not None:
            h = h + b1.double()
        h = F.silu(h) * (x @ w3.double()) if w3 is not None else fn(h)
        y = h @ w2.double()
        return y + b2.double() if b2 is not None else y
    return run


def sharded_experts(states, prefix="", act="relu"):
    """The experts of a W-rank flexmoe checkpoint, from the ranks' slices."""
    extra = states[0][prefix + "_extra_state"]
    E, W = extra["num_experts"], len(states)
    get = lambda r, n, i: (states[r][prefix + n][i]  # noqa: E731
                           if prefix + n in states[r] else None)
    experts = []
    for e in range(E):
        if E >= W:
            L = E // W
            r, i = divmod(e, L)
            experts.append(_ffn(get(r, "w1", i), get(r, "w2", i),
                                get(r, "w3", i), get(r, "b1", i),
                                get(r, "b2", i), act))
            continue
        s = W // E
        parts = [_ffn(get(r, "w1", 0), get(r, "w2", 0), get(r, "w3", 0),
                      get(r, "b1", 0), None, act)
                 for r in range(e * s, (e + 1) * s)]
        b2 = [get(r, "b2", 0) for r in range(e * s, (e + 1) * s)]
        mean_b2 = (torch.stack([b.double() for b in b2]).mean(0)
                   if b2[0] is not None else 0.0)
        experts.append(lambda x, parts=parts, b=mean_b2:
                       sum(p(x) for p in parts) + b)
    return experts


def rank_states(E, W, gated=False, bias=True, dtype=torch.float32):
    """A W-rank checkpoint of independently initialized rank layers (the
    shared gate copied from rank 0, as data parallelism keeps it)."""
    kw = dict(top_k=2, capacity_factor=0.0, bias=bias, gated=gated,
              activation="silu" if gated else "relu", dtype=dtype)
    layers = [flexmoe.MoELayer(D, H, E, world_size=W, rank=r, **kw)
              for r in range(W)]
    with torch.no_grad():
        layers[0].wg.mul_(4.0)  # fewer near-ties in routing
        for layer in layers:
            layer.wg.copy_(layers[0].wg)
            if bias:
                layer.b1.normal_()
                layer.b2.normal_()
        if bias and E < W:  # the shard ranks of an expert share its b2
            for r, layer in enumerate(layers):
                layer.b2.copy_(layers[r - r % (W // E)].b2)
    return [layer.state_dict() for layer in layers], kw


def one_rank_output(state, kw, x):
    E = state["_extra_state"]["num_experts"]
    layer = flexmoe.MoELayer(D, H, E, **kw)
    layer.load_state_dict(state)
    with torch.no_grad():
        return layer(x)


def test_round_trip(tmp_path):
    for kw in (dict(bias=True, activation="gelu"),
               dict(gated=True, activation="silu", dtype=torch.bfloat16)):
        layer = flexmoe.MoELayer(D, H, 4, top_k=2, **kw)
        torch.save(layer.state_dict(), tmp_path / "layer.pt")
        other = flexmoe.MoELayer(D, H, 4, top_k=2, **kw)
        other.load_state_dict(torch.load(tmp_path / "layer.pt"))
        x = torch.randn(20, D).to(other.dtype)
        with torch.no_grad():
            assert torch.equal(layer(x)[0], other(x)[0])


# (E, W, W's to convert to): whole experts, and sharded ones (E < W).
CONVERSIONS = [(8, 4, (1, 2, 8, 16)), (4, 1, (2, 4, 8)), (2, 4, (1, 2, 8))]


@pytest.mark.parametrize("E,W,targets", CONVERSIONS,
                         ids=["E8-W4", "E4-W1", "E2-W4-sharded"])
@pytest.mark.parametrize("gated", [False, True], ids=["ffn-bias", "swiglu"])
def test_convert_world_sizes(E, W, targets, gated):
    states, kw = rank_states(E, W, gated=gated, bias=not gated)
    act = kw["activation"]
    full = ckpt.gather(states)
    # The gathered experts are the ranks' slices put together.
    if E >= W:
        assert torch.equal(full["w1"], torch.cat([s["w1"] for s in states]))
    else:
        s = W // E
        assert torch.equal(full["w1"][1], torch.cat(
            [states[r]["w1"][0] for r in range(s, 2 * s)], 1))
        assert torch.equal(full["w2"][0], torch.cat(
            [states[r]["w2"][0] for r in range(s)], 0))
    x = torch.randn(40, D)
    y, l_aux = one_rank_output(full, kw, x)
    ref, ref_l = plain_moe(x, full["wg"], sharded_experts(states, act=act),
                           k=2)
    assert rel_l2(y, ref) <= 1e-5
    assert abs(float(l_aux) - float(ref_l)) <= 1e-5
    for W2 in targets:
        converted = ckpt.convert(states, W2)
        assert len(converted) == W2
        for r, state in enumerate(converted):  # each loads on its rank
            layer = flexmoe.MoELayer(D, H, E, world_size=W2, rank=r, **kw)
            layer.load_state_dict(state)
        out, _ = plain_moe(x, full["wg"],
                           sharded_experts(converted, act=act), k=2)
        assert rel_l2(out, ref) <= 1e-12, f"W' {W2}"
        back = ckpt.gather(converted)
        for name in ("wg", "w1", "w2", "w3", "b1", "b2"):
            if name in full:
                assert torch.equal(back[name], full[name]), name
        y2, l2 = one_rank_output(back, kw, x)
        assert torch.equal(y2, y) and torch.equal(l2, l_aux)


def test_sharded_b2_copies_are_averaged():
    states, kw = rank_states(2, 4)
    with torch.no_grad():
        states[1]["b2"].add_(1.0)  # shard 1 of expert 0 drifted
    x = torch.randn(30, D)
    ref, _ = plain_moe(x, states[0]["wg"], sharded_experts(states), k=2)
    with pytest.warns(UserWarning, match="b2: the shard ranks' copies"):
        full = ckpt.gather(states)
    y, _ = one_rank_output(full, kw, x)
    assert rel_l2(y, ref) <= 1e-5


def test_model_with_two_layers_and_cli(tmp_path):
    # A model: the MoE layers' entries are re-cut, the others carried.
    def model(W, r):
        torch.manual_seed(100 + r)
        m = torch.nn.ModuleDict({
            "embed": torch.nn.Linear(D, D),
            "blocks": torch.nn.ModuleList([
                flexmoe.moe_layer(gate_type={"type": "top", "k": 2},
                                  model_dim=D,
                                  experts={"type": "ffn",
                                           "count_per_node": 4 // W if
                                           W <= 4 else -(W // 4),
                                           "hidden_size_per_expert": H},
                                  world_size=W, rank=r)
                for _ in range(2)])})
        return m
    W = 2
    models = [model(W, r) for r in range(W)]
    for m in models[1:]:  # data-parallel entries agree
        m["embed"].load_state_dict(models[0]["embed"].state_dict())
        for b, b0 in zip(m["blocks"], models[0]["blocks"]):
            b.wg.data.copy_(b0.wg)
    files = []
    for r, m in enumerate(models):
        files.append(tmp_path / f"in{r}.pt")
        torch.save({"model": m.state_dict(), "step": 7}, files[-1])
    out = tmp_path / "out" / "rank{rank}.pt"
    run = subprocess.run(
        [sys.executable, "-m", "flexmoe.checkpoint", "convert", "--key",
         "model", "-w", "8", "-o", str(out)] + [str(f) for f in files],
        capture_output=True, text=True, cwd=PYTHON_DIR)
    assert run.returncode == 0, run.stderr
    assert len(run.stdout.split()) == 8
    converted = [torch.load(str(out).format(rank=r))["model"]
                 for r in range(8)]
    for r, state in enumerate(converted):
        m = model(8, r)
        m.load_state_dict(state)
        assert torch.equal(m["embed"].weight, models[0]["embed"].weight)
        assert tuple(m["blocks"][1].w1.shape) == (1, D, H // 2)
    before = ckpt.gather([m.state_dict() for m in models])
    after = ckpt.gather(converted)
    assert before.keys() == after.keys()
    for key in before:
        if isinstance(before[key], torch.Tensor):
            assert torch.equal(before[key], after[key]), key
    info = subprocess.run([sys.executable, "-m", "flexmoe.checkpoint", "info",
                           "--key", "model", str(out).format(rank=5)],
                          capture_output=True, text=True, cwd=PYTHON_DIR)
    assert "blocks.1: flexmoe v1, E=4" in info.stdout
    assert "rank 5 of 8 (experts 2..2, shard 1 of 2)" in info.stdout


def test_errors_name_the_key(tmp_path):
    states, kw = rank_states(4, 2)
    layer = flexmoe.MoELayer(D, H, 4, world_size=4, rank=1, **kw)
    with pytest.raises(ValueError, match=r"^_extra_state: checkpoint of rank "
                       r"0 of 2 ranks, this layer runs on 4: convert it"):
        layer.load_state_dict(states[0])
    one = flexmoe.MoELayer(D, H, 4, world_size=2, rank=1, **kw)
    w1 = one.w1.detach().clone()
    with pytest.raises(ValueError, match="rank 0, this layer is rank 1"):
        one.load_state_dict(states[0])
    assert torch.equal(one.w1, w1)  # nothing was copied
    future = dict(states[0], _extra_state=dict(states[0]["_extra_state"],
                                               version=2))
    with pytest.raises(ValueError, match="format version 2; this flexmoe "
                       "reads versions 1 to 1"):
        flexmoe.MoELayer(D, H, 4, world_size=2, rank=0, **kw) \
            .load_state_dict(future)
    with pytest.raises(CheckpointError, match="format version 2"):
        ckpt.gather([future, states[1]])
    with pytest.raises(CheckpointError, match=r"^_extra_state: the "
                       r"checkpoint is of 2 ranks, 1 file\(s\) given"):
        ckpt.gather(states[:1])
    with pytest.raises(CheckpointError, match=r"no file holds rank\(s\) "
                       r"\[1\] of 2 \(the files hold ranks \[0, 0\]\)"):
        ckpt.gather([states[0], states[0]])
    reordered = ckpt.gather(states[::-1])  # files say their rank
    assert torch.equal(reordered["w1"], ckpt.gather(states)["w1"])
    bad = dict(states[1], w2=states[1]["w2"][:, :-1])
    with pytest.raises(CheckpointError, match=r"^w2: rank 1 holds shape "
                       r"\[2, 23, 16\].*needs \[2, 24, 16\]"):
        ckpt.gather([states[0], bad])
    with pytest.raises(CheckpointError, match="cannot cut the layer for 3 "
                       "ranks: num_experts 4 must be a multiple"):
        ckpt.convert(states, 3)
    with pytest.raises(CheckpointError, match="hidden_size 24 must be a "
                       "multiple of the 16 shards"):
        ckpt.convert(states, 64)
    other = dict(states[1], extra=torch.zeros(1))
    with pytest.raises(CheckpointError, match="^extra: in rank 1's"):
        ckpt.gather([states[0], other])
    with pytest.raises(CheckpointError, match="no flexmoe layer"):
        ckpt.gather([{"weight": torch.zeros(1)}])
    torch.save(states[0], tmp_path / "r0.pt")
    run = subprocess.run(
        [sys.executable, "-m", "flexmoe.checkpoint", "convert", "-w", "2",
         "-o", str(tmp_path / "o.pt"), str(tmp_path / "r0.pt")],
        capture_output=True, text=True, cwd=PYTHON_DIR)
    assert run.returncode == 1
    assert "error: _extra_state: the checkpoint is of 2 ranks" in run.stderr


# -- Tutel ------------------------------------------------------------------


def tutel_states(E, W, d=D, h=H, llama=False, bias=True, fp32_gate=True,
                 prefix=""):
    """Tutel moe_layer state_dicts of W ranks, in Tutel's layouts
    (tutel/experts/ffn.py, llama_ffn.py, gates/top.py)."""
    L, s = (E // W, 1) if E >= W else (1, W // E)
    gate = torch.randn(E, d, dtype=torch.float32 if fp32_gate else
                       torch.float32) * 4 / d**0.5
    states = []
    for _ in range(W):
        st = {prefix + "_num_global_experts": torch.tensor(E),
              prefix + "gates.0.wg.weight": gate.clone()}
        e = prefix + "experts."
        if llama:
            for name, n in (("W_fc1", L * d * h), ("W_fc2", L * d * h),
                            ("W_fc3", L * h * d)):
                st[e + name] = torch.randn(-(-n // s)) / d**0.5
        else:
            st[e + "batched_fc1_w"] = torch.randn(L, h // s, d) / d**0.5
            st[e + "batched_fc2_w"] = torch.randn(L, h // s, d) / h**0.5
            if bias:
                st[e + "batched_fc1_bias"] = torch.randn(L, h // s)
                st[e + "batched_fc2_bias"] = torch.randn(L, -(-d // s))
        states.append(st)
    return states


def tutel_experts(states, d=D, h=H, llama=False, prefix=""):
    """Tutel's experts evaluated from its own tensors (its formulas)."""
    e = prefix + "experts."
    E = int(states[0][prefix + "_num_global_experts"])
    W = len(states)
    L, s = (E // W, 1) if E >= W else (1, W // E)
    experts = []
    for g in range(E):
        if llama:  # gathered flat pieces, cut to [L, d, h] / [L, h, d]
            ranks = range(g // L, g // L + 1) if s == 1 else \
                range(g * s, (g + 1) * s)
            full = {n: torch.cat([states[r][e + n] for r in ranks])
                    for n in ("W_fc1", "W_fc2", "W_fc3")}
            i = g % L
            w1 = full["W_fc1"][:L * d * h].view(L, d, h)[i].double()
            w2 = full["W_fc2"][:L * d * h].view(L, d, h)[i].double()
            w3 = full["W_fc3"][:L * h * d].view(L, h, d)[i].double()
            experts.append(lambda x, w1=w1, w2=w2, w3=w3:
                           (F.silu(x @ w1) * (x @ w2)) @ w3)
            continue
        ranks = [g // L] if s == 1 else list(range(g * s, (g + 1) * s))
        i = g % L if s == 1 else 0

        def run(x, ranks=ranks, i=i):
            y = 0
            for r in ranks:
                fc1 = x @ states[r][e + "batched_fc1_w"][i].double().t()
                if e + "batched_fc1_bias" in states[r]:
                    fc1 = fc1 + states[r][e + "batched_fc1_bias"][i].double()
                y = y + F.relu(fc1) @ states[r][e +
                                                "batched_fc2_w"][i].double()
            if e + "batched_fc2_bias" in states[ranks[0]]:
                b = torch.cat([states[r][e + "batched_fc2_bias"][i]
                               for r in ranks])[:d]
                y = y + b.double()
            return y
        experts.append(run)
    return experts


def flex_tutel_layer(E, W=1, rank=0, d=D, h=H, llama=False, bias=True):
    experts = {"type": "llama_ffn" if llama else "ffn",
               "hidden_size_per_expert": h,
               "count_per_node": E // W if E >= W else -(W // E)}
    if not llama and not bias:
        experts.update(has_fc1_bias=False, has_fc2_bias=False)
    return flexmoe.moe_layer(
        gate_type={"type": "top", "k": 2, "capacity_factor": 0.0,
                   "fp32_gate": True},
        model_dim=d, experts=experts, world_size=W, rank=rank)


TUTEL_CASES = [  # (E, W, d, h, llama, bias)
    (4, 1, 16, 24, False, True),
    (4, 2, 16, 24, False, True),
    (2, 8, 18, 24, False, True),  # sharded; fc2 bias slices padded 18 -> 20
    (4, 1, 16, 24, True, False),
    (2, 8, 10, 7, True, False),  # sharded flat pieces, padded 70 -> 72
]


@pytest.mark.parametrize("E,W,d,h,llama,bias", TUTEL_CASES,
                         ids=["ffn-W1", "ffn-W2", "ffn-sharded", "llama-W1",
                              "llama-sharded"])
def test_tutel_import(E, W, d, h, llama, bias):
    states = tutel_states(E, W, d, h, llama, bias)
    x = torch.randn(40, d)
    wg_t = states[0]["gates.0.wg.weight"].t()
    ref, ref_l = plain_moe(x, wg_t, tutel_experts(states, d, h, llama), k=2)
    (flex,) = ckpt.from_tutel(states, 1)
    layer = flex_tutel_layer(E, d=d, h=h, llama=llama, bias=bias)
    layer.load_state_dict(flex)
    with torch.no_grad():
        y = layer(x)
    assert rel_l2(y, ref) <= 1e-5
    assert abs(float(y.l_aux) - float(ref_l)) <= 1e-5
    # To another world size: each rank's slice loads there, and the plain
    # evaluation of the re-cut slices is the same function.
    W2 = 4 if h % 2 == 0 else 2
    converted = ckpt.from_tutel(states, W2)
    for r, state in enumerate(converted):
        flex_tutel_layer(E, W2, r, d, h, llama, bias).load_state_dict(state)
    out, _ = plain_moe(x, wg_t, sharded_experts(
        converted, act="silu" if llama else "relu"), k=2)
    assert rel_l2(out, ref) <= 1e-12


def test_tutel_state_loads_directly():
    # flexmoe.moe_layer reads a Tutel checkpoint at its own module path (a
    # training script that swapped the import keeps its checkpoints).
    states = tutel_states(4, 1, prefix="moe.")
    model = torch.nn.ModuleDict({"moe": flex_tutel_layer(4)})
    model.load_state_dict(states[0])
    x = torch.randn(30, D)
    ref, _ = plain_moe(x, states[0]["moe.gates.0.wg.weight"].t(),
                       tutel_experts(states, prefix="moe."), k=2)
    with torch.no_grad():
        assert rel_l2(model["moe"](x), ref) <= 1e-5
    # Rank 1 of 2 ranks (E >= W): the rank's own slice.
    two = tutel_states(4, 2)
    layer = flex_tutel_layer(4, W=2, rank=1)
    layer.load_state_dict(two[1])
    assert torch.equal(layer.w1, two[1]["experts.batched_fc1_w"]
                       .transpose(1, 2))
    sharded = tutel_states(2, 4)
    with pytest.raises(ValueError, match="needs every rank's file"):
        flex_tutel_layer(2, W=4, rank=0).load_state_dict(sharded[0])
    with pytest.raises(ValueError, match=r"^_num_global_experts: the "
                       r"checkpoint has 4 experts, this layer 8"):
        flex_tutel_layer(8).load_state_dict(tutel_states(4, 1)[0])


def test_tutel_errors():
    states = tutel_states(4, 2)
    states[0]["_num_global_experts"] = torch.tensor(8)
    with pytest.raises(CheckpointError, match="^_num_global_experts: 8 "
                       "experts, but gates.0.wg.weight has 4 rows"):
        ckpt.from_tutel(states)
    states = tutel_states(4, 2)
    states[1]["experts.batched_fc2_w"] = torch.zeros(2, 20, D)
    with pytest.raises(CheckpointError, match=r"^experts.batched_fc2_w: "
                       r"Tutel rank 1 holds shape \[2, 20, 16\], expected "
                       r"\[2, 24, 16\]"):
        ckpt.from_tutel(states)
    states = tutel_states(4, 1)
    del states[0]["experts.batched_fc2_bias"]
    with pytest.raises(CheckpointError, match="batched_fc1_bias: Flex's FFN "
                       "experts have both biases or neither"):
        ckpt.from_tutel(states)
    states = tutel_states(4, 1)
    states[0]["experts.custom_w"] = torch.zeros(1)
    with pytest.raises(CheckpointError, match="^experts.custom_w: not a "
                       "parameter"):
        ckpt.from_tutel(states)
    states = tutel_states(4, 1)
    states[0]["gates.1.wg.weight"] = torch.zeros(4, D)
    with pytest.raises(CheckpointError, match="^gates.1.wg.weight: several "
                       "gates"):
        ckpt.from_tutel(states)
    with pytest.raises(CheckpointError, match="no Tutel moe_layer"):
        ckpt.from_tutel([{"w": torch.zeros(1)}])


def test_import_tutel_cli(tmp_path):
    # A model with a Tutel layer at blocks.0.moe on 8 ranks (2 experts, each
    # sharded over 4) -> flexmoe files for 2 ranks; the head is carried.
    states = tutel_states(2, 8, d=18, prefix="blocks.0.moe.")
    head = torch.randn(5, 18)
    files = []
    for r, state in enumerate(states):
        state["head.weight"] = head
        files.append(tmp_path / f"tutel{r}.pt")
        torch.save(state, files[-1])
    out = tmp_path / "flex{rank}.pt"
    run = subprocess.run(
        [sys.executable, "-m", "flexmoe.checkpoint", "import-tutel", "-w",
         "2", "-o", str(out)] + [str(f) for f in files],
        capture_output=True, text=True, cwd=PYTHON_DIR)
    assert run.returncode == 0, run.stderr
    expected = ckpt.from_tutel(states, 2)
    for r in range(2):
        got = torch.load(str(out).format(rank=r))
        assert got.keys() == expected[r].keys()
        assert torch.equal(got["head.weight"], head)
        assert torch.equal(got["blocks.0.moe.w1"],
                           expected[r]["blocks.0.moe.w1"])
        assert got["blocks.0.moe._extra_state"]["rank"] == r
    assert flexmoe.checkpoint is ckpt  # the package's attribute
