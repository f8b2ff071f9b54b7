"""scripts/grow_unet.py: cross-attention at more UNet levels, deeper transformers, a pooled-text path, each
without changing the network's function."""

from __future__ import annotations

import importlib.util
import os

import pytest
import torch

from latentforge.checkpoint_io import read_metadata, read_state_dict
from latentforge.checkpoints import build_component, load_checkpoint, save_checkpoint
from latentforge.models import AutoencoderKLConfig, CLIPTextConfig, UNetConfig

SCRIPT = os.path.join(os.path.dirname(__file__), "..", "scripts", "grow_unet.py")


def _script():
    spec = importlib.util.spec_from_file_location("grow_unet", SCRIPT)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def _tiny(tmp_path) -> str:
    configs = {
        "unet": UNetConfig(
            model_channels=16,
            channel_mult=(1, 2, 2),
            num_res_blocks=1,
            attention_resolutions=(4,),
            num_head_channels=16,
            transformer_depth=1,
            context_dim=32,
            use_linear_in_transformer=True,
            norm_groups=8,
        ),  # fmt: skip
        "vae": AutoencoderKLConfig(ch=16, ch_mult=(1, 2), num_res_blocks=1, resolution=32, norm_groups=8),
        "clip_l": CLIPTextConfig(
            hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2
        ),
    }
    torch.manual_seed(0)
    comps = {n: build_component(n, c).eval() for n, c in configs.items()}
    for p in comps["unet"].parameters():  # a "trained" UNet: no zero layers left, so the old levels matter
        torch.nn.init.normal_(p, std=0.05)
    path = str(tmp_path / "tiny.safetensors")
    save_checkpoint(path, "sd15", comps, configs)
    return path


def test_grown_unet_computes_the_same_function_and_its_new_blocks_are_live(tmp_path):
    src, out = _tiny(tmp_path), str(tmp_path / "grown.safetensors")
    assert _script().main([src, "--attention_resolutions", "1,4", "--out", out]) == 0
    old, new = load_checkpoint(src), load_checkpoint(out)
    assert new.configs["unet"].attention_resolutions == (1, 4)
    assert new.configs["vae"] == old.configs["vae"] and new.configs["clip_l"] == old.configs["clip_l"]
    a, b = read_state_dict(src), read_state_dict(out)
    added = sorted(set(b) - set(a))
    assert set(a) <= set(b) and all(torch.equal(a[k], b[k]) for k in a)  # no old key moved or changed
    # level 0 (factor 1): the empty `.1` slot of its input block and of its two output blocks
    blocks = {".".join(k.split(".")[2:5]) for k in added}
    assert blocks == {"input_blocks.1.1", "output_blocks.4.1", "output_blocks.5.1"}
    g = torch.Generator().manual_seed(3)
    x, t = torch.randn(2, 4, 16, 16, generator=g), torch.tensor([100.0, 900.0])
    ctx = torch.randn(2, 7, 32, generator=g)
    with torch.no_grad():
        y_old = old.components["unet"](x, t, context=ctx)
        y_new = new.components["unet"](x, t, context=ctx)
        assert torch.equal(y_old, y_new)  # every new block adds exactly zero: its proj_out is zero
        assert y_old.abs().mean() > 1e-3  # not a trivially zero network
        # the new blocks are in the forward path: opening one proj_out changes the output
        torch.nn.init.normal_(new.components["unet"].input_blocks[1][1].proj_out.weight, std=0.5, generator=g)
        assert (new.components["unet"](x, t, context=ctx) - y_old).abs().max() > 1e-3
    assert read_metadata(out)["latentforge.family"] == "sd15"


