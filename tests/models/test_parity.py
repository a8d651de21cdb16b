"""Parity of velotune's own decoders with transformers' implementations (DESIGN.md §3).

The contract: for the same weights, our model's logits, loss and every gradient equal those of
transformers' `*ForCausalLM` (fp32, tiny random configs), with padding masks, packed sequences
(position ids restarting at 0, no attention mask) and KV-cache greedy decoding. Nothing is mocked:
each test builds the real transformers model of the family, randomises it with larger-than-default
weights, loads its state dict into ours with `strict=True`, and compares.
"""

from __future__ import annotations

import functools
import inspect

import pytest
import torch
import torch.nn.functional as F
from transformers import GenerationMixin, GPT2Config, PretrainedConfig, PreTrainedModel

from velotune.models import SUPPORTED_MODEL_TYPES, model_class_for

from tiny.families import FAMILIES, NO_SDPA, PAD_ID, STATEFUL_ROPE, VOCAB, make_config, make_hf

torch.set_num_threads(2)

ATOL_LOGITS = 1e-4  # max abs difference of logits / losses (fp32)
RTOL_GRAD = 1e-4  # max|g_ours - g_hf| / max|g_hf|, per parameter

FAMILY_IDS = list(FAMILIES)
# The transformers model types the eight families are built from.
EXPECTED_MODEL_TYPES = {"llama", "mistral", "qwen2", "qwen3", "gemma", "gemma2", "gemma3_text", "phi3"}
FUSED_FAMILIES = {f for f in FAMILIES if f.startswith("phi3")}  # checkpoint names differ from ours (fused qkv / gate_up)


# ----------------------------------------------------------------------------------------------
# helpers


@functools.lru_cache(maxsize=None)
def _hf(family: str, attn: str):
    return make_hf(family, attn=attn)


def hf_ref(family: str, attn: str = "sdpa"):
    """The transformers model (cached per family/attention); sdpa unless the family has none."""
    if family in NO_SDPA:
        attn = "eager"
    model = make_hf(family, attn=attn) if family in STATEFUL_ROPE else _hf(family, attn)
    model.zero_grad(set_to_none=True)
    return model


def hf_attns(family: str) -> list[str]:
    return ["eager"] if family in NO_SDPA else ["sdpa", "eager"]


@functools.lru_cache(maxsize=None)
def _ours(family: str):
    cfg = make_config(family)
    model = model_class_for(cfg)(cfg)
    missing_unexpected = model.load_state_dict(make_hf(family).state_dict(), strict=True)
    assert not missing_unexpected.missing_keys and not missing_unexpected.unexpected_keys
    return model.float().eval()


def ours_model(family: str):
    model = _ours(family)
    model.zero_grad(set_to_none=True)
    return model


