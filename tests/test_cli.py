"""The `latentforge` command: each sub-command runs, writes what it says, and rejects bad input clearly."""

import json

import numpy as np

from latentforge.cli import main


def test_bench_samplers_subset(tmp_path, capsys):
    assert (
        main(["bench", "samplers", "--out", str(tmp_path), "--samplers", "euler,dpmpp_2m,euler_ancestral"])
        == 0
    )
    report = json.loads((tmp_path / "samplers.json").read_text())
    assert set(report["samplers"]) == {"euler", "dpmpp_2m", "euler_ancestral"}
    nfe = [r["nfe"] for r in report["samplers"]["dpmpp_2m"]["runs"]]
    assert nfe == [5, 10, 20, 50]
    err = [r["rmse"] for r in report["samplers"]["dpmpp_2m"]["runs"]]
    assert err == sorted(err, reverse=True)  # more steps, less error against the exact ODE solution
    assert (tmp_path / "samplers.png").stat().st_size > 1000
    assert "dpmpp_2m" in capsys.readouterr().out


def test_bench_unknown_sampler(tmp_path, capsys):
    assert main(["bench", "samplers", "--out", str(tmp_path), "--samplers", "eulr"]) == 2
    assert "Did you mean 'euler'" in capsys.readouterr().err


def test_shapes_export(tmp_path, capsys):
    assert main(["shapes", "export", str(tmp_path), "--n", "3", "--size", "32", "--seed", "1"]) == 0
    lines = (tmp_path / "metadata.jsonl").read_text().splitlines()
    assert len(lines) == 3 and (tmp_path / "000002.png").exists() and (tmp_path / "000002.txt").exists()
    assert main(["shapes", "export", str(tmp_path), "--n", "3", "--size", "1000"]) == 2
    assert "[32, 512]" in capsys.readouterr().err
    # the caption knobs: every 2+-object scene with a relation, no background stated
    out = tmp_path / "knobs"
    argv = ["shapes", "export", str(out), "--n", "12", "--relation_share", "1", "--background_share", "0"]
    assert main(argv) == 0
    for line in (out / "metadata.jsonl").read_text().splitlines():
        rec = json.loads(line)
        spec = rec["caption_spec"]
        assert spec["background"] is None
        assert len(spec["relations"]) == (len(rec["scene"]["objects"]) >= 2)


def test_info(capsys):
    assert main(["info"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert len(out["samplers"]) == 42 and "karras" in out["schedulers"]


def test_eval_shapes_folder(tmp_path, capsys):
    data = tmp_path / "data"
    assert main(["shapes", "export", str(data), "--n", "20", "--seed", "2", "--split", "heldout"]) == 0
    report_path = tmp_path / "report.json"
    assert main(["eval", "shapes", "--images", str(data), "--json", str(report_path)]) == 0
    report = json.loads(report_path.read_text())
    assert report["n"] == 20 and report["all_correct"] == 1.0  # true captions of clean renders
    assert "all correct" in capsys.readouterr().out
    assert main(["eval", "shapes"]) == 2


def test_eval_shapes_generates_from_a_model(tmp_path, monkeypatch):
    import torch

    from latentforge.checkpoints import save_checkpoint
    from latentforge.models import AutoencoderKLConfig, CLIPTextConfig, UNetConfig
    from latentforge.pipeline import Pipeline

    configs = {
        "unet": UNetConfig(
            model_channels=32, channel_mult=(1, 2), num_res_blocks=1, attention_resolutions=(1,), num_heads=2,
            transformer_depth=1, context_dim=64,
        ),
        "vae": AutoencoderKLConfig(ch=32, ch_mult=(1, 2), num_res_blocks=1, resolution=32),
        "clip_l": CLIPTextConfig(
            hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4
        ),
    }  # fmt: skip
    torch.manual_seed(0)
    pipe = Pipeline.from_preset("sd15", configs)
    path = str(tmp_path / "tiny.safetensors")
    save_checkpoint(path, "sd15", pipe.components, configs)
    out, report_path = tmp_path / "gen", tmp_path / "r.json"
    argv = ["eval", "shapes", "--model", path, "--n", "3", "--steps", "2", "--width", "64", "--height", "64",
            "--out", str(out), "--json", str(report_path)]  # fmt: skip
    assert main(argv) == 0
    report = json.loads(report_path.read_text())
    assert report["n"] == 3 and 0.0 <= report["all_correct"] <= 1.0
    assert len(list(out.glob("*.png"))) == 3 and (out / "metadata.jsonl").exists()

    # --complete-background: the model is given each unstated background drawn from the free colours, the
    # images are scored against the prompt as written, and an image whose prompt is unchanged is unchanged
    from PIL import Image

    from latentforge.shapes import parse

    given, real_call = [], Pipeline.__call__

    def spy(self, prompt, *a, **kw):  # the real sampler, with the prompts it was given recorded
        given.extend(prompt)
        return real_call(self, prompt, *a, **kw)

    runs = {}
    for flag in ((), ("--complete-background",)):
        folder = tmp_path / f"gen{len(flag)}"
        argv = ["eval", "shapes", "--model", path, "--n", "8", "--steps", "2", "--width", "64",
                "--height", "64", "--out", str(folder), "--split", "validation", *flag]  # fmt: skip
        given.clear()
        monkeypatch.setattr(Pipeline, "__call__", spy)
        assert main(argv) == 0
        meta = [json.loads(x) for x in (folder / "metadata.jsonl").read_text().splitlines()]
        runs[flag] = [(m, p, np.asarray(Image.open(folder / m["file_name"])).astype(int))
                      for m, p in zip(meta, given, strict=True)]  # fmt: skip
    changed = 0
    for (plain, p0, img0), (done, p1, img1) in zip(runs[()], runs[("--complete-background",)], strict=True):
        assert "sampled_with" not in plain and p0 == plain["text"] == done["text"]
        spec = parse(done["text"])
        if spec.background is not None:
            assert "sampled_with" not in done and p1 == p0 and np.abs(img1 - img0).max() <= 1
            continue
        got = parse(done["sampled_with"])
        assert p1 == done["sampled_with"] and got.objects == spec.objects
        assert got.background not in {o.color for o in spec.objects}
        changed += 1
    assert changed >= 1
