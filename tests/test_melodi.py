"""MELODI (premem.models.melodi): accounting, masks, mixing, FIFO, gradients, segment exactness, ablations."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from premem.models.melodi import (
    MelodiConfig,
    MelodiLM,
    MelodiState,
    TokenMixing,
    build_attention_mask,
    memory_accounting,
    t5_relative_buckets,
)

pytestmark = pytest.mark.usefixtures("one_torch_thread")

ATOL = 1e-5


def tiny(**kw) -> MelodiConfig:
    base = dict(
        num_layers=3, d_model=32, num_heads=4, d_ff=64, W=8, S=4, Su=4, L=2, Q_max=3,
        long_term_layer=1, vocab_size=61, dropout=0.0,
    )
    base.update(kw)
    return MelodiConfig(**base)


def model(seed: int = 0, **kw) -> MelodiLM:
    torch.manual_seed(seed)
    return MelodiLM(tiny(**kw)).eval()


def tokens(n_windows: int, batch: int = 2, W: int = 8, seed: int = 1) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, 61, (batch, n_windows * W), generator=g)


# ------------------------------------------------------------------------------------------- accounting


def test_memory_accounting_reproduces_paper_table():
    xl = memory_accounting("transformer-xl", num_layers=12, d_model=1024, W=512)
    assert xl.total == 12 * 512 * 2 * 1024 == 12_582_912
    assert xl.paper_millions() == (12.6, 0.0, 12.6)

    m = memory_accounting("melodi", num_layers=12, d_model=1024, S=192, L=32, Q_max=128)
    assert (m.short, m.long) == (12 * 192 * 1024, 128 * 32 * 2 * 1024) == (2_359_296, 8_388_608)
    assert m.paper_millions() == (2.4, 8.4, 10.8)  # the exact total, 10.75M, is printed as the sum of parts
    assert MelodiConfig.named("base").memory_accounting() == m

    assert memory_accounting("melodi", S=128, L=64).paper_millions() == (1.6, 16.8, 18.4)
    assert memory_accounting("melodi", S=192, L=96).paper_millions() == (2.4, 25.2, 27.6)
    assert memory_accounting("memorizing").paper_millions() == (12.6, 134.2, 146.8)
    assert memory_accounting("melodi", S=0, L=8).paper_millions()[1] == 2.1  # ablation grid column L8


# ------------------------------------------------------------------------------------------------ config


def test_named_configs_and_json(tmp_path):
    base = MelodiConfig.named("base")
    assert (base.num_layers, base.d_model, base.num_heads, base.head_dim, base.d_ff) == (12, 1024, 8, 128, 4096)
    assert (base.W, base.S, base.Su, base.L, base.Q_max, base.long_term_layer) == (512, 192, 192, 32, 128, 6)
    assert base.use_long_term and base.use_branching and base.dropout == 0.05
    s = MelodiConfig.named("S128+L64")
    assert (s.S, s.Su, s.L) == (128, 128, 64)
    assert not MelodiConfig.named("S192+L0").long_term_enabled
    assert not MelodiConfig.named("no-long-term").use_long_term
    assert not MelodiConfig.named("no-branching").use_branching
    assert MelodiConfig.named("base", W=256).W == 256
    with pytest.raises(KeyError):
        MelodiConfig.named("huge")

    c = tiny(use_branching=False)
    assert MelodiConfig.from_json(c.to_json()) == c
    c.to_json(tmp_path / "cfg.json")
    assert MelodiConfig.from_json(tmp_path / "cfg.json") == c
    with pytest.raises(ValueError):
        MelodiConfig.from_json('{"bogus": 1}')
    with pytest.raises(ValueError):
        tiny(use_branching=False, S=3)  # no branching passes u' on as z: needs S == Su


# ------------------------------------------------------------------------------------------ attention mask


def test_attention_mask_who_sees_whom():
    S, W, Su = 2, 3, 2
    m = build_attention_mask(S, W, Su)
    assert m.shape == (W + Su, S + W + Su)
    # keys:          z0 z1 x0 x1 x2 u0 u1
    expected = torch.tensor([
        [1, 1, 0, 0, 0, 0, 0],  # x0: all of z, not itself
        [1, 1, 1, 0, 0, 0, 0],  # x1
        [1, 1, 1, 1, 0, 0, 0],  # x2: never the summary tokens
        [1, 1, 1, 1, 1, 0, 0],  # u0: the whole window
        [1, 1, 1, 1, 1, 1, 0],  # u1: plus earlier summary tokens
    ], dtype=torch.bool)
    assert torch.equal(m, expected)


def test_t5_buckets_unidirectional():
    rel = torch.tensor([3, 0, -1, -15, -16, -100, -128, -5000])
    b = t5_relative_buckets(rel, 32, 128)
    assert b.tolist() == [0, 0, 1, 15, 16, 30, 31, 31]
    t5 = pytest.importorskip("transformers.models.t5.modeling_t5")
    rel = torch.arange(-300, 5).view(1, -1)
    ref = t5.T5Attention._relative_position_bucket(rel, bidirectional=False, num_buckets=32, max_distance=128)
    assert torch.equal(t5_relative_buckets(rel, 32, 128), ref)


def test_model_is_causal_within_and_across_windows():
    m = model()
    t = tokens(3)
    logits, _ = m(t)
    p = 13  # window 1, position 5
    t2 = t.clone()
    t2[:, p] = (t2[:, p] + 1) % 61
    logits2, _ = m(t2)
    assert torch.allclose(logits[:, :p], logits2[:, :p], atol=0, rtol=0)
    assert not torch.allclose(logits[:, p:], logits2[:, p:])


# ------------------------------------------------------------------------------------------- token mixing


def test_token_mixing_shapes_and_residual_rule():
    torch.manual_seed(0)
    W, Su, d = 8, 4, 16
    x, u = torch.randn(2, W, d), torch.randn(2, Su, d)
    with_res = TokenMixing(W + Su, Su, d, norm_residual=True)
    no_res = TokenMixing(W + Su, 6, d, norm_residual=False)
    assert with_res(x, u).shape == (2, Su, d)
    assert no_res(x, u).shape == (2, 6, d)
    with torch.no_grad():
        for mod in (with_res, no_res):
            mod.lin.weight.zero_()
            mod.lin.bias.zero_()
    assert torch.equal(with_res(x, u), u)  # zero mix -> the residual u' alone
    assert torch.equal(no_res(x, u), torch.zeros(2, 6, d))
    with pytest.raises(ValueError):
        TokenMixing(W + 3, Su, d, norm_residual=True)(x, u[:, :3])

    # in the model: two separate branches; the short one has norm+residual only when S == Su
    m = model(S=6, Su=4)
    layer = m.layers[0]
    assert layer.mix_summary.norm_residual and layer.mix_summary.n_out == 4
    assert not layer.mix_short.norm_residual and layer.mix_short.n_out == 6
    assert model().layers[0].mix_short.norm_residual
    logits, st = m(tokens(2))
    assert logits.shape == (2, 16, 61) and st.z.shape == (3, 2, 6, 32)


# -------------------------------------------------------------------------------------- FIFO and gate


def test_fifo_order_and_eviction():
    m = model()
    c = m.config
    t = tokens(5)  # 5 windows > Q_max = 3
    _, st, incs = m(t, return_increments=True)
    assert incs.shape == (2, 5, c.L, c.d_model)
    assert st.fifo.shape == (2, c.Q_max * c.L, c.d_model)
    assert st.n_valid.tolist() == [3, 3]
    # the FIFO holds the last Q_max increments, oldest first
    assert torch.equal(st.fifo, incs[:, 2:].reshape(2, 3 * c.L, c.d_model))

    # window by window: zeros are pushed out from the front, order kept, count clamps at Q_max
    state = None
    for w in range(5):
        _, state, inc = m(t[:, w * 8:(w + 1) * 8], state, return_increments=True)
        assert state.n_valid.tolist() == [min(w + 1, 3)] * 2
        assert torch.allclose(state.fifo[:, -c.L:], inc[:, 0], atol=ATOL)
        if w < 2:
            assert torch.count_nonzero(state.fifo[:, : (2 - w) * c.L]) == 0
    assert torch.allclose(state.fifo, st.fifo, atol=ATOL)


def test_gate_shape_and_effect():
    m = model()
    lt = m.layers[1]
    assert lt.long_term and not m.layers[0].long_term and not m.layers[2].long_term
    assert lt.memory.gate.shape == (4, 8) and lt.memory.gate_alpha().shape == (4, 8)
    t = tokens(2)
    st = m.initial_state(2)
    st_rand = MelodiState(st.z, torch.randn_like(st.fifo), st.n_valid)
    a, _ = m(t, st)
    b, _ = m(t, st_rand)
    assert not torch.allclose(a, b)  # the FIFO is read
    with torch.no_grad():
        lt.memory.gate.fill_(100.0)  # sigma(g) = 1: all self-attention
    a, _ = m(t, st)
    b, _ = m(t, st_rand)
    assert torch.allclose(a, b, atol=ATOL)


# ----------------------------------------------------------------------------------------------- gradients


def _capture_embeddings(m: MelodiLM) -> list[torch.Tensor]:
    store: list[torch.Tensor] = []

    def hook(_mod, _inp, out):
        out.retain_grad()
        store.append(out)

    m.embed.register_forward_hook(hook)
    return store


def test_gradient_flows_across_windows_not_segments():
    m = model()
    embs = _capture_embeddings(m)
    t = tokens(4)
    logits, st = m(t)
    logits[:, 8:16].square().sum().backward()  # loss on window 2 (index 1)
    g = embs[0].grad
    assert g[:, :8].abs().sum() > 0  # reaches window-1 inputs (z recurrence, mixing, FIFO)
    assert g[:, 16:].abs().sum() == 0  # nothing from the future
    assert not st.z.requires_grad and not st.fifo.requires_grad

    # the FIFO path alone also carries gradient: layer-1 increments are read by the long-term layer
    m.zero_grad()
    embs.clear()
    _, _, incs = m(t, return_increments=True)
    incs[:, 1].sum().backward()
    assert embs[0].grad[:, :8].abs().sum() > 0

    # across segments: the carried state is detached
    embs.clear()
    l1, s1 = m(t[:, :16])
    l2, _ = m(t[:, 16:], s1)
    l2.square().sum().backward()
    assert embs[0].grad is None
    assert embs[1].grad is not None


# ------------------------------------------------------------------------------------- segment exactness


@pytest.mark.parametrize("kw", [{}, {"use_branching": False}, {"use_long_term": False}, {"S": 6, "Su": 4}])
def test_one_segment_equals_several_with_carried_state(kw):
    m = model(**kw)
    t = tokens(5)
    full, st_full = m(t)
    for cuts in ([0, 8, 16, 24, 32, 40], [0, 16, 40], [0, 24, 40]):
        state, parts = None, []
        for a, b in zip(cuts[:-1], cuts[1:], strict=True):
            lo, state = m(t[:, a:b], state)
            parts.append(lo)
        assert torch.allclose(torch.cat(parts, 1), full, atol=ATOL, rtol=0)
        assert torch.allclose(state.z, st_full.z, atol=ATOL)
        assert torch.allclose(state.fifo, st_full.fifo, atol=ATOL)
        assert torch.equal(state.n_valid, st_full.n_valid)


def test_batch_rows_are_independent_and_reset():
    m = model()
    t = tokens(2, batch=3)
    both, st = m(t)
    one, _ = m(t[1:2])
    assert torch.allclose(both[1:2], one, atol=ATOL)
    # a new document in row 0: reset its memories only
    st2 = st.reset(torch.tensor([True, False, False]))
    assert torch.count_nonzero(st2.z[:, 0]) == 0 and torch.count_nonzero(st2.fifo[0]) == 0
    assert st2.n_valid.tolist() == [0, 2, 2]
    nxt, _ = m(t, st2)
    fresh, _ = m(t[:1])
    assert torch.allclose(nxt[:1], fresh, atol=ATOL)


def test_forward_until_long_term_matches_full_forward():
    m = model()
    t = tokens(4)
    _, st_full, incs_full = m(t[:, :16], return_increments=True)
    incs, st = m.forward_until_long_term(t[:, :16])
    assert incs.shape == (2, 2, 2, 32)
    assert torch.equal(incs, incs_full)
    assert torch.equal(st.fifo, st_full.fifo) and torch.equal(st.z[:2], st_full.z[:2])
    # second segment, carried state (upper z differ but do not influence the lower layers)
    _, _, incs_full2 = m(t[:, 16:], st_full, return_increments=True)
    incs2, _ = m.forward_until_long_term(t[:, 16:], st)
    assert torch.equal(incs2, incs_full2)


# -------------------------------------------------------------------------------------------- ablations


def test_no_long_term_ablation_ignores_fifo():
    m = model(use_long_term=False)
    assert not any(layer.long_term for layer in m.layers)
    assert not any(".memory." in n for n, _ in m.named_parameters())
    t = tokens(2)
    st = m.initial_state(2)
    st_rand = MelodiState(st.z, torch.randn_like(st.fifo), st.n_valid)
    a, s_a, incs = m(t, st, return_increments=True)
    b, s_b = m(t, st_rand)
    assert incs is None
    assert torch.equal(a, b)  # FIFO unused
    assert torch.equal(s_b.fifo, st_rand.fifo) and s_b.n_valid.tolist() == [0, 0]
    with pytest.raises(ValueError):
        m.forward_until_long_term(t)
    assert not torch.allclose(a, model()(t)[0])  # same seed, with long-term memory: different output


def test_no_branching_ablation_passes_summary_on_as_memory():
    nb = model(use_branching=False)
    assert not any(".mix_s" in n for n, _ in nb.named_parameters())
    # branching with zeroed mixers (out = 0 + u') computes exactly what no-branching computes
    br = model()
    missing = br.load_state_dict(nb.state_dict(), strict=False).missing_keys
    assert missing and all(".mix_summary." in k or ".mix_short." in k for k in missing)
    t = tokens(3)
    with torch.no_grad():
        for layer in br.layers:
            for mix in (layer.mix_summary, layer.mix_short):
                mix.lin.weight.zero_()
                mix.lin.bias.zero_()
    a, sa = nb(t)
    b, sb = br(t)
    assert torch.allclose(a, b, atol=ATOL) and torch.allclose(sa.z, sb.z, atol=ATOL)
    c, _ = model()(t)  # trained-from-init mixers change the output
    assert not torch.allclose(a, c)


def test_input_checks_and_dropout():
    m = model()
    with pytest.raises(ValueError):
        m(torch.zeros(2, 12, dtype=torch.long))
    with pytest.raises(ValueError):
        m(tokens(1), m.initial_state(3))
    d = model(dropout=0.5).train()
    t = tokens(1)
    assert not torch.allclose(d(t)[0], d.eval()(t)[0])
    c = dataclasses.replace(tiny(), dropout=0.0)
    assert c == tiny()


def test_gradient_paths_short_term_branch_and_window_local():
    """Across windows the gradient runs through the short-term branch alone (no FIFO), reaches every recurrent
    module, and a model without memory (S=0, L=0) is window-local: nothing crosses a window boundary."""
    t = tokens(2)
    for kw, crosses in (({"use_long_term": False}, True), ({"S": 0, "L": 0, "use_long_term": False}, False)):
        m = model(**kw)
        embs = _capture_embeddings(m)
        logits, _ = m(t)
        logits[:, 8:16].square().sum().backward()
        assert (embs[0].grad[:, :8].abs().sum() > 0) == crosses, kw
    m = model()
    logits, _ = m(t)
    logits[:, 8:16].square().sum().backward()  # window 1 only: window 0's mixers matter through the recurrence
    for name in ("layers.0.mix_short.lin.weight", "layers.1.memory.mix.lin.weight", "layers.0.mix_summary.lin.weight",
                 "layers.1.memory.gate", "summary"):
        assert m.get_parameter(name).grad.abs().sum() > 0, name
    assert m.layers[2].mix_short.lin.weight.grad.abs().sum() > 0


def test_advance_matches_forward_state():
    m = model()
    t = tokens(3)
    _, st, incs = m(t, return_increments=True)
    incs_a, st_a = m.advance(t)
    assert torch.equal(incs_a, incs) and torch.equal(st_a.z, st.z) and torch.equal(st_a.fifo, st.fifo)
    incs_l, st_l = m.advance(t, full_state=False)
    assert torch.equal(incs_l, incs) and torch.equal(st_l.z[2], torch.zeros_like(st.z[2]))  # upper z not run


# ------------------------------------------------------------------------------- reference departures, fixed


def test_attention_scale_is_absolute_and_configurable():
    """The temperature is |scale| (a scale learned negative still sharpens, as in the reference); its start value
    is a config field (the reference's 1 by default)."""
    m = model()
    t = tokens(2)
    a, _ = m(t)
    with torch.no_grad():
        for layer in m.layers:
            layer.attn.scale.neg_()
    b, _ = m(t)
    assert torch.allclose(a, b, atol=ATOL)
    assert all(torch.equal(layer.attn.scale.detach(), torch.ones(4)) for layer in model().layers)
    assert all(torch.equal(layer.attn.scale.detach(), torch.full((4,), 6.0)) for layer in model(attn_scale_init=6.0).layers)


def test_relative_bias_init_is_flax_default_scale():
    """flax's default embedding init over the [heads, buckets] table: std 1/sqrt(buckets) (~0.18 for 32), not 1."""
    torch.manual_seed(0)
    m = MelodiLM(MelodiConfig.named("base", num_layers=4, long_term_layer=2, d_model=64, num_heads=8, d_ff=64,
                                       vocab_size=61, W=16, S=4, Su=4, L=2))
    w = torch.cat([layer.attn.rel_bias.weight.detach().flatten() for layer in m.layers])
    assert w.numel() == 4 * 32 * 8
    assert 0.15 < float(w.std()) < 0.21


def test_fifo_spans_64k_tokens_whatever_the_window():
    """Q_max of the named settings follows the window: 128 x 512 = 64 x 1024 = 32 x 2048 tokens, which gives the
    paper's memory figures for the longer windows (S512+L256 at W=2048: 23.1M)."""
    assert MelodiConfig.named("base").Q_max == 128
    assert MelodiConfig.named("base", W=1024).Q_max == 64
    big = MelodiConfig.named("S512+L256", W=2048)
    assert big.Q_max == 32 and big.memory_accounting().paper_millions() == (6.3, 16.8, 23.1)
    assert MelodiConfig.named("base", W=1024, Q_max=7).Q_max == 7  # an explicit Q_max wins


def test_long_term_layer_mixes_its_summary_without_short_term_memory():
    """With S = 0 the reference's long-term layer still mixes its summary tokens (the short-term layers do not)."""
    m = model(S=0)
    assert m.layers[1].mix_summary is not None and m.layers[1].mix_short is None
    assert m.layers[0].mix_summary is None and m.layers[2].mix_summary is None
    logits, st = m(tokens(3))
    assert logits.shape == (2, 24, 61) and st.z.shape == (3, 2, 0, 32)
