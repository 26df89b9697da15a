"""LoRAs: MACE's closed-form fusion against the dense formula, merging many LoRAs against a loop,
and the file round trip through diffusers' load_lora_weights."""

from __future__ import annotations

import pytest
import torch

from fasterase.closed_form import gram
from fasterase.errors import UserError
from fasterase.lora import fuse_loras, load_lora, lora_state_dict, merge_loras, save_lora

F64 = torch.float64


def relative(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a - b).norm() / b.norm()).item()


def dense_ridge(weight, lam, sources, targets, preserved):
    """(lambda W + sum T_i c_i^T + W G_p)(lambda I + sum c_i c_i^T + G_p)^-1 as written, float64."""
    eye = torch.eye(weight.shape[1], dtype=F64)
    left = lam * weight + targets.T @ sources + weight @ preserved.T @ preserved
    right = lam * eye + sources.T @ sources + preserved.T @ preserved
    return left @ torch.linalg.inv(right)


def projections(generator, dims=(24, 40, 24), d=32, dtype=F64):
    return {f"p{i}": torch.randn(rows, d, generator=generator, dtype=dtype) for i, rows in enumerate(dims)}


def random_loras(generator, weights, count, rank, dtype=F64, skip=()):
    """count LoRAs of `rank` on every weight, but not on the (k, name) pairs in skip."""
    return [
        {name: (torch.randn(w.shape[0], rank, generator=generator, dtype=dtype), torch.randn(rank, w.shape[1], generator=generator, dtype=dtype))
         for name, w in weights.items() if (k, name) not in skip}
        for k in range(count)
    ]


def test_fusion_matches_the_dense_formula():
    g = torch.Generator().manual_seed(4)
    d, lam = 32, 0.3
    weights = projections(g, d=d)
    concept_tokens = [torch.randn(n, d, generator=g, dtype=F64) for n in (7, 11, 5)]
    p = torch.randn(40, d, generator=g, dtype=F64)
    loras = random_loras(g, weights, 3, 2, skip={(2, "p1")})  # concept 2 has no LoRA on p1
    originals = {name: w.clone() for name, w in weights.items()}
    fused = fuse_loras(weights, loras, [gram(x) for x in concept_tokens], gram(p), lam)
    assert all(torch.equal(weights[name], originals[name]) for name in weights), "inputs left as they were"
    sources = torch.cat(concept_tokens)
    for name, w in weights.items():
        targets = torch.cat([
            x @ (w + (loras[k][name][0] @ loras[k][name][1] if name in loras[k] else 0)).T
            for k, x in enumerate(concept_tokens)
        ])
        assert relative(fused[name], dense_ridge(w, lam, sources, targets, p)) < 1e-12, name


def test_fusion_keeps_dtypes_and_rejects_unknown_projections():
    w = {"a": torch.randn(4, 8)}
    up, down = torch.randn(4, 1), torch.randn(1, 8)
    fused = fuse_loras(w, [{"a": (up, down)}], [gram(torch.randn(3, 8))], torch.zeros(8, 8), 0.5)
    assert fused["a"].dtype == torch.float32 and fused["a"].shape == (4, 8)
    with pytest.raises(ValueError, match="not given: b"):
        fuse_loras(w, [{"b": (up, down)}], [gram(torch.randn(3, 8))], torch.zeros(8, 8), 0.5)
    with pytest.raises(ValueError, match="concept Grams"):
        fuse_loras(w, [{"a": (up, down)}], [], torch.zeros(8, 8), 0.5)


@pytest.mark.parametrize("dtype", [F64, torch.float32, torch.float16])
def test_merge_matches_a_loop_over_the_loras(dtype):
    g = torch.Generator().manual_seed(5)
    weights = projections(g, dtype=dtype)
    loras = random_loras(g, weights, 5, 3, dtype=dtype, skip={(1, "p0"), (4, "p2")})
    scales = [0.5, 1.0, -2.0, 0.25, 3.0]
    originals = {name: w.clone() for name, w in weights.items()}
    merged = merge_loras(weights, loras, scales)
    assert all(torch.equal(weights[name], originals[name]) for name in weights), "inputs left as they were"
    for name, w in weights.items():
        expected = w.double().clone()
        for scale, lora in zip(scales, loras):
            if name in lora:
                expected += scale * lora[name][0].double() @ lora[name][1].double()
        assert merged[name].dtype == dtype and merged[name].shape == w.shape
        # one rounding to the weight's dtype after a float32 (float64) product: a plain float32
        # computation in the same order does no better
        plain = (w.float() + torch.cat([s * lo[name][0].float() for s, lo in zip(scales, loras) if name in lo], 1) @ torch.cat([lo[name][1].float() for lo in loras if name in lo])).to(dtype)
        bound = 1e-13 if dtype == F64 else 2 * relative(plain.double(), expected) + torch.finfo(dtype).eps
        assert relative(merged[name].double(), expected) <= bound, name