def test_deeper_transformers_compute_the_same_function_and_their_new_blocks_are_live(tmp_path):
    src, out = _tiny(tmp_path), str(tmp_path / "deeper.safetensors")
    args = [src, "--attention_resolutions", "4", "--transformer_depth", "2", "--out", out]
    assert _script().main(args) == 0
    old, new = load_checkpoint(src), load_checkpoint(out)
    assert new.configs["unet"].transformer_depth == 2
    a, b = read_state_dict(src), read_state_dict(out)
    assert set(a) <= set(b) and all(torch.equal(a[k], b[k]) for k in a)
    # a second block in each of the four transformers (level 2's input block, the middle, two output blocks)
    added = {k.split(".", 2)[2].split(".transformer_blocks.")[0] + "/" + k.split(".transformer_blocks.")[1][0]
             for k in set(b) - set(a)}  # fmt: skip
    assert added == {"input_blocks.5.1/1", "middle_block.1/1", "output_blocks.0.1/1", "output_blocks.1.1/1"}
    g = torch.Generator().manual_seed(4)
    x, t = torch.randn(2, 4, 16, 16, generator=g), torch.tensor([50.0, 700.0])
    ctx = torch.randn(2, 7, 32, generator=g)
    with torch.no_grad():
        y_old = old.components["unet"](x, t, context=ctx)
        assert torch.equal(y_old, new.components["unet"](x, t, context=ctx))  # the three branches add zero
        for branch in ("attn1", "attn2", "ff"):  # each branch is in the forward path
            deeper = load_checkpoint(out).components["unet"]
            block = deeper.middle_block[1].transformer_blocks[1]
            layer = block.ff.net[2] if branch == "ff" else getattr(block, branch).to_out[0]
            torch.nn.init.normal_(layer.weight, std=0.5, generator=g)
            # (a branch outside the forward path would leave the output bit-identical)
            assert (deeper(x, t, context=ctx) - y_old).abs().max() > 1e-6, branch


@pytest.mark.parametrize("res, why", [("2,8", "must keep the old ones"), ("1,2", "must keep the old ones"),
                                      ("a,b", "integers and commas"),
                                      ("2,4", "would move")])  # fmt: skip
def test_grow_unet_refuses_bad_resolutions(tmp_path, res, why):
    src, out = _tiny(tmp_path), str(tmp_path / "grown.safetensors")
    with pytest.raises(SystemExit, match=why):
        _script().main([src, "--attention_resolutions", res, "--out", out])
    assert not os.path.exists(out)


def test_grow_unet_refuses_a_shallower_transformer(tmp_path):
    src, out = _tiny(tmp_path), str(tmp_path / "grown.safetensors")
    with pytest.raises(SystemExit, match="at least the old depth 1"):
        _script().main([src, "--attention_resolutions", "4", "--transformer_depth", "0", "--out", out])
    assert not os.path.exists(out)


def test_pooled_text_path_keeps_the_function_and_the_pipeline_feeds_it(tmp_path):
    from latentforge import families, tokenizer
    from latentforge.pipeline import Pipeline

    src, out = _tiny(tmp_path), str(tmp_path / "pooled.safetensors")
    assert _script().main([src, "--pooled_text", "--out", out]) == 0
    old, new = load_checkpoint(src), load_checkpoint(out)
    cfg = new.configs["unet"]
    assert (cfg.num_classes, cfg.adm_in_channels) == ("sequential", 32)
    assert cfg.attention_resolutions == old.configs["unet"].attention_resolutions  # left as is
    a, b = read_state_dict(src), read_state_dict(out)
    assert sorted({k.split(".")[2] for k in set(b) - set(a)}) == ["label_emb"]
    assert all(torch.equal(a[k], b[k]) for k in a)
    # the text tower's pooled EOS state is y (SD1's context unchanged); a released SD1 UNet gets no y
    enc = {"clip_l": new.components["clip_l"]}
    prompts = ["a red star", "two blue hearts on a white background"]
    cond = families.encode("sd15", enc, prompts, 32, 32, False, cfg)
    plain = families.encode("sd15", enc, prompts, 32, 32, False, old.configs["unet"])
    assert set(plain) == {"context"} and torch.equal(cond["context"], plain["context"])
    ids = tokenizer.tokenize(prompts, 77, pad="eos")  # one chunk each, EOS padded as SD1
    pooled = new.components["clip_l"](ids, layer="last", final_norm=True, pooled=True).pooled
    torch.testing.assert_close(cond["y"], pooled)
    g = torch.Generator().manual_seed(3)
    x, t = torch.randn(2, 4, 16, 16, generator=g), torch.tensor([100.0, 900.0])
    unet = new.components["unet"]
    with torch.no_grad():
        y_old = old.components["unet"](x, t, context=cond["context"])
        assert torch.equal(unet(x, t, **cond), y_old)  # label_emb's last layer is zero: it adds nothing
        torch.nn.init.normal_(unet.label_emb[0][2].weight, std=0.5, generator=g)  # opened: y now matters
        assert (unet(x, t, **cond) - y_old).abs().max() > 1e-3
    # the whole pipeline samples with it (the conditioning carries y into both CFG branches)
    img = Pipeline.from_single_file(out)("a red star", steps=2, width=32, height=32, seed=0, progress=False)
    assert img[0].size == (32, 32)
    with pytest.raises(SystemExit, match="already has label_emb"):
        _script().main([out, "--pooled_text", "--out", str(tmp_path / "twice.safetensors")])
