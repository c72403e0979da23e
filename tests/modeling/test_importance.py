"""Adapters, the hook helper and the importance statistics on real transformers modules."""

from __future__ import annotations

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM, Qwen2Config, Qwen2ForCausalLM

from unislim.modeling.adapters import adapter_for
from unislim.modeling.families.digits import UniDigitsModel, reference_config
from unislim.modeling.hooks import HookError, HookSet
from unislim.modeling import importance
from unislim.modeling.importance import (
    CalibrationRecorder, head_scores, kv_group_scores, merge_stats, neuron_scores, scores_from_stats, top_overlap,
)

from tests.modeling.tiny import tiny


def _tiny(cls, config_cls, **kw):
    torch.manual_seed(0)
    config = config_cls(vocab_size=64, hidden_size=32, intermediate_size=48, num_hidden_layers=3,
                        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64, **kw)
    return cls(config).eval()


@pytest.fixture(scope="module")
def qwen():
    return _tiny(Qwen2ForCausalLM, Qwen2Config)


def _record(model, input_ids, mask=None):
    with CalibrationRecorder(model, adapter_for(model)) as rec, torch.no_grad():
        rec.token_mask = mask
        model(input_ids=input_ids)
    return rec.stats()


def test_adapters_find_every_part(qwen):
    llama = _tiny(LlamaForCausalLM, LlamaConfig)
    for model in (qwen, llama):
        a = adapter_for(model)
        mlps, attns = a.mlps(model, "gen"), a.attentions(model, "und")
        assert [m.name for m in mlps] == [f"model.layers.{i}.mlp" for i in range(3)]
        assert mlps[0].width == 48 and attns[0].num_heads == 4 and attns[0].num_kv_heads == 2
        assert attns[2].o_name == "model.layers.2.self_attn.o_proj" and attns[0].head_dim == 8
    with pytest.raises(ValueError, match="component must be one of"):
        adapter_for(qwen).mlps(qwen, "video")


def test_neuron_score_matches_direct_computation(qwen):
    ids = torch.randint(0, 64, (3, 10), generator=torch.Generator().manual_seed(1))
    captured = {}
    hook = qwen.model.layers[1].mlp.down_proj.register_forward_pre_hook(lambda m, a: captured.setdefault("h", a[0]))
    stats = _record(qwen, ids)
    hook.remove()
    h = captured["h"].reshape(-1, 48).double()  # (N, ff)
    direct = h.abs().mean(0) * qwen.model.layers[1].mlp.down_proj.weight.double().norm(dim=0)
    scores = scores_from_stats(stats, qwen, adapter_for(qwen))
    # Σ|h| is summed pairwise in float32 (no float64 copy of h), then accumulated in float64
    torch.testing.assert_close(scores["model.layers.1.mlp.neuron"], direct, rtol=1e-6, atol=0)
    assert scores["model.layers.1.self_attn.o_proj.head"].shape == (4,)
    assert scores["model.layers.1.self_attn.o_proj.kv_group"].shape == (2,)


def test_statistics_reduce_exactly_across_shards(qwen):
    ids = torch.randint(0, 64, (6, 12), generator=torch.Generator().manual_seed(2))
    whole = scores_from_stats(_record(qwen, ids), qwen, adapter_for(qwen))
    merged = merge_stats([_record(qwen, ids[:2]), _record(qwen, ids[2:])])
    split = scores_from_stats(merged, qwen, adapter_for(qwen))
    assert whole.keys() == split.keys()
    for k in whole:
        torch.testing.assert_close(split[k], whole[k], rtol=1e-6, atol=1e-9)


def test_token_mask_leaves_padding_out(qwen):
    ids = torch.randint(0, 64, (2, 8), generator=torch.Generator().manual_seed(3))
    mask = torch.ones(2, 8, dtype=torch.bool)
    mask[:, :3] = False
    stats = _record(qwen, ids, mask)
    assert stats["layer.0.tokens"].item() == 10 and stats["model.layers.0.mlp.tokens"].item() == 10


def test_layer_cosines_see_a_dead_mlp(qwen):
    model = _tiny(Qwen2ForCausalLM, Qwen2Config)
    with torch.no_grad():
        model.model.layers[2].mlp.down_proj.weight.zero_()
    s = scores_from_stats(_record(model, torch.randint(0, 64, (2, 6))), model, adapter_for(model))
    assert s["layer_cos.mlp"][2].item() == pytest.approx(1.0)
    assert s["layer_importance.mlp"][2].item() == pytest.approx(0.0, abs=1e-6)
    assert s["layer_importance.mlp"][0].item() > 1e-5 and (s["layer_cos.block"] <= 1 + 1e-6).all()