def tokens(shape, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(3, VOCAB, shape, generator=g)  # never pad/bos/eos


def labels_with_ignored(input_ids: torch.Tensor, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed + 1000)
    labels = input_ids.clone()
    labels[torch.rand(labels.shape, generator=g) < 0.3] = -100
    labels[..., 0] = -100
    return labels


def max_abs(a: torch.Tensor, b: torch.Tensor) -> float:
    return (a.detach().float() - b.detach().float()).abs().max().item()


def assert_close_abs(ours: torch.Tensor, ref: torch.Tensor, what: str, atol: float = ATOL_LOGITS):
    assert ours.shape == ref.shape, f"{what}: shape {tuple(ours.shape)} != {tuple(ref.shape)}"
    assert torch.isfinite(ours).all(), f"{what}: ours has non-finite values"
    d = max_abs(ours, ref)
    assert d <= atol, f"{what}: max abs diff {d:.3e} > {atol:.0e} (ref max abs {ref.abs().max().item():.3e})"


def fused_view(family: str, ours, tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """`tensors` (by our parameter names) under transformers' names, through `to_hf_state_dict`.

    Used for gradients of the fused families: each parameter's data is swapped for the given
    tensor while `to_hf_state_dict` runs, so its own fusing logic maps our split grads onto
    transformers' fused `qkv_proj` / `gate_up_proj`.
    """
    saved = {}
    params = dict(ours.named_parameters())
    try:
        for name, p in params.items():
            saved[name] = p.data
            p.data = tensors[name]
        return {k: v.detach().clone() for k, v in ours.to_hf_state_dict().items()}
    finally:
        for name, p in params.items():
            p.data = saved[name]


def ours_grads_by_hf_name(family: str, ours, hf) -> dict[str, torch.Tensor]:
    grads = {
        n: (p.grad if p.grad is not None else torch.zeros_like(p)).detach()
        for n, p in ours.named_parameters(remove_duplicate=False)
    }
    hf_names = {n for n, _ in hf.named_parameters()}
    if hf_names <= set(grads):
        return grads
    assert family in FUSED_FAMILIES, f"parameter names differ from transformers': {sorted(hf_names - set(grads))}"
    return fused_view(family, ours, {n: grads[n] for n, _ in ours.named_parameters()})


def assert_grads_match(family: str, ours, hf, what: str):
    ours_g = ours_grads_by_hf_name(family, ours, hf)
    bad = []
    for name, p in hf.named_parameters():
        ref = p.grad
        assert ref is not None, f"reference has no grad for {name}"
        assert name in ours_g, f"{what}: no gradient for {name}"
        g = ours_g[name]
        assert g.shape == ref.shape, f"{what}: grad shape of {name}: {tuple(g.shape)} vs {tuple(ref.shape)}"
        scale = ref.abs().max().item()
        rel = max_abs(g, ref) / max(scale, 1e-12)
        if not (rel <= RTOL_GRAD) or not torch.isfinite(g).all():
            bad.append(f"{name}: rel {rel:.3e} (max|g_hf| {scale:.3e})")
    assert not bad, f"{what}: {len(bad)} gradients differ:\n  " + "\n  ".join(bad)


def token_loss_sum(logits: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, int]:
    """Sum of next-token cross-entropies over labelled positions, and their count."""
    shift_logits = logits[:, :-1].reshape(-1, logits.shape[-1]).float()
    shift_labels = labels[:, 1:].reshape(-1)
    total = F.cross_entropy(shift_logits, shift_labels, ignore_index=-100, reduction="sum")
    return total, int((shift_labels != -100).sum())


# ----------------------------------------------------------------------------------------------
# dispatch and weights


@pytest.mark.parametrize("family", FAMILY_IDS)
def test_model_class_for_known_families(family):
    cfg = make_config(family)
    cls = model_class_for(cfg)
    assert issubclass(cls, PreTrainedModel) and issubclass(cls, GenerationMixin)
    assert cfg.model_type in SUPPORTED_MODEL_TYPES
    # our own implementation, not transformers' class
    assert not cls.__module__.startswith("transformers"), cls.__module__


def test_supported_model_types():
    assert EXPECTED_MODEL_TYPES <= set(SUPPORTED_MODEL_TYPES)


class _MadeUpConfig(PretrainedConfig):
    model_type = "velotune_made_up_lm"


@pytest.mark.parametrize("cfg", [GPT2Config(n_layer=1, n_embd=32, n_head=2), _MadeUpConfig()], ids=["gpt2", "made_up"])
def test_model_class_for_unknown_raises(cfg):
    with pytest.raises(ValueError) as exc:
        model_class_for(cfg)
    msg = str(exc.value)
    missing = [t for t in EXPECTED_MODEL_TYPES if t not in msg]
    assert not missing, f"error message should list the supported families, lacks {missing}: {msg!r}"


@pytest.mark.parametrize("family", FAMILY_IDS)
def test_state_dict_names_and_round_trip(family):
    hf = hf_ref(family)
    ours = ours_model(family)
    hf_sd = hf.state_dict()
    if family not in FUSED_FAMILIES:
        assert set(ours.state_dict()) == set(hf_sd), (
            f"names differ: only ours {sorted(set(ours.state_dict()) - set(hf_sd))}, "
            f"only hf {sorted(set(hf_sd) - set(ours.state_dict()))}"
        )
    back = ours.to_hf_state_dict()
    assert set(back) == set(hf_sd), f"only ours {sorted(set(back) - set(hf_sd))}, only hf {sorted(set(hf_sd) - set(back))}"
    for name, ref in hf_sd.items():
        assert back[name].shape == ref.shape, f"{name}: {tuple(back[name].shape)} vs {tuple(ref.shape)}"
        assert back[name].dtype == ref.dtype, f"{name}: {back[name].dtype} vs {ref.dtype}"
        assert torch.equal(back[name], ref), f"{name}: round trip changed the values (max diff {max_abs(back[name], ref):.3e})"
    # and the round-tripped dict loads back into a fresh transformers model, strictly
    fresh = make_hf(family, attn="eager", seed=123)
    fresh.load_state_dict(back, strict=True)


INTERCHANGE_FAMILIES = ["llama", "qwen3", "gemma3", "phi3"]  # untied, tied, per-layer-type rope, fused


@pytest.mark.parametrize("family", INTERCHANGE_FAMILIES)
def test_save_pretrained_loads_in_transformers(family, tmp_path):
    """DESIGN §3: names identical to transformers' "so checkpoints interchange": ours -> transformers."""
    from transformers import AutoModelForCausalLM

    hf, ours = hf_ref(family), ours_model(family)
    ids = tokens((1, 10), seed=10)
    ours.save_pretrained(tmp_path)
    back = AutoModelForCausalLM.from_pretrained(tmp_path, dtype=torch.float32).eval()
    with torch.no_grad():
        ref = hf(input_ids=ids, use_cache=False).logits
        assert_close_abs(back(input_ids=ids, use_cache=False).logits, ref, f"{family}: ours.save_pretrained -> transformers")


@pytest.mark.parametrize("family", INTERCHANGE_FAMILIES)
def test_from_pretrained_of_transformers_checkpoint(family, tmp_path):
    """transformers -> ours through our class's own (inherited) `from_pretrained`.

    transformers 5 builds the model on the meta device and materialises only the checkpoint's
    tensors, so non-persistent buffers (rope inv_freq) must be rebuilt by the model's init hooks.
    """
    hf, ours = hf_ref(family), ours_model(family)
    ids = tokens((1, 10), seed=10)
    hf.save_pretrained(tmp_path)
    loaded = type(ours).from_pretrained(tmp_path, dtype=torch.float32).eval()
    with torch.no_grad():
        ref = hf(input_ids=ids, use_cache=False).logits
        out = loaded(input_ids=ids, use_cache=False).logits
        assert_close_abs(out, ref, f"{family}: our from_pretrained(transformers checkpoint)")


# ----------------------------------------------------------------------------------------------
# 1, 2: logits, loss, gradients


@pytest.mark.parametrize("family", FAMILY_IDS)
def test_logits_and_loss(family):
    ids = tokens((2, 12), seed=1)
    labels = labels_with_ignored(ids, seed=1)
    ours = ours_model(family)
    with torch.no_grad():
        out = ours(input_ids=ids, labels=labels, use_cache=False)
        assert out.logits.dtype == torch.float32
        for attn in hf_attns(family):
            ref = hf_ref(family, attn)(input_ids=ids, labels=labels, use_cache=False)
            assert_close_abs(out.logits, ref.logits, f"{family}/{attn} logits")
            assert_close_abs(out.loss, ref.loss, f"{family}/{attn} loss")


@pytest.mark.parametrize("family", FAMILY_IDS)
def test_gradients(family):
    ids = tokens((2, 12), seed=2)
    labels = labels_with_ignored(ids, seed=2)
    hf, ours = hf_ref(family), ours_model(family)
    hf.train(), ours.train()  # as under a trainer (all dropouts of these configs are 0)
    try:
        hf(input_ids=ids, labels=labels, use_cache=False).loss.backward()
        ours(input_ids=ids, labels=labels, use_cache=False).loss.backward()
    finally:
        hf.eval(), ours.eval()
    assert_grads_match(family, ours, hf, f"{family} grads")


@pytest.mark.parametrize("family", FAMILY_IDS)
def test_logits_to_keep_and_inputs_embeds(family):
    """Two more entry points of transformers' *ForCausalLM that trainers use.

    `logits_to_keep` (TRL's GRPO computes only the completion's logits) and `inputs_embeds` (PEFT
    prompt tuning, NEFTune); gemma's sqrt(hidden) scaling applies to inputs_embeds too.
    """
    ids = tokens((2, 12), seed=9)
    hf, ours = hf_ref(family), ours_model(family)
    with torch.no_grad():
        ref = hf(input_ids=ids, logits_to_keep=3, use_cache=False).logits
        out = ours(input_ids=ids, logits_to_keep=3, use_cache=False).logits
        assert_close_abs(out, ref, f"{family} logits_to_keep=3")
        emb = hf.get_input_embeddings()(ids)
        ref = hf(inputs_embeds=emb, use_cache=False).logits
        out = ours(inputs_embeds=emb, use_cache=False).logits
        assert_close_abs(out, ref, f"{family} inputs_embeds")


# ----------------------------------------------------------------------------------------------
# 3: padding


def _padded_batch(side: str):
    lengths = [12, 7, 9]
    T = max(lengths)
    ids = tokens((len(lengths), T), seed=3)
    mask = torch.zeros_like(ids)
    for i, n in enumerate(lengths):
        if side == "right":
            mask[i, :n] = 1
        else:
            mask[i, T - n :] = 1
    ids = ids.masked_fill(mask == 0, PAD_ID)
    labels = labels_with_ignored(ids, seed=3).masked_fill(mask == 0, -100)
    if side == "left":
        labels[torch.arange(len(lengths)), T - torch.tensor(lengths)] = -100  # first real token has no target
    return ids, mask, labels


@pytest.mark.parametrize("explicit_positions", [True, False], ids=["pos_ids", "no_pos_ids"])
@pytest.mark.parametrize("side", ["right", "left"])
@pytest.mark.parametrize("family", FAMILY_IDS)
def test_padding(family, side, explicit_positions):
    ids, mask, labels = _padded_batch(side)
    kwargs = dict(input_ids=ids, attention_mask=mask, labels=labels, use_cache=False)
    if explicit_positions:
        kwargs["position_ids"] = (mask.cumsum(-1) - 1).clamp(min=0)
    hf, ours = hf_ref(family), ours_model(family)
    ref = hf(**kwargs)
    out = ours(**kwargs)
    keep = mask.bool()
    assert_close_abs(out.logits[keep], ref.logits[keep], f"{family}/{side} logits (non-padded)")
    assert_close_abs(out.loss, ref.loss, f"{family}/{side} loss")
    if explicit_positions:
        ref.loss.backward()
        out.loss.backward()
        assert_grads_match(family, ours, hf, f"{family}/{side}-padded grads")


# ----------------------------------------------------------------------------------------------
# 4: packed sequences


SEGMENTS = [5, 7, 4]  # longer than the sliding windows (4, 5), so windows matter inside a segment


def _packed():
    ids = tokens((1, sum(SEGMENTS)), seed=4)
    position_ids = torch.cat([torch.arange(n) for n in SEGMENTS]).unsqueeze(0)
    labels = labels_with_ignored(ids, seed=4)
    starts = torch.tensor([0] + SEGMENTS[:-1]).cumsum(0)
    labels[0, starts] = -100  # as packing collators do: no target across a boundary
    return ids, position_ids, labels


@pytest.mark.parametrize("family", FAMILY_IDS)
def test_packed_sequences(family):
    ids, position_ids, labels = _packed()
    hf, ours = hf_ref(family), ours_model(family)
    ref = hf(input_ids=ids, position_ids=position_ids, labels=labels, use_cache=False)
    out = ours(input_ids=ids, position_ids=position_ids, labels=labels, use_cache=False)
    assert_close_abs(out.logits, ref.logits, f"{family} packed logits vs transformers")
    assert_close_abs(out.loss, ref.loss, f"{family} packed loss vs transformers")

    # no attention across boundaries: each segment alone gives the same logits and token losses
    loss_sum, count, start = 0.0, 0, 0
    with torch.no_grad():
        for i, n in enumerate(SEGMENTS):
            seg = ours(input_ids=ids[:, start : start + n], use_cache=False).logits
            assert_close_abs(out.logits[:, start : start + n], seg, f"{family} packed segment {i} vs alone")
            s, c = token_loss_sum(seg, labels[:, start : start + n])
            loss_sum, count, start = loss_sum + s, count + c, start + n
    assert_close_abs(out.loss, loss_sum / count, f"{family} packed loss vs segments alone")

    ref.loss.backward()
    out.loss.backward()
    assert_grads_match(family, ours, hf, f"{family} packed grads")


@pytest.mark.parametrize("family", ["llama", "mistral", "gemma2", "gemma3", "phi3"])
def test_packed_sequences_train_mode_default_cache(family):
    """DESIGN §3: packed sequences never attend across boundaries, whatever use_cache says.

    (transformers itself only detects packing when no cache is built, i.e. use_cache=False; a
    trainer that leaves config.use_cache=True must still get independent segments from us.)
    """
    ids, position_ids, labels = _packed()
    ours = ours_model(family)
    ours.train()
    try:
        out = ours(input_ids=ids, position_ids=position_ids, labels=labels)
        out.loss.backward()
    finally:
        ours.eval()
    start = 0
    with torch.no_grad():
        for i, n in enumerate(SEGMENTS):
            seg = ours(input_ids=ids[:, start : start + n], use_cache=False).logits
            assert_close_abs(out.logits[:, start : start + n], seg, f"{family} packed (train, default cache) segment {i}")
            start += n


# ----------------------------------------------------------------------------------------------
# 5: num_items_in_batch


@pytest.mark.parametrize("as_tensor", [False, True], ids=["int", "tensor"])
@pytest.mark.parametrize("family", FAMILY_IDS)
def test_num_items_in_batch(family, as_tensor):
    ids = tokens((2, 12), seed=5)
    labels = labels_with_ignored(ids, seed=5)
    n_items = 37  # e.g. the label count over the whole gradient-accumulation step, not this batch
    num = torch.tensor(n_items) if as_tensor else n_items
    hf, ours = hf_ref(family), ours_model(family)
    with torch.no_grad():
        out = ours(input_ids=ids, labels=labels, num_items_in_batch=num, use_cache=False)
        ref = hf(input_ids=ids, labels=labels, num_items_in_batch=num, use_cache=False)
        total, count = token_loss_sum(out.logits, labels)
        assert count != n_items
        assert_close_abs(out.loss, total / n_items, f"{family} loss vs sum/num_items_in_batch")
        assert_close_abs(out.loss, ref.loss, f"{family} loss(num_items_in_batch) vs transformers")
        plain = ours(input_ids=ids, labels=labels, use_cache=False).loss
        assert_close_abs(plain, total / count, f"{family} mean loss without num_items_in_batch")


# ----------------------------------------------------------------------------------------------
# 6: greedy generation with a KV cache

GEN = dict(do_sample=False, max_new_tokens=10, pad_token_id=PAD_ID, eos_token_id=None)


def _left_padded_prompts():
    a, b = tokens((1, 9), seed=6)[0], tokens((1, 5), seed=7)[0]
    ids = torch.full((2, 9), PAD_ID)
    mask = torch.zeros_like(ids)
    ids[0], mask[0] = a, 1
    ids[1, 4:], mask[1, 4:] = b, 1
    return ids, mask


@pytest.mark.parametrize("family", FAMILY_IDS)
def test_greedy_generation(family):
    hf, ours = hf_ref(family), ours_model(family)
    prompt = tokens((1, 7), seed=6)
    with torch.no_grad():
        ref = hf.generate(prompt, attention_mask=torch.ones_like(prompt), **GEN)
        got = ours.generate(prompt, attention_mask=torch.ones_like(prompt), **GEN)
        assert ref.shape[1] == prompt.shape[1] + 10
        assert got.tolist() == ref.tolist(), f"{family} single prompt: ours {got.tolist()} vs hf {ref.tolist()}"

        ids, mask = _left_padded_prompts()
        hf = hf_ref(family)  # a fresh one for stateful-rope families
        ref = hf.generate(ids, attention_mask=mask, **GEN)
        got = ours.generate(ids, attention_mask=mask, **GEN)
        assert got.tolist() == ref.tolist(), f"{family} left-padded batch: ours {got.tolist()} vs hf {ref.tolist()}"

        # the cache changes nothing: greedy decoding without it gives the same tokens (not so for
        # dynamic NTK, whose cached keys keep the frequencies of the length they were computed at,
        # in transformers too)
        if family in STATEFUL_ROPE:
            return
        no_cache = ours.generate(ids, attention_mask=mask, use_cache=False, **GEN)
        assert no_cache.tolist() == got.tolist(), f"{family}: use_cache=False {no_cache.tolist()} vs cached {got.tolist()}"


@pytest.mark.parametrize("family", ["llama", "gemma2", "gemma3"])
def test_cached_decode_logits(family):
    """Logits of a cached step-by-step decode equal the full-sequence forward pass (past the windows)."""
    ours = ours_model(family)
    ids = tokens((1, 12), seed=8)
    # transformers 5.2x renamed `past_key_values` to `cache` (old name deprecated); accept either
    cache_kw = "cache" if "cache" in inspect.signature(ours.forward).parameters else "past_key_values"

    def cache_of(out):
        c = getattr(out, "cache", None)
        return c if c is not None else getattr(out, "past_key_values", None)

    with torch.no_grad():
        full = ours(input_ids=ids, use_cache=False).logits
        out = ours(input_ids=ids[:, :6], use_cache=True)
        steps = [out.logits]
        for t in range(6, 12):
            past = cache_of(out)
            assert past is not None, f"{family}: use_cache=True returned no cache"
            out = ours(input_ids=ids[:, t : t + 1], use_cache=True, **{cache_kw: past})
            steps.append(out.logits)
    assert_close_abs(torch.cat(steps, dim=1), full, f"{family} cached decode logits")
