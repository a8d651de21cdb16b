"""Export knows families only through their `FamilySpec` (velotune.models.spec): no `model_type`
test anywhere in `velotune.export`, and each GGUF field of the record does what llama.cpp expects."""

from __future__ import annotations

import ast
import logging
from pathlib import Path

import gguf
import pytest
import torch

from velotune.export.gguf_arch import TensorNamer, write_hparams
from velotune.models.spec import FAMILIES, family_of

from tiny import export_shapes as tiny

EXPORT = Path(__file__).resolve().parents[2] / "src" / "velotune" / "export"
FAMILY_NAMES = set(FAMILIES) | {"gemma3"}


def _family_tests(path: Path) -> list[str]:
    """Lines of `path` that use `model_type` other than in a message (an f-string or a call's
    argument, as logging's), or compare anything with a family's name."""
    tree = ast.parse(path.read_text())
    parents = {child: node for node in ast.walk(tree) for child in ast.iter_child_nodes(node)}
    found = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Attribute) and node.attr == "model_type":
            parent = parents.get(node)
            in_message = isinstance(parent, ast.FormattedValue) or (isinstance(parent, ast.Call) and node in parent.args)
            if not in_message:
                found.add(node.lineno)
        elif isinstance(node, ast.Constant) and node.value == "model_type":  # getattr(config, "model_type")
            call = parents.get(node)
            if not isinstance(parents.get(call), ast.FormattedValue):
                found.add(node.lineno)
        elif isinstance(node, ast.Compare):
            parts = [node.left, *node.comparators]
            if {n.value for p in parts for n in ast.walk(p) if isinstance(n, ast.Constant)} & FAMILY_NAMES:
                found.add(node.lineno)
    return [f"{path.name}:{line}" for line in sorted(found)]


def test_no_model_type_tests_in_export():
    found = [hit for path in sorted(EXPORT.rglob("*.py")) for hit in _family_tests(path)]
    assert not found, f"family knowledge belongs in velotune.models.spec.FamilySpec, not in export: {found}"


def test_the_scan_sees_comparisons_and_lookups(tmp_path):
    bad = tmp_path / "bad.py"
    bad.write_text('a = config.model_type == "llama"\nb = mt in ("gemma", "gemma2")\nc = ARCHES[config.model_type]\n'
                   'd = "gemma" in config.model_type\nmt = config.model_type\ne = getattr(config, "model_type")\n'
                   'ok = f"{config.model_type!r} {getattr(config, \'model_type\', None)}"\n'
                   'logger.warning("%s", config.model_type)\n')
    assert _family_tests(bad) == [f"bad.py:{i}" for i in range(1, 7)]


def _rope_pairs(x: torch.Tensor, angle: torch.Tensor) -> torch.Tensor:
    """llama.cpp's normal rope (LLAMA_ROPE_TYPE_NORM): rotates adjacent pairs (x0, x1), (x2, x3), ..."""
    a, b = x[..., 0::2], x[..., 1::2]
    return torch.stack([a * angle.cos() - b * angle.sin(), a * angle.sin() + b * angle.cos()], -1).flatten(-2)


def _rope_halves(x: torch.Tensor, angle: torch.Tensor) -> torch.Tensor:
    """transformers' rotate_half (and llama.cpp's NEOX rope): rotates (x_i, x_{i + d/2})."""
    a, b = x.chunk(2, -1)
    return torch.cat([a * angle.cos() - b * angle.sin(), a * angle.sin() + b * angle.cos()], -1)


# llama.cpp's llama_model_rope_type: LLM_ARCH_LLAMA is ROPE_TYPE_NORM; qwen2/3, gemma*, phi3 are NEOX.
NORM_ROPE_ARCHES = {"llama"}


@pytest.mark.parametrize("family", sorted(tiny.CONFIGS))
def test_permute_qk_makes_llama_cpps_rope_equal_transformers(family):
    config = tiny.CONFIGS[family]()
    spec = family_of(config)
    assert spec.gguf.permute_qk == (spec.gguf.arch in NORM_ROPE_ARCHES)
    namer = TensorNamer(config)
    heads, d = config.num_attention_heads, config.hidden_size // config.num_attention_heads
    torch.manual_seed(0)
    w, x = torch.randn(heads * d, config.hidden_size), torch.randn(config.hidden_size)
    angle = torch.rand(d // 2) * 3
    ours = torch.cat([_rope_halves(q, angle) for q in (w @ x).view(heads, d)])
    rope = _rope_pairs if spec.gguf.arch in NORM_ROPE_ARCHES else _rope_halves
    converted = namer.convert("model.layers.0.self_attn.q_proj.weight", w)
    theirs = torch.cat([rope(q, angle) for q in (converted @ x).view(heads, d)])
    # llama.cpp's q after rope is ours with the head's rows in its own order: the same scores q.k
    perm = namer.convert("model.layers.0.self_attn.q_proj.weight", torch.arange(heads * d).float()[:, None])
    torch.testing.assert_close(theirs, ours[perm[:, 0].long()])
    torch.testing.assert_close(namer.revert("model.layers.0.self_attn.q_proj.weight", converted), w)


@pytest.mark.parametrize("family", sorted(tiny.CONFIGS))
def test_norm_offset_is_baked_into_gguf_norms(family):
    config = tiny.CONFIGS[family]()
    namer, offset = TensorNamer(config), family_of(config).norm_offset
    w = torch.randn(8)
    for name in ("model.norm.weight", "model.layers.1.input_layernorm.weight"):
        torch.testing.assert_close(namer.convert(name, w), w + offset)
        torch.testing.assert_close(namer.revert(name, w + offset), w)
    assert (namer.name("lm_head.weight") is None) == family_of(config).gguf.tied_output


def _keys(config, caplog) -> set[str]:
    writer = gguf.GGUFWriter(None, family_of(config).gguf.arch)
    with caplog.at_level(logging.WARNING, logger="velotune"):
        write_hparams(writer, config)
    return {k for shard in writer.kv_data for k in shard}


@pytest.mark.parametrize("family", sorted(tiny.CONFIGS))
def test_hparams_follow_the_record(family, caplog):
    config = tiny.CONFIGS[family]()
    g = family_of(config).gguf
    keys = _keys(config, caplog)
    arch = g.arch
    assert (f"{arch}.vocab_size" in keys) == g.vocab_size_key
    assert (f"{arch}.attn_logit_softcapping" in keys) == (g.softcapping == "both")
    has_final = g.softcapping == "both" or (g.softcapping == "final" and bool(config.final_logit_softcapping))
    assert (f"{arch}.final_logit_softcapping" in keys) == has_final
    assert (f"{arch}.attention.sliding_window" in keys) == (g.sliding_window in ("always", "bounded", "pattern"))
    assert (f"{arch}.attention.sliding_window_pattern" in keys) == (g.sliding_window == "pattern")


def test_an_ignored_sliding_window_is_warned(caplog):
    config = tiny.CONFIGS["mistral"]()
    config.sliding_window = 16  # shorter than the 128-token context
    _keys(config, caplog)
    assert "llama.cpp runs mistral without its 16-token sliding window" in caplog.text