def test_score_math():
    w = torch.tensor([[3.0, 0.0], [4.0, 1.0]])  # columns of norm 5 and 1
    torch.testing.assert_close(neuron_scores(torch.tensor([2.0, 8.0]), 2, w), torch.tensor([5.0, 4.0], dtype=torch.float64))
    w_o = torch.ones(2, 4)  # 2 heads of dim 2: Frobenius norm 2 each
    torch.testing.assert_close(head_scores(torch.tensor([1.0, 3.0]), 1, w_o, 2), torch.tensor([2.0, 6.0], dtype=torch.float64))
    torch.testing.assert_close(kv_group_scores(torch.tensor([1.0, 2.0, 3.0, 4.0]), 2), torch.tensor([3.0, 7.0]))
    assert top_overlap(torch.arange(10.0), torch.arange(10.0)) == 1.0
    assert top_overlap(torch.arange(10.0), -torch.arange(10.0)) == 0.0


def test_hookset_removes_handles_and_names_silent_modules(qwen):
    with pytest.raises(HookError, match=r"model.layers.0.mlp"):
        with HookSet(qwen) as hooks:
            hooks.post("model.layers.0.mlp", lambda *a: None)
    with pytest.raises(RuntimeError, match="boom"):
        with HookSet(qwen) as hooks:
            hooks.post("model.layers.0.mlp", lambda *a: None)
            raise RuntimeError("boom")
    assert not qwen.model.layers[0].mlp._forward_hooks
    with pytest.raises(HookError, match="no module named"):
        HookSet(qwen).pre("model.layers.9.mlp", lambda *a: None)


# ---------------------------------------------------------------------------------------------
# The recorder against a reference: the statistics, computed the obvious way


class _Reference:
    """The recorder's statistics computed plainly: real rows gathered, every reduction in float64.

    Same surface as the recorder where drivers touch it (`token_mask`, `bucket`); plain torch hooks.
    """

    def __init__(self, model, components=("und", "gen")):
        adapter = adapter_for(model)
        self.token_mask, self.bucket, self.sums, self._x, self._mid = None, None, {}, {}, {}
        self._handles = []
        hook = lambda module, fn, pre=False: self._handles.append(  # noqa: E731
            module.register_forward_pre_hook(fn, with_kwargs=True) if pre else module.register_forward_hook(fn))
        for i, layer in enumerate(adapter.decoder_layers(model)):
            hook(layer, lambda m, a, k, i=i: self._x.__setitem__(i, a[0] if a else k["hidden_states"]), pre=True)
            if hasattr(layer, adapter.attention):
                hook(getattr(layer, adapter.attention), lambda m, a, o, i=i: self._attn(i, o))
            hook(layer, lambda m, a, o, i=i: self._out(i, o))
        for mlp in {m.name: m for c in components for m in adapter.mlps(model, c)}.values():
            hook(model.get_submodule(mlp.down_name), lambda m, a, k, n=mlp.name: self._mlp(n, a[0]), pre=True)
        for attn in {a.o_name: a for c in components for a in adapter.attentions(model, c)}.values():
            hook(model.get_submodule(attn.o_name), lambda m, a, k, r=attn: self._o(r, a[0]), pre=True)

    def remove(self):
        for h in self._handles:
            h.remove()

    def _add(self, key, value):
        for k in [key] + ([f"bucket.{self.bucket}/{key}"] if self.bucket is not None else []):
            self.sums[k] = self.sums.get(k, 0.0) + torch.as_tensor(value, dtype=torch.float64)

    def _real(self, x):  # (B, T, ·) → the real tokens' rows; 2-D inputs (routed rows) as they are
        if x.dim() == 3:
            return x[self.token_mask] if self.token_mask is not None else x.reshape(-1, x.shape[-1])
        return x

    def _cos(self, a, b):
        return torch.nn.functional.cosine_similarity(self._real(a).double(), self._real(b).double(), dim=-1).sum()

    def _attn(self, i, output):
        a = output[0] if isinstance(output, tuple) else output
        self._mid[i] = self._x[i] + a  # the residual sum, in the model's dtype, as the model forms it
        self._add(f"layer.{i}.attn_cos", self._cos(self._x[i], self._mid[i]))

    def _out(self, i, output):
        x, out = self._x.pop(i), output[0] if isinstance(output, tuple) else output
        mid = self._mid.pop(i, None)
        if mid is None:  # no attention sublayer: it is the identity
            mid = x
            self._add(f"layer.{i}.attn_cos", self._cos(x, x))
        self._add(f"layer.{i}.block_cos", self._cos(x, out))
        self._add(f"layer.{i}.mlp_cos", self._cos(mid, out))
        self._add(f"layer.{i}.tokens", self._real(x).shape[0])

    def _mlp(self, name, h):
        rows = self._real(h).double()
        self._add(f"{name}.abs_sum", rows.abs().sum(0))
        self._add(f"{name}.tokens", rows.shape[0])

    def _o(self, ref, z):
        rows = self._real(z).double().reshape(-1, ref.num_heads, ref.head_dim)
        self._add(f"{ref.o_name}.head_norm_sum", rows.norm(dim=-1).sum(0))
        self._add(f"{ref.o_name}.tokens", rows.shape[0])


