"""Single-file image checkpoints, built offline from the tiny pipelines: an original SD 1.x
.safetensors (LDM names, as civitai serves them), a FLUX.1 transformer-only file in Black Forest
Labs' names, and a Comfy-Org style all-in-one FLUX.1 file (transformer + CLIP-L + T5 + VAE) with
FP8 weights. Each round-trips to the tiny pipeline's tensors, and `cake serve FILE
--image-config ...` renders them over real HTTP."""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import httpx
import pytest
import torch

from conftest import ROOT, free_port, hf_cache_with

tiny = pytest.importorskip("cake.testing.tiny_images", reason="image models are not installed")

FP8 = torch.float8_e4m3fn
# Tiny models gain nothing from a second thread, and on a busy machine lose a lot to it.
ONE_THREAD = {"OMP_NUM_THREADS": "1"}
FLUX_REPO = "tiny-org/tiny-flux1"  # the tiny FLUX.1 folder, as a cached Hub repo
COMFY_REPO = "tiny-org/flux1-dev-fp8"  # a repo holding only the all-in-one file


def save(state: dict[str, torch.Tensor], path: Path) -> Path:
    from safetensors.torch import save_file

    save_file({k: v.contiguous() for k, v in state.items()}, str(path))
    return path


T5 = "text_encoders.t5xxl.transformer."