def test_merge_refuses_what_does_not_fit():
    w = {"a": torch.randn(4, 8)}
    with pytest.raises(ValueError, match="not given: b"):
        merge_loras(w, [{"b": (torch.randn(4, 1), torch.randn(1, 8))}])
    with pytest.raises(ValueError, match=r"LoRA 0 on a: up \(4, 2\) @ down \(1, 8\)"):
        merge_loras(w, [{"a": (torch.randn(4, 2), torch.randn(1, 8))}])
    with pytest.raises(ValueError, match="2 scales for 1 LoRAs"):
        merge_loras(w, [{"a": (torch.randn(4, 1), torch.randn(1, 8))}], [1.0, 2.0])
    assert torch.equal(merge_loras(w, [])["a"], w["a"])


def test_lora_file_round_trip_and_refusal(tmp_path):
    from fasterase.edits import save_key

    g = torch.Generator().manual_seed(6)
    factors = {
        "down.attn2.to_k.weight": (torch.randn(6, 2, generator=g), torch.randn(2, 8, generator=g)),
        "up.attn2.to_v.weight": (torch.randn(4, 2, generator=g), torch.randn(2, 8, generator=g)),
    }
    save_lora(tmp_path / "l.safetensors", lora_state_dict(factors), {"concept": "circle"})
    loaded, metadata = load_lora(tmp_path / "l.safetensors")
    assert metadata == {"concept": "circle"} and loaded.keys() == factors.keys()
    assert all(torch.equal(a, b) for name in factors for a, b in zip(loaded[name], factors[name]))
    tensors = lora_state_dict(factors)
    del tensors["unet.up.attn2.to_v.lora_B.weight"]
    save_lora(tmp_path / "half.safetensors", tensors, {})
    with pytest.raises(UserError, match="unmatched"):
        load_lora(tmp_path / "half.safetensors")
    save_key(tmp_path / "key.safetensors", {"prompt": torch.zeros(2)}, {"method": "kpop"})
    with pytest.raises(UserError, match="not a fasterase-lora file"):
        load_lora(tmp_path / "key.safetensors")


def test_diffusers_loads_our_lora_as_we_merge_it(tiny_pipeline_dir, tmp_path):
    """A LoRA saved here, loaded by diffusers' load_lora_weights (peft layers, not fused), gives the
    UNet the outputs it gives with our merged weights."""
    from fasterase.methods.parameters import select_parameters
    from fasterase.models.loading import load_pipeline

    ours, theirs = load_pipeline(tiny_pipeline_dir), load_pipeline(tiny_pipeline_dir)
    weights = {n: p.detach() for n, p in select_parameters(ours.unet, "cross_attention_kv").items() if n.endswith(".weight")}
    g = torch.Generator().manual_seed(7)
    factors = {n: (0.1 * torch.randn(w.shape[0], 2, generator=g), torch.randn(2, w.shape[1], generator=g)) for n, w in weights.items()}
    save_lora(tmp_path / "lora.safetensors", lora_state_dict(factors), {})
    theirs.load_lora_weights(str(tmp_path / "lora.safetensors"))
    with torch.no_grad():
        for name, value in merge_loras(weights, [load_lora(tmp_path / "lora.safetensors")[0]]).items():
            ours.unet.get_parameter(name).copy_(value)
        x = torch.randn(2, 4, 8, 8, generator=g)
        context = torch.randn(2, 77, ours.text_encoder.config.hidden_size, generator=g)
        out, expected = (pipe.unet(x, 500, context).sample for pipe in (ours, theirs))
        base = load_pipeline(tiny_pipeline_dir).unet(x, 500, context).sample
    assert relative(expected, base) > 1e-2, "the LoRA changes the outputs"
    torch.testing.assert_close(out, expected)