def _assert_same_stats(got, want, rtol=1e-6):
    assert sorted(got) == sorted(want)
    for k in want:
        assert got[k].dtype == torch.float64 and got[k].shape == want[k].shape, k
        torch.testing.assert_close(got[k], want[k], rtol=rtol, atol=0, msg=lambda m, k=k: f"{k}: {m}")


def _reference_stats(model, drive, components=("und", "gen")):
    ref = _Reference(model, components)
    try:
        with torch.no_grad():
            drive(ref)
    finally:
        ref.remove()
    return ref.sums


def _recorded_stats(model, drive, components=("und", "gen")):
    with CalibrationRecorder(model, adapter_for(model), components) as rec, torch.no_grad():
        drive(rec)
    return rec.stats()


@pytest.fixture(scope="module")
def qwen_loud():
    """A tiny Qwen2 whose sublayers move the residual stream a lot (cosines far from 1), so that the
    comparison would see a swapped or mis-masked operand; bf16-free, fp32."""
    model = _tiny(Qwen2ForCausalLM, Qwen2Config)
    with torch.no_grad():
        for layer in model.model.layers:
            layer.self_attn.o_proj.weight.mul_(10.0)
            layer.mlp.gate_proj.weight.mul_(10.0)
            layer.mlp.up_proj.weight.mul_(10.0)
            layer.mlp.down_proj.weight.mul_(40.0)
    return model


def _padded_text(seed=4):
    """(input_ids, mask): 5 rows of 11 tokens, left- and right-padded, one full row."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, 64, (5, 11), generator=g)
    mask = torch.ones(5, 11, dtype=torch.bool)
    mask[0, 7:], mask[1, :4], mask[2, 9:], mask[3, :1] = False, False, False, False
    return ids, mask


@pytest.fixture(params=["chunk-default", "chunk-7-rows"])
def cpu_chunk(request, monkeypatch):
    """The recorder's CPU neuron sums as they run at real widths: many chunks, a short last one."""
    if request.param == "chunk-7-rows":
        monkeypatch.setattr(importance, "_CPU_CHUNK", 7 * 48)  # 7 rows of the tiny Qwen2's 48 neurons
    return request.param


def test_recorder_matches_reference_on_padded_qwen2(qwen_loud, cpu_chunk):
    ids, mask = _padded_text()

    def drive(rec):
        rec.token_mask = mask
        qwen_loud(input_ids=ids, attention_mask=mask.long())
        rec.token_mask = None  # more batches accumulate on top: unpadded, and a mask of real tokens only
        qwen_loud(input_ids=ids[:2])
        rec.token_mask = torch.ones(3, 11, dtype=torch.bool)
        qwen_loud(input_ids=ids[2:])

    want = _reference_stats(qwen_loud, drive)
    _assert_same_stats(_recorded_stats(qwen_loud, drive), want)
    cos = scores_from_stats(want, qwen_loud, adapter_for(qwen_loud))
    assert all(cos[f"layer_importance.{part}"].max() > 0.3 for part in ("block", "attn", "mlp"))