def fp8_matrices(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The transformer blocks' and T5's matrices in FP8 (float8_e4m3fn), the rest as they
    are, as in Comfy-Org's flux1-dev fp8 file."""
    return {k: v.to(FP8) if ("_blocks." in k or k.startswith(T5)) and v.ndim == 2 else v
            for k, v in state.items()}


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    """Tiny pipeline folders (sd, flux1), their single files, and an offline HF cache holding
    the FLUX.1 folder and the all-in-one file as repos."""
    import diffusers

    root = tmp_path_factory.mktemp("single-file")
    sd_dir = tiny.write_tiny_pipeline(root / "sd", "sd")
    flux_dir = tiny.write_tiny_pipeline(root / "flux1", "flux1")
    sd = diffusers.StableDiffusionPipeline.from_pretrained(sd_dir, safety_checker=None,
                                                           requires_safety_checker=False)
    flux = diffusers.FluxPipeline.from_pretrained(flux_dir)
    (root / "comfy").mkdir()
    out = {
        "sd_dir": sd_dir, "flux_dir": flux_dir, "sd": sd, "flux": flux,
        "sd_file": save(tiny.sd_single_file_state(sd), root / "tiny-sd15.safetensors"),
        "bfl_file": save(tiny.flux_single_file_state(flux, comfy=False),
                         root / "tiny-flux1-dev.safetensors"),
        "comfy_file": save(fp8_matrices(tiny.flux_single_file_state(flux, comfy=True)),
                           root / "comfy" / "flux1-dev-fp8.safetensors"),
        "cache": root / "hf-cache",
    }
    hf_cache_with(out["cache"], FLUX_REPO, flux_dir)
    hf_cache_with(out["cache"], COMFY_REPO, root / "comfy")
    return out


def stored(path: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    return load_file(str(path))


def assert_same_weights(expected, loaded, names, fp8_file=None):
    """Every tensor of every model equals the tiny pipeline's; with an FP8 file, equals the
    pipeline's tensor rounded to FP8 where the file stores it so."""
    rounded = {}
    if fp8_file is not None:
        from cake.image.flux_keys import bfl_to_diffusers

        state = stored(fp8_file)
        transformer = {k: v for k, v in state.items() if k.startswith("model.diffusion_model.")}
        rounded["transformer"] = bfl_to_diffusers(transformer, dict(expected.transformer.config))
        t5 = {k.removeprefix(T5): v for k, v in state.items() if k.startswith(T5)}
        rounded["text_encoder_2"] = {**t5, "encoder.embed_tokens.weight": t5["shared.weight"]}
    for name in names:
        want = getattr(expected, name).state_dict()
        got = getattr(loaded, name).state_dict()
        assert want.keys() == got.keys(), name
        for key, tensor in want.items():
            reference = rounded.get(name, {}).get(key, tensor)
            assert torch.equal(reference.to(got[key].dtype), got[key]), f"{name}.{key}"


def test_sd_single_file_round_trips(files):
    from cake.image.loader import load_single_file

    pipe = load_single_file(files["sd_file"], None, None, torch.float32, str(files["sd_dir"]))
    assert type(pipe).__name__ == "StableDiffusionPipeline"
    assert_same_weights(files["sd"], pipe, ["unet", "vae", "text_encoder"])


def test_flux_transformer_only_file_round_trips(files):
    """BFL's layout holds only the transformer: the rest comes from --image-config."""
    from cake.image.loader import load_single_file

    names = stored(files["bfl_file"]).keys()
    assert "double_blocks.0.img_attn.qkv.weight" in names
    assert not any(n.startswith(("model.", "vae.", "text_encoders.")) for n in names)
    pipe = load_single_file(files["bfl_file"], None, None, torch.float32, str(files["flux_dir"]))
    assert_same_weights(files["flux"], pipe, ["transformer", "vae", "text_encoder",
                                              "text_encoder_2"])


def test_comfy_all_in_one_fp8_file(files):
    """Every model comes from the file (a config folder without weights would do); the
    transformer blocks' matrices stay FP8 in memory and compute in float32."""
    import shutil

    from cake.image.loader import load_single_file

    configs = files["cache"].parent / "flux1-configs-only"
    shutil.copytree(files["flux_dir"], configs, dirs_exist_ok=True,
                    ignore=shutil.ignore_patterns("*.safetensors", "*.bin"))
    pipe = load_single_file(files["comfy_file"], None, None, torch.float32, str(configs))
    assert_same_weights(files["flux"], pipe, ["transformer", "vae", "text_encoder",
                                              "text_encoder_2"], fp8_file=files["comfy_file"])
    assert not any(m.training for m in pipe.components.values() if isinstance(m, torch.nn.Module))
    block = pipe.transformer.transformer_blocks[0]
    assert block.attn.to_q.weight.dtype == FP8 and block.ff.net[2].weight.dtype == FP8
    assert pipe.transformer.single_transformer_blocks[0].proj_mlp.weight.dtype == FP8
    image = pipe("a red fox", height=32, width=32, num_inference_steps=2,
                 generator=torch.Generator().manual_seed(3)).images[0]
    assert image.size == (32, 32)


def test_converter_matches_diffusers_at_flux1_width():
    """At FLUX.1's real width (3072, which diffusers' own converter assumes) cake's
    BFL -> diffusers mapping gives exactly what diffusers' gives. One column per matrix
    keeps it small: both only split rows."""
    from diffusers import FluxTransformer2DModel
    from diffusers.loaders.single_file_utils import (
        convert_flux_transformer_checkpoint_to_diffusers)

    from cake.image.flux_keys import bfl_to_diffusers

    with torch.device("meta"):
        model = FluxTransformer2DModel(num_layers=2, num_single_layers=2, guidance_embeds=True)
    generator = torch.Generator().manual_seed(0)
    bfl = {k: torch.randn(v.shape[:1] if v.ndim == 1 else (v.shape[0], 1), generator=generator)
           for k, v in tiny.bfl_flux_state(model).items()}
    ours = bfl_to_diffusers({"model.diffusion_model." + k: v for k, v in bfl.items()},
                            dict(model.config))
    theirs = convert_flux_transformer_checkpoint_to_diffusers(dict(bfl))
    assert ours.keys() == theirs.keys() == model.state_dict().keys()
    assert all(torch.equal(ours[k], theirs[k]) for k in ours)


def post_png(server, seed: int, prompt: str = "a lighthouse in a storm") -> bytes:
    r = httpx.post(server.url + "/v1/images/generations",
                   json={"prompt": prompt, "seed": seed}, timeout=120)
    assert r.status_code == 200, r.text[:300]
    assert r.headers["content-type"] == "image/png"
    return r.content


def png_size(data: bytes) -> tuple[int, int]:
    import io

    from PIL import Image

    return Image.open(io.BytesIO(data)).size


def assert_seeded_pngs(server, size: tuple[int, int]) -> None:
    first = post_png(server, 42)
    assert png_size(first) == size
    assert post_png(server, 42) == first
    assert post_png(server, 43) != first


def test_serve_sd_single_file(files, start_server):
    server = start_server(str(files["sd_file"]), "--model-type", "image-model",
                          "--image-config", str(files["sd_dir"]), "--n-steps", "2",
                          "--sd-width", "64", "--sd-height", "32",
                          env={"HF_HUB_OFFLINE": "1", **ONE_THREAD})
    assert httpx.get(server.url + "/v1/models").json()["data"][0]["id"] == "tiny-sd15"
    assert_seeded_pngs(server, (64, 32))


def test_serve_comfy_fp8_repo_offline(files, start_server):
    """`cake serve REPO` where the repo is one all-in-one FP8 file (as evilsocket/flux1-dev),
    from the offline cache, with a local --image-config; /api/v1/topology shows FP8 blocks."""
    server = start_server(COMFY_REPO, "--model-type", "image-model",
                          "--image-config", str(files["flux_dir"]), "--n-steps", "2",
                          "--flux-width", "32", "--flux-height", "48",
                          env={"HF_HUB_CACHE": str(files["cache"]), "HF_HUB_OFFLINE": "1",
                               **ONE_THREAD})
    assert_seeded_pngs(server, (32, 48))
    topology = httpx.get(server.url + "/api/v1/topology", timeout=30).json()
    assert topology["architecture"] == "FLUX.1-dev"
    dtypes = {t["name"]: t["dtype"] for t in topology["layer_details"]["transformer"]["tensors"]}
    assert "float8_e4m3fn" in dtypes["transformer.transformer_blocks.0.attn.to_q.weight"]
    assert "float8_e4m3fn" in dtypes["transformer.single_transformer_blocks.0.proj_mlp.weight"]
    # diffusers keeps norms (here the blocks' modulations) in the compute dtype
    assert dtypes["transformer.transformer_blocks.0.norm1.linear.weight"] == "F32"


def test_serve_bfl_file_with_config_repo_offline(files, start_server):
    """The transformer-only file, with --image-config naming a Hub repo (from the offline
    cache) that supplies the configs, text encoders and VAE."""
    server = start_server(str(files["bfl_file"]), "--model-type", "image-model",
                          "--image-config", FLUX_REPO, "--n-steps", "2",
                          "--flux-width", "32", "--flux-height", "32",
                          env={"HF_HUB_CACHE": str(files["cache"]), "HF_HUB_OFFLINE": "1",
                               **ONE_THREAD})
    assert_seeded_pngs(server, (32, 32))


def test_offline_without_config_is_a_clear_error(files, tmp_path):
    """No --image-config, offline, and diffusers' inferred repo (black-forest-labs/FLUX.1-dev)
    is not cached: one line that says what to pass, no traceback."""
    cmd = [sys.executable, "-m", "cake", "serve", str(files["bfl_file"]), "--model-type",
           "image-model", "--api", f"127.0.0.1:{free_port()}"]
    env = {**os.environ, "HF_HUB_CACHE": str(tmp_path), "HF_HUB_OFFLINE": "1"}
    run = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=120)
    assert run.returncode == 1
    assert "Traceback" not in run.stderr
    message = run.stderr.strip().splitlines()[-1]
    assert message.startswith("cake: ") and "--image-config" in message
    assert "black-forest-labs/FLUX.1-dev" in message