def _digits_drive(model, n=6, gen_steps=4, seed=5):
    """Understanding and generation batches through the reference model, set up the way the score
    stage's runner does it: padding masked out, statistics per denoising-step bucket (2 buckets)."""
    c = model.config
    g = torch.Generator().manual_seed(seed)
    pad, n_img = c.pad_token_id, c.num_image_tokens
    images = torch.rand(n, c.image_height, c.image_width, generator=g) * 2 - 1
    ids = torch.randint(0, c.vocab_size, (n, 9), generator=g)
    ids[ids == pad] = (pad + 1) % c.vocab_size
    prompts = ids[:, :5].clone()
    for row in range(n):  # left padding of different lengths
        ids[row, :row % 4], prompts[row, :row % 3] = pad, pad
    x = torch.randn(n, n_img, c.patch_dim, generator=g)

    def drive(rec):
        rec.token_mask = torch.cat([torch.ones(n, n_img, dtype=torch.bool), ids != pad], 1)
        model.und_logits(images, ids)
        keys = torch.cat([prompts != pad, torch.ones(n, n_img, dtype=torch.bool)], 1)
        null = model.null_prompt_like(prompts)
        rec.token_mask = torch.cat([keys, torch.cat([null != pad, keys[:, -n_img:]], 1)])  # CFG: 2n rows
        v = x
        for i in range(gen_steps):
            rec.bucket = str(i * 2 // gen_steps)
            v = v - model.denoise_velocity(v, 1.0 - i / gen_steps, prompts, 3.0) / gen_steps
        rec.bucket = None

    return drive


def _pruned_mot():
    config = reference_config("tiny", "mot")
    config.intermediate_size_gen, config.drop_attention_layers, config.drop_mlp_layers = 40, [1], [0]
    config.num_hidden_layers = 3
    torch.manual_seed(0)
    return UniDigitsModel(config).eval()


@pytest.mark.parametrize("build", [lambda: tiny("shared"), lambda: tiny("mot"), _pruned_mot],
                         ids=["shared", "mot", "mot-pruned"])
def test_recorder_matches_reference_on_digits(build, cpu_chunk):
    model = build()
    drive = _digits_drive(model)
    want = _reference_stats(model, drive)
    assert "bucket.1/layer.0.block_cos" in want
    _assert_same_stats(_recorded_stats(model, drive), want)


# ---------------------------------------------------------------------------------------------
# run(stop_early=True): the forward ends after the last decoder layer


def _calls(model, names):
    """Count the calls of modules `names` (plain torch hooks, removed by the caller)."""
    calls = dict.fromkeys(names, 0)
    handles = [model.get_submodule(n).register_forward_pre_hook(
        lambda m, a, n=n: calls.__setitem__(n, calls[n] + 1)) for n in names]
    return calls, handles


def _no_hooks_left(model):
    return all(not m._forward_hooks and not m._forward_pre_hooks for m in model.modules())


def test_stop_early_gives_the_full_forwards_statistics_without_the_head(qwen_loud):
    ids, mask = _padded_text()
    want = _reference_stats(qwen_loud, lambda rec: (setattr(rec, "token_mask", mask),
                                                    qwen_loud(input_ids=ids, attention_mask=mask.long())))
    calls, handles = _calls(qwen_loud, ["lm_head", "model.norm", "model.layers.2"])
    try:
        with CalibrationRecorder(qwen_loud, adapter_for(qwen_loud)) as rec, torch.no_grad():
            rec.token_mask = mask
            out = rec.run(lambda: qwen_loud(input_ids=ids, attention_mask=mask.long()), stop_early=True)
    finally:
        for h in handles:
            h.remove()
    assert out is None and calls == {"lm_head": 0, "model.norm": 0, "model.layers.2": 1}
    _assert_same_stats(rec.stats(), want)
    assert _no_hooks_left(qwen_loud)


def test_stop_early_on_the_digits_understanding_forward():
    model = tiny("mot")
    c = model.config
    images = torch.zeros(3, c.image_height, c.image_width)
    ids = torch.randint(0, c.vocab_size, (3, 6), generator=torch.Generator().manual_seed(6))
    ids[0, :2] = c.pad_token_id
    mask = torch.cat([torch.ones(3, c.num_image_tokens, dtype=torch.bool), ids != c.pad_token_id], 1)

    def drive(rec):
        rec.token_mask = mask
        return model.und_logits(images, ids)

    want = _reference_stats(model, drive, components=("und",))
    calls, handles = _calls(model, ["lm_head"])
    with CalibrationRecorder(model, adapter_for(model), ("und",), stop_early=True) as rec, torch.no_grad():
        assert rec.run(lambda: drive(rec)) is None
        full = rec.run(lambda: drive(rec), stop_early=False)  # the constructor's default, overridden
    for h in handles:
        h.remove()
    assert full.shape == (3, 6, c.vocab_size) and calls["lm_head"] == 1
    _assert_same_stats({k: v / 2 for k, v in rec.stats().items()}, want)


def test_run_returns_the_output_and_stops_only_inside_run(qwen_loud):
    ids = torch.randint(0, 64, (2, 5), generator=torch.Generator().manual_seed(7))
    with CalibrationRecorder(qwen_loud, adapter_for(qwen_loud), stop_early=True) as rec, torch.no_grad():
        direct = qwen_loud(input_ids=ids).logits  # a call outside run is never stopped
        through = rec.run(lambda: qwen_loud(input_ids=ids).logits, stop_early=False)
        swallowed = rec.run(lambda: _try(lambda: qwen_loud(input_ids=ids)))  # `except Exception` cannot catch the stop
    torch.testing.assert_close(through, direct, rtol=0, atol=0)
    assert swallowed is None and rec.stats()["layer.2.tokens"].item() == 30


def _try(fn):
    try:
        return fn()
    except Exception:
        return "swallowed"


def test_run_removes_hooks_on_error_and_keeps_require_data(qwen_loud):
    ids = torch.randint(0, 64, (2, 5))
    with pytest.raises(RuntimeError, match="inside `with"):
        CalibrationRecorder(qwen_loud, adapter_for(qwen_loud)).run(lambda: qwen_loud(input_ids=ids))
    boom = qwen_loud.model.layers[1].mlp.register_forward_hook(_raise)  # a forward failing half-way
    try:
        with pytest.raises(ValueError, match="boom"):
            with CalibrationRecorder(qwen_loud, adapter_for(qwen_loud)) as rec, torch.no_grad():
                rec.run(lambda: qwen_loud(input_ids=ids), stop_early=True)
    finally:
        boom.remove()
    assert _no_hooks_left(qwen_loud) and not rec._inputs and not rec._mids
    with pytest.raises(HookError, match="saw no data"):
        with CalibrationRecorder(qwen_loud, adapter_for(qwen_loud)) as rec:
            rec.run(lambda: None, stop_early=True)
    with CalibrationRecorder(qwen_loud, adapter_for(qwen_loud)) as rec:
        rec.run(lambda: None, stop_early=True)
        rec.require_data = False  # an empty shard
    assert _no_hooks_left(qwen_loud)


def _raise(*args):
    raise ValueError("boom")


def test_statistics_are_bit_identical_from_run_to_run(qwen_loud, cpu_chunk):
    ids, mask = _padded_text(seed=8)

    def once():
        with CalibrationRecorder(qwen_loud, adapter_for(qwen_loud)) as rec, torch.no_grad():
            rec.token_mask = mask
            rec.run(lambda: qwen_loud(input_ids=ids, attention_mask=mask.long()), stop_early=True)
        return rec.stats()

    a, b = once(), once()
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_token_mask_must_match_the_batch(qwen_loud):
    with pytest.raises(ValueError, match=r"token_mask of shape \(2, 4\) does not match"):
        with CalibrationRecorder(qwen_loud, adapter_for(qwen_loud)) as rec, torch.no_grad():
            rec.token_mask = torch.ones(2, 4, dtype=torch.bool)
            rec.run(lambda: qwen_loud(input_ids=torch.zeros(2, 5, dtype=torch.long)))


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_recorder_on_cuda_matches_reference_and_adds_no_sync(qwen_loud, dtype):
    """The device path (whole-tensor reductions, padding as a flag) against the reference on the
    same device; and a scored forward waits for the GPU no more often than a plain one."""
    import copy
    import warnings

    model = copy.deepcopy(qwen_loud).to("cuda", dtype)
    ids, mask = (t.cuda() for t in _padded_text())

    def drive(rec):
        rec.token_mask = mask
        model(input_ids=ids, attention_mask=mask.long())
        rec.token_mask = None
        model(input_ids=ids[:2])

    want = {k: v.cpu() for k, v in _reference_stats(model, drive).items()}
    _assert_same_stats(_recorded_stats(model, drive), want, rtol=1e-6 if dtype == torch.float32 else 1e-5)

    def syncs(fn) -> int:
        torch.cuda.synchronize()
        with warnings.catch_warnings(record=True) as seen, torch.no_grad():
            warnings.simplefilter("always")
            torch.cuda.set_sync_debug_mode("warn")
            try:
                fn()
            finally:
                torch.cuda.set_sync_debug_mode("default")
        return sum("synchroniz" in str(w.message) for w in seen)

    plain = syncs(lambda: model(input_ids=ids, attention_mask=mask.long()))
    with CalibrationRecorder(model, adapter_for(model)) as rec:
        rec.token_mask = mask
        scored = syncs(lambda: rec.run(lambda: model(input_ids=ids, attention_mask=mask.long())))
    assert scored <= plain
